"""The `hf` teacher: batched transformers `generate` in Ray Data actors, for machines without vLLM.

    distray generate --config C teacher.kind=hf teacher.batch_size=32

Each actor loads the model once (on its GPU when it has one) and answers `batch_size` prompts
per `generate` call with left padding, through `distray.hf_engine.HFEngine` (shared with the
hf serve backend and evaluate). Prompts are rendered exactly as the vllm teacher renders them
(`prompts.render_prompt`), top-k logprobs come from the raw logits (log-softmax at T=1, as
vLLM reports them), and finish_reason is judged from the ids (eos → stop, else length).
Stop strings end an answer as in vLLM: the ids keep the token that completed the stop string,
the text is cut before it, and finish_reason is stop.
Seeds: one `torch.manual_seed(seed + first sample index)` per batch, so reruns repeat but a
row's sample depends on its batch-mates (unlike vLLM's per-request seeds).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from distray import formats as F
from distray import prompts
from distray.config import HFTeacher, SamplingConfig
from distray.engines import common
from distray.engines.base import Engine
from distray.engines.results import ERROR
from distray.engines.scoring import ROW
from distray.hf_engine import HFEngine

if TYPE_CHECKING:
    import ray.data

__all__ = ["ENGINE", "HFEngineKind", "HFGenerator", "HFScorer", "generate", "hf_scores"]


class HFGenerator:
    """A Ray Data callable class: one `HFEngine` per actor, one `generate` per batch."""

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
        self.model_path = model
        self.trust = trust_remote_code
        self.sampling = SamplingConfig(**sampling)
        self.k = logprobs
        self.max_prompt_tokens = max_prompt_tokens
        self.apply_chat_template = apply_chat_template
        self.engine = HFEngine(model, dtype=dtype, trust_remote_code=trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = common.prepare_rows(
            batch.to_pylist(),
            model=self.model_path,
            trust_remote_code=self.trust,
            apply_chat_template=self.apply_chat_template,
            max_prompt_tokens=self.max_prompt_tokens,
            max_model_len=self.engine.max_model_len,
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
        s = self.sampling
        prompt_ids = [r["_prompt_token_ids"] for r in rows]
        seed = None if s.seed is None else s.seed + int(rows[0].get(F.SAMPLE_INDEX) or 0)
        t0 = time.time()
        answers = self.engine.generate(
            prompt_ids,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            stop=list(s.stop) if s.stop else None,
            seed=seed,
            logprobs=self.k,
        )
        t1 = time.time()
        for r, p, a in zip(rows, prompt_ids, answers, strict=True):
            r[F.RESPONSE] = a.text
            r[F.RESPONSE_TOKEN_IDS] = a.token_ids
            r[F.COMPLETION_TOKENS] = len(a.token_ids)
            r[F.FINISH_REASON] = "stop" if a.stopped else common.finish_reason(
                a.token_ids,
                max_tokens=s.max_tokens,
                eos=self.engine.eos,
                prompt_tokens=len(p),
                max_model_len=self.engine.max_model_len,
            )
            r[F.TOPK_TOKEN_IDS] = a.topk_token_ids
            r[F.TOPK_LOGPROBS] = a.topk_logprobs
            r[ERROR] = None
            r["_t0"], r["_t1"] = t0, t1


def generate(
    ds: ray.data.Dataset,
    teacher: HFTeacher,
    sampling: SamplingConfig,
    logprobs: int | None,
    *,
    max_prompt_tokens: int | None = None,
) -> ray.data.Dataset:
    """Answer every teacher row of `ds` with `teacher.concurrency` HF generator actors."""
    import ray.data

    prompts.load_tokenizer(teacher.model, teacher.trust_remote_code)  # a bad path fails here
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
            "max_prompt_tokens": max_prompt_tokens,
        },
        batch_format="pyarrow",
        batch_size=teacher.batch_size,
        compute=ray.data.ActorPoolStrategy(size=teacher.concurrency),
        **resources,
    )


class HFScorer:
    """One transformers forward per row: the same numbers as vLLM's prompt logprobs."""

    def __init__(self, model: str, trust_remote_code: bool, k: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.k = k
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        out = []
        for r in batch.to_pylist():
            if r.get(ERROR):
                out.append({ROW: r[ROW], ERROR: r[ERROR], "_scores": None})
                continue
            ids, n = [int(t) for t in r["_ids"]], int(r["_n_prompt"])
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[n - 1 : len(ids) - 1], -1)
            top_lp, top_ids = lp.topk(self.k, -1)
            own = lp.gather(-1, torch.tensor(ids[n:]).unsqueeze(-1)).squeeze(-1)
            scores = (top_ids.tolist(), top_lp.tolist(), own.tolist())
            out.append({ROW: r[ROW], ERROR: None, "_scores": json.dumps(scores)})
        return pa.Table.from_pylist(
            out, schema=pa.schema([(ROW, pa.string()), (ERROR, pa.string()), ("_scores", pa.string())])
        )


def hf_scores(prepared: Any, scorer: HFTeacher, k: int) -> Any:
    """Score prepared rows (see the module docstring) with transformers actors; lazy."""
    return prepared.map_batches(
        HFScorer,
        fn_constructor_kwargs={"model": scorer.model, "trust_remote_code": scorer.trust_remote_code, "k": k},
        batch_format="pyarrow",
        batch_size=scorer.batch_size,
        concurrency=scorer.concurrency,
        num_gpus=scorer.num_gpus_per_replica or None,
    )


class HFEngineKind(Engine):
    """`teacher.kind: hf`: transformers generate in Ray Data actors."""

    kind = "hf"
    config: HFTeacher

    def generate(
        self, ds: ray.data.Dataset, sampling: SamplingConfig, logprobs: int | None, *,
        max_prompt_tokens: int | None = None,
    ) -> ray.data.Dataset:
        return generate(ds, self.config, sampling, logprobs, max_prompt_tokens=max_prompt_tokens)

    def score(self, prepared: ray.data.Dataset, k: int) -> ray.data.Dataset:
        return hf_scores(prepared, self.config, k)

    def gpus(self, on_gpu: bool, *, min_replicas: bool = False) -> float:
        return float(self.config.concurrency * self.config.num_gpus_per_replica) if on_gpu else 0.0


ENGINE = HFEngineKind
