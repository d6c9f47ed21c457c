"""The `hf` teacher: batched transformers `generate` in Ray Data actors, for machines without vLLM.

    distray generate --config C teacher.kind=hf teacher.batch_size=32

Each actor loads the model once (on its GPU when it has one) and answers `batch_size` prompts
per `generate` call with left padding. Prompts are rendered exactly as the vllm teacher renders
them (`common.render_prompt`), top-k logprobs come from the raw logits (log-softmax at T=1,
as vLLM reports them), and finish_reason is judged from the ids (eos → stop, else length).
Seeds: one `torch.manual_seed(seed + first sample index)` per batch, so reruns repeat but a
row's sample depends on its batch-mates (unlike vLLM's per-request seeds).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from distray import formats as F
from distray.config import DistrayConfig, HFTeacher, SamplingConfig
from distray.teacher.engines import common
from distray.teacher.rows import ERROR

if TYPE_CHECKING:
    import ray.data

__all__ = ["HFGenerator", "generate"]


class HFGenerator:
    """A Ray Data callable class: one model per actor, one `generate` per batch."""

    def __init__(
        self,
        model: str,
        dtype: str,
        trust_remote_code: bool,
        sampling: dict[str, Any],
        logprobs: int | None,
        max_prompt_tokens: int | None,
        apply_chat_template: bool = True,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_path = model
        self.trust = trust_remote_code
        self.sampling = SamplingConfig(**sampling)
        self.k = logprobs
        self.max_prompt_tokens = max_prompt_tokens
        self.apply_chat_template = apply_chat_template
        self.tok = common.load_tokenizer(model, trust_remote_code)
        self.eos = common.eos_ids(model, trust_remote_code)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        loaded: Any = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        self.model = loaded.to(self.device).eval()
        hf_cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        n = getattr(hf_cfg, "max_position_embeddings", None)
        self.max_model_len = int(n) if n else None
        pad = self.tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos) if self.eos else 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = common.prepare_rows(
            batch.to_pylist(),
            model=self.model_path,
            trust_remote_code=self.trust,
            apply_chat_template=self.apply_chat_template,
            max_prompt_tokens=self.max_prompt_tokens,
            max_model_len=self.max_model_len,
        )
        todo = [r for r in rows if not r.get(ERROR)]
        if todo:
            try:
                self._generate(todo)
            except Exception as e:  # noqa: BLE001 - a failing batch becomes rejects, not a crash
                for r in todo:
                    common.empty_result(r, f"engine_error: {type(e).__name__}: {str(e)[:300]}")
        out = []
        for r in rows:
            if r.get(ERROR):
                common.empty_result(r, r[ERROR])
            r[F.PROMPT] = r.pop("_orig_prompt", None)
            r.pop("_prompt_text", None)
            r.pop("_prompt_token_ids", None)
            out.append(r)
        return pa.Table.from_pylist(out)

    def _generate(self, rows: list[dict[str, Any]]) -> None:
        import torch

        s = self.sampling
        prompts = [r["_prompt_token_ids"] for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        max_new = s.max_tokens
        if self.max_model_len is not None:
            max_new = max(1, min(max_new, self.max_model_len - width))
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos) or None,
            "return_dict_in_generate": True,
            "output_logits": self.k is not None,
        }
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tok)
        if s.seed is not None:
            torch.manual_seed(s.seed + int(rows[0].get(F.SAMPLE_INDEX) or 0))
        t0 = time.time()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        t1 = time.time()
        seqs = out.sequences[:, width:].tolist()
        topk = None
        if self.k is not None and out.logits:
            logits = torch.stack(out.logits, dim=1).float()  # [B, T, V]
            lp = torch.log_softmax(logits, dim=-1)
            vals, idx = torch.topk(lp, k=min(self.k, lp.shape[-1]), dim=-1)
            topk = (idx.tolist(), vals.tolist())
        for i, r in enumerate(rows):
            toks = seqs[i]
            # Cut at the first eos (kept, as vLLM keeps it); what follows is padding.
            for j, t in enumerate(toks):
                if t in self.eos:
                    toks = toks[: j + 1]
                    break
            r[F.RESPONSE] = self.tok.decode(toks, skip_special_tokens=True)
            r[F.RESPONSE_TOKEN_IDS] = toks
            r[F.COMPLETION_TOKENS] = len(toks)
            r[F.FINISH_REASON] = common.finish_reason(
                toks,
                max_tokens=s.max_tokens,
                eos=self.eos,
                prompt_tokens=len(prompts[i]),
                max_model_len=self.max_model_len,
            )
            if s.stop and any(x in r[F.RESPONSE] for x in s.stop):
                r[F.FINISH_REASON] = "stop"
            if topk is not None:
                r[F.TOPK_TOKEN_IDS] = topk[0][i][: len(toks)]
                r[F.TOPK_LOGPROBS] = topk[1][i][: len(toks)]
            else:
                r[F.TOPK_TOKEN_IDS] = None
                r[F.TOPK_LOGPROBS] = None
            r[ERROR] = None
            r["_t0"], r["_t1"] = t0, t1


def generate(
    ds: ray.data.Dataset,
    teacher: HFTeacher,
    cfg: DistrayConfig,
    sampling: SamplingConfig,
    logprobs: int | None,
) -> ray.data.Dataset:
    """Answer every teacher row of `ds` with `teacher.concurrency` HF generator actors."""
    import ray.data

    common.load_tokenizer(teacher.model, teacher.trust_remote_code)  # a bad path fails here
    resources: dict[str, Any] = {"num_cpus": 1}
    if teacher.num_gpus_per_replica:
        resources["num_gpus"] = teacher.num_gpus_per_replica
    return ds.map_batches(
        HFGenerator,
        fn_constructor_kwargs={
            "model": teacher.model,
            "dtype": teacher.dtype,
            "trust_remote_code": teacher.trust_remote_code,
            "sampling": sampling.model_dump(),
            "logprobs": logprobs,
            "max_prompt_tokens": cfg.generate.max_prompt_tokens,
        },
        batch_format="pyarrow",
        batch_size=teacher.batch_size,
        compute=ray.data.ActorPoolStrategy(size=teacher.concurrency),
        **resources,
    )
