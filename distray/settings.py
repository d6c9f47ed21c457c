"""The one classification of every config field: answer-changing or speed-only.

    .venv/bin/python -m pytest tests/unit/test_settings.py -q

A setting is *speed-only* when changing it changes how fast, where, at what cost or with what
bookkeeping a stage runs, but never what it makes: the teacher rows, the student's weights,
the evaluation's figures. Every other setting is *answer-changing*. Both users of the table
read it from here:

- row ids and the content cache (`distray.teacher.rows`) leave speed-only teacher settings out,
  so a rerun with more replicas or less GPU memory resumes its rows;
- lineage (`distray.lineage`) leaves them out of the settings it records, so a speed-only
  change never blocks a resume or a skip.

    speed_only("teacher.concurrency")                          → True
    speed_only("teacher.engine_kwargs.gpu_memory_utilization") → True
    speed_only("train.lr")                                     → False

`tests/unit/test_settings.py` walks every field of `DistrayConfig` and fails when one is in
neither set, so a new field cannot be left unclassified. When in doubt a field is
answer-changing: a wrong "answer" costs a refusal (with a way out that deletes nothing), a wrong
"speed" costs a stale answer.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ANSWER", "SPEED_ONLY", "SPEED_ONLY_ENGINE_KWARGS", "answer_only", "classified", "speed_only",
    "teacher_speed_only_fields",
]

#: The teacher's settings (under `teacher.` and in each `teachers` entry) that change how an
#: answer is obtained but not what it says. One set for every kind: a field a kind lacks is
#: simply absent from its dump.
_TEACHER_SPEED = frozenset({
    "accelerator_type", "api_key_env", "backoff_base_s", "backoff_max_s", "batch_size",
    "concurrency", "max_in_flight", "max_retries", "max_retry_after_s", "min_success_ratio",
    "num_gpus_per_replica", "placement_group_config", "timeout_s", "trust_remote_code",
    "usd_per_1m_input_tokens", "usd_per_1m_output_tokens",
})
_TEACHER_ANSWER = frozenset({
    "apply_chat_template", "base_url", "dtype", "engine_kwargs", "extra_body", "kind", "model",
    "name",
})

#: vLLM `engine_kwargs` (teacher, evaluate, serve, on-policy) that size, place or speed up an
#: engine without changing its answers. Any other key is answer-changing.
SPEED_ONLY_ENGINE_KWARGS = frozenset({
    "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "enforce_eager",
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
    "distributed_executor_backend", "swap_space", "cpu_offload_gb", "enable_prefix_caching",
    "enable_chunked_prefill", "disable_log_stats", "block_size", "max_logprobs",
    "trust_remote_code", "download_dir", "compilation_config", "disable_custom_all_reduce",
    "max_seq_len_to_capture", "max_parallel_loading_workers",
})

SPEED_ONLY: frozenset[str] = frozenset({
    # where the run lives and which cluster runs it
    "run.name", "run.output_dir",
    "resources.env", "resources.num_cpus", "resources.ray_address", "resources.shared_filesystem",
    "tracking.mlflow.experiment", "tracking.mlflow.tracking_uri", "tracking.tensorboard",
    # generate: shard size, the shared cache's folder, the cost figure's price
    "generate.cache_dir", "generate.rows_per_shard", "generate.gpu_hour_usd",
    *(f"{t}.{f}" for t in ("teacher", "teachers") for f in _TEACHER_SPEED),
    # train: placement, offload and bookkeeping; the optimisation is the same
    "train.checkpoint_every_steps", "train.cpus_per_worker", "train.keep_checkpoints",
    "train.log_every_steps", "train.max_failures", "train.offload_optimizer",
    "train.offload_params", "train.report_every_steps", "train.use_gpu",
    "student.trust_remote_code",
    # on-policy: how fast the student's engines run (more rounds continue from the last one)
    "train.on_policy.batch_size", "train.on_policy.concurrency", "train.on_policy.rounds",
    "train.on_policy.schedule",
    # serve: where it listens and who may call it; replicas change bench's figures, so they
    # are not here
    "serve.access_log", "serve.api_key_env", "serve.detached", "serve.host", "serve.model_name",
    "serve.port",
    "bench.endpoints.api_key_env",
})

ANSWER: frozenset[str] = frozenset({
    "run.seed",
    "data.builtin.n_test", "data.builtin.n_train", "data.builtin.n_validation",
    "data.builtin.name", "data.builtin.seed", "data.max_rows", "data.rejects_format",
    "data.test", "data.train", "data.validation",
    "task.chain_of_thought", "task.labels", "task.prompt_template", "task.system_prompt",
    "task.type",
    *(f"{t}.{f}" for t in ("teacher", "teachers") for f in _TEACHER_ANSWER),
    "generate.filters.dedupe_responses", "generate.filters.drop_empty",
    "generate.filters.max_chars", "generate.filters.min_chars", "generate.filters.min_f1",
    "generate.filters.regex", "generate.filters.require_json", "generate.filters.truncated",
    "generate.filters.verifier", "generate.logprobs", "generate.max_prompt_tokens",
    "generate.sampling.max_tokens", "generate.sampling.n", "generate.sampling.seed",
    "generate.sampling.stop", "generate.sampling.temperature", "generate.sampling.top_p",
    "generate.splits",
    "student.from_teacher.calibration", "student.from_teacher.layers",
    "student.from_teacher.select", "student.lora.alpha", "student.lora.dropout",
    "student.lora.r", "student.lora.target_modules", "student.model", "student.tokenizer",
    # train: the optimisation itself. num_workers changes the batch when global_batch_size is
    # unset, zero_stage and precision the checkpoint format and numerics.
    "train.alpha", "train.deepspeed", "train.early_stopping_patience", "train.epochs",
    "train.eval_every_steps", "train.global_batch_size", "train.grad_clip", "train.loss",
    "train.lr", "train.max_seq_len", "train.max_steps", "train.micro_batch_size",
    "train.min_lr_ratio", "train.mode", "train.num_workers", "train.packing", "train.precision",
    "train.temperature", "train.validation_fraction", "train.warmup_steps",
    "train.weight_decay", "train.zero_stage",
    "train.on_policy.backend", "train.on_policy.engine_kwargs", "train.on_policy.eval_prompts",
    "train.on_policy.lmbda", "train.on_policy.prompts_per_round",
    "train.on_policy.sampling.max_tokens", "train.on_policy.sampling.n",
    "train.on_policy.sampling.seed", "train.on_policy.sampling.stop",
    "train.on_policy.sampling.temperature", "train.on_policy.sampling.top_p",
    "train.on_policy.steps_per_round",
    "evaluate.backend", "evaluate.baseline", "evaluate.engine_kwargs",
    "evaluate.equal_length_tokens", "evaluate.extra_models", "evaluate.fidelity", "evaluate.latency_samples",
    "evaluate.max_rows", "evaluate.max_tokens", "evaluate.measure_efficiency", "evaluate.models",
    "evaluate.regex", "evaluate.scorers",
    # serve and bench: what bench measures
    "serve.backend", "serve.body_read_timeout_s", "serve.downscale_delay_s",
    "serve.engine_kwargs", "serve.max_prompt_tokens",
    "serve.max_replicas", "serve.max_request_bytes", "serve.max_tokens_cap",
    "serve.min_replicas", "serve.model", "serve.serve_teacher",
    "serve.stream_batching_interval_ms", "serve.target_ongoing_requests",
    "serve.upscale_delay_s",
    "bench.concurrency", "bench.endpoints.base_url", "bench.endpoints.model",
    "bench.endpoints.name", "bench.ignore_eos", "bench.max_tokens", "bench.num_prompts",
    "bench.prompts", "bench.request_rates", "bench.rounds", "bench.timeout_s",
    "demo.baseline_epochs", "demo.baseline_labels", "demo.student_heads",
    "demo.student_hidden", "demo.student_layers", "demo.teacher_heads", "demo.teacher_hidden",
    "demo.teacher_layers", "demo.teacher_lr", "demo.teacher_steps", "demo.teacher_train_rows",
    "demo.train_teacher",
})

#: The leaf fields whose values are open dicts of an engine's own settings.
_ENGINE_KWARGS = ("engine_kwargs",)


def classified(path: str) -> bool:
    """True when `path` (dotted, list entries under their list's name) is in the table."""
    return path in SPEED_ONLY or path in ANSWER


def speed_only(path: str) -> bool:
    """True when changing the setting at `path` never changes what a stage makes.

    `path` is dotted (`teacher.concurrency`); inside an `engine_kwargs` dict the key decides
    (`serve.engine_kwargs.max_num_seqs`). An unclassified path is answer-changing.
    """
    if path in SPEED_ONLY:
        return True
    head, _, key = path.rpartition(".")
    if head.rsplit(".", 1)[-1] in _ENGINE_KWARGS and head in ANSWER:
        return key in SPEED_ONLY_ENGINE_KWARGS
    return False


def teacher_speed_only_fields() -> frozenset[str]:
    """The teacher fields (one kind's names, no prefix) that leave its answers unchanged."""
    return _TEACHER_SPEED


def answer_only(data: Any, prefix: str = "") -> Any:
    """A config dump (`model_dump(mode="json")`, or a part of it under `prefix`) with every
    speed-only setting removed, list entries (`teachers`) and engine_kwargs keys included."""
    if isinstance(data, list):
        return [answer_only(v, prefix) for v in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if speed_only(path):
            continue
        if path in ANSWER and k not in _ENGINE_KWARGS:
            out[k] = v  # a leaf: an open dict here (deepspeed, extra_body) is kept whole
        else:
            out[k] = answer_only(v, path)
    return out
