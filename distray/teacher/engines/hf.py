"""The `hf` teacher: batched transformers `generate` in Ray Data actors, for machines without vLLM.

    distray generate --config C teacher.kind=hf teacher.batch_size=32

Each actor loads the model once (on its GPU when it has one) and answers `batch_size` prompts
per `generate` call with left padding. Prompts are rendered exactly as the vllm teacher renders
them (`common.render_prompt`), top-k logprobs come from the raw logits (log-softmax at T=1,
as vLLM reports them), and finish_reason is judged from the ids (eos → stop, else length).
Stop strings end an answer as in vLLM: the ids keep the token that completed the stop string,
the text is cut before it, and finish_reason is stop.
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
        topk = _topk_per_step(out.logits, self.k) if self.k is not None and out.logits else None
        for i, r in enumerate(rows):
            toks = seqs[i]
            # Cut at the first eos (kept, as vLLM keeps it); what follows is padding.
            for j, t in enumerate(toks):
                if t in self.eos:
                    toks = toks[: j + 1]
                    break
            stopped = _cut_at_stop(self.tok, toks, s.stop) if s.stop else None
            if stopped is not None:
                toks, r[F.RESPONSE] = stopped
            else:
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
            if stopped is not None:
                r[F.FINISH_REASON] = "stop"
            if topk is not None:
                r[F.TOPK_TOKEN_IDS] = topk[0][i][: len(toks)]
                r[F.TOPK_LOGPROBS] = topk[1][i][: len(toks)]
            else:
                r[F.TOPK_TOKEN_IDS] = None
                r[F.TOPK_LOGPROBS] = None
            r[ERROR] = None
            r["_t0"], r["_t1"] = t0, t1


def _topk_per_step(logits: tuple[Any, ...], k: int) -> tuple[list[Any], list[Any]]:
    """Top-k token ids and log-probabilities (log-softmax at T=1) of each row at each step.

    One step at a time, so the extra memory is one [B, V] step, not a [B, T, V] stack (several
    GB at batch 16 with a 150k vocabulary).

    Args:
        logits: generate's `output_logits`, one [B, V] tensor of raw logits per step.
        k: how many of the best tokens to keep (at most V).

    Returns:
        `(ids, logprobs)` as nested lists [B][T][k], best first.
    """
    import torch

    ids, lps = [], []
    for step in logits:
        lp = torch.log_softmax(step.float(), dim=-1)
        vals, idx = torch.topk(lp, k=min(k, lp.shape[-1]), dim=-1)
        ids.append(idx)
        lps.append(vals)
    return torch.stack(ids, dim=1).tolist(), torch.stack(lps, dim=1).tolist()


def _cut_at_stop(tok: Any, toks: list[int], stop: list[str]) -> tuple[list[int], str] | None:
    """The ids up to the token that completed the first stop string and the text before it,
    as vLLM returns them; None when no stop string occurs in the answer.

    HF pads a row that stopped early, so the ids after that token are dropped.
    """

    def text(n: int) -> str:
        return str(tok.decode(toks[:n], skip_special_tokens=True))

    if not any(x in text(len(toks)) for x in stop):
        return None
    # The shortest prefix whose text holds a stop string; a longer prefix's text extends it.
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(x in text(mid) for x in stop):
            hi = mid
        else:
            lo = mid + 1
    kept = text(lo)
    return toks[:lo], kept[: min(kept.find(x) for x in stop if x in kept)]


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
