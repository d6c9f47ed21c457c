"""The one typed config every stage and every Ray worker receives.

    distray config show jobs/configs/quickstart.yaml train.lr=3e-5

A config is a YAML file of sections (`run`, `task`, `data`, `teacher`/`teachers`, `generate`,
`student`, `train`, `evaluate`, `serve`, `bench`, `resources`, `demo`). It is loaded and validated
once on the driver (`load_config`), written into the run folder as `config.resolved.yaml`, and
passed unchanged to the stages. Dotted overrides (`train.lr=1e-5`) are applied before validation.
Unknown keys fail with their path and the closest valid names; cross-field checks fail at load.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distray.errors import ConfigError

__all__ = [
    "DistrayConfig",
    "RunConfig",
    "TaskConfig",
    "DataConfig",
    "VLLMTeacher",
    "OpenAITeacher",
    "HFTeacher",
    "TeacherConfig",
    "SamplingConfig",
    "FilterConfig",
    "GenerateConfig",
    "LoraConfig",
    "StudentConfig",
    "TrainConfig",
    "EvaluateConfig",
    "ServeConfig",
    "EndpointConfig",
    "BenchConfig",
    "ResourcesConfig",
    "DemoConfig",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "apply_overrides",
    "dump_config",
    "write_resolved",
]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------
# run / task / data
# --------------------------------------------------------------------------------------------


class RunConfig(Section):
    name: str = Field(
        default="distray-run", description="Run name; the run folder is <output_dir>/<name>."
    )
    output_dir: str = Field(
        default="runs",
        description="Where run folders go. Local path or a cloud URI (s3://, gs://); on a "
        "multi-node cluster it must be shared storage.",
    )
    seed: int = Field(default=0, description="Seed for data splits, sampling and training.")

    @property
    def dir(self) -> str:
        """The run folder: `<output_dir>/<name>`."""
        return f"{self.output_dir.rstrip('/')}/{self.name}"


TaskType = Literal["custom", "nli", "conversation", "qa", "math", "summarization"]


class TaskConfig(Section):
    type: TaskType = Field(
        default="custom",
        description="Task preset. A preset fills defaults (prompt template, output validation, "
        "scorers); every value it sets can still be overridden.",
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt added before each prompt."
    )
    prompt_template: str = Field(
        default="{prompt}",
        description="Template for `prompt`-form rows; `{prompt}` is the input text.",
    )
    chain_of_thought: bool = Field(
        default=False,
        description="Ask the teacher to reason step by step before the final answer "
        "(as Azure's enable_chain_of_thought).",
    )
    labels: list[str] | None = Field(
        default=None,
        description="Allowed answers for classification tasks (NLI), e.g. [entailment, ...].",
    )


class BuiltinTaskData(Section):
    name: Literal["reverse", "date", "sentiment"] = Field(
        ..., description="Built-in synthetic task (see `distray data make-task --help`)."
    )
    n_train: int = Field(default=4000, ge=1, description="Training prompts to generate.")
    n_validation: int = Field(default=200, ge=0, description="Validation prompts to generate.")
    n_test: int = Field(default=200, ge=1, description="Test prompts to generate.")
    seed: int = Field(default=0, description="Generator seed; the same seed gives the same files.")


class DataConfig(Section):
    train: str | None = Field(
        default=None,
        description="Training prompts: JSONL or Parquet file or folder, local or a URI that "
        "pyarrow/fsspec opens. Rows are {messages: [...]} or {prompt: ...}, optional id/reference.",
    )
    validation: str | None = Field(
        default=None, description="Validation prompts (same format), optional."
    )
    test: str | None = Field(
        default=None, description="Held-out test prompts for evaluate and bench."
    )
    builtin: BuiltinTaskData | None = Field(
        default=None,
        description="Generate a built-in synthetic task into <run>/data/; train/validation/test "
        "then point at the generated files (set by `distray.pipeline.resolve`).",
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="Use at most this many training rows."
    )
    rejects_format: Literal["parquet", "jsonl"] = Field(
        default="jsonl", description="File format of rejected rows."
    )


# --------------------------------------------------------------------------------------------
# teachers
# --------------------------------------------------------------------------------------------


class _TeacherBase(Section):
    model: str = Field(..., description="Model: a local folder, a hub id, or an API model name.")
    name: str | None = Field(
        default=None,
        description="Label stored in the `teacher` column; defaults to the model's name.",
    )

    @property
    def label(self) -> str:
        """The name written into the `teacher` column."""
        return self.name or Path(self.model.rstrip("/")).name


class VLLMTeacher(_TeacherBase):
    kind: Literal["vllm"] = Field(default="vllm", description="Local vLLM engine actors (the default kind).")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to vLLM unchanged (tensor_parallel_size, pipeline_parallel_size, "
        "max_model_len, dtype, enforce_eager, ...).",
    )
    concurrency: int | tuple[int, int] = Field(
        default=1, description="Engine replicas: a fixed number, or [min, max] to autoscale."
    )
    batch_size: int = Field(
        default=64, ge=1, description="Rows per batch sent to an engine replica."
    )
    num_gpus_per_replica: float | None = Field(
        default=None,
        description="GPUs per replica; default tensor_parallel_size × pipeline_parallel_size on "
        "GPU clusters, 0 on CPU.",
    )
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type, e.g. H100."
    )
    placement_group_config: dict[str, Any] | None = Field(
        default=None,
        description="Ray placement group per replica; default GPU bundles on GPU, "
        '{"bundles": [{"CPU": 1}]} on CPU.',
    )
    apply_chat_template: bool = Field(default=True, description="Apply the model's chat template.")
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the model folder."
    )


class OpenAITeacher(_TeacherBase):
    kind: Literal["openai"] = "openai"
    base_url: str = Field(
        default="https://api.openai.com/v1", description="OpenAI-compatible base URL (ends in /v1)."
    )
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY",
        description="Name of the environment variable holding the API key.",
    )
    max_in_flight: int = Field(default=16, ge=1, description="Most requests in flight at once.")
    max_retries: int = Field(default=6, ge=0, description="Retries on 429, 5xx and timeouts.")
    timeout_s: float = Field(default=60.0, gt=0, description="Timeout of one request.")
    backoff_base_s: float = Field(
        default=0.5, gt=0, description="First retry delay; doubles, plus jitter."
    )
    backoff_max_s: float = Field(default=30.0, gt=0, description="Longest retry delay.")
    min_success_ratio: float = Field(
        default=0.7,
        ge=0,
        le=1,
        description="Stop the run when fewer requests than this succeed (Azure's default 0.7).",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fields merged into every request body, e.g. "
        "{return_tokens_as_token_ids: true} so a vLLM endpoint returns logprob token ids "
        "(needed for a logit loss; distray does not send it by itself, OpenAI's API rejects it).",
    )
    usd_per_1m_input_tokens: float = Field(
        default=0.0, ge=0, description="Price, for the cost figure."
    )
    usd_per_1m_output_tokens: float = Field(
        default=0.0, ge=0, description="Price, for the cost figure."
    )


class HFTeacher(_TeacherBase):
    kind: Literal["hf"] = "hf"
    batch_size: int = Field(default=16, ge=1, description="Prompts per batched generate call.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights."
    )
    concurrency: int = Field(default=1, ge=1, description="Generator actors.")
    num_gpus_per_replica: float = Field(default=0.0, ge=0, description="GPUs per actor.")
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the model folder."
    )


TeacherConfig = Annotated[VLLMTeacher | OpenAITeacher | HFTeacher, Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


class SamplingConfig(Section):
    temperature: float = Field(default=0.0, ge=0, le=5, description="0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=256, ge=1, description="Most tokens per answer.")
    n: int = Field(default=1, ge=1, le=64, description="Samples per prompt (each its own row).")
    seed: int | None = Field(default=0, description="Sampling seed; None for random.")
    stop: list[str] | None = Field(default=None, description="Stop strings.")


Verifier = Literal["none", "numeric", "exact", "label", "contains", "f1"]


class FilterConfig(Section):
    drop_empty: bool = Field(default=True, description="Reject empty or whitespace-only answers.")
    truncated: Literal["drop", "keep"] = Field(
        default="drop",
        description="What to do with answers cut at max_tokens (finish_reason=length).",
    )
    min_chars: int = Field(default=0, ge=0, description="Reject shorter answers.")
    max_chars: int | None = Field(default=None, ge=1, description="Reject longer answers.")
    regex: str | None = Field(
        default=None, description="A regex the answer must match (re.search)."
    )
    require_json: bool = Field(default=False, description="The answer must parse as JSON.")
    dedupe_responses: bool = Field(
        default=False,
        description="Reject an answer identical to an earlier one for another prompt.",
    )
    verifier: Verifier = Field(
        default="none",
        description="Check against `reference`: numeric (final number), exact, label (one of "
        "task.labels, and equal to the reference when present), contains, f1 (token F1 ≥ "
        "min_f1). Checks against the reference are skipped for rows without one.",
    )
    min_f1: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Least token F1 against the reference for verifier `f1` (QA).",
    )


def _default_splits() -> list[Literal["train", "validation"]]:
    return ["train", "validation"]


class GenerateConfig(Section):
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling.")
    logprobs: int | None = Field(
        default=None,
        ge=1,
        le=20,
        description="Store the teacher's top-k logprobs (k) for logit KD.",
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Reject prompts longer than this (tokens); default: no limit.",
    )
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Output validation.")
    cache_dir: str | None = Field(
        default=None,
        description="Content-addressed answer cache shared between runs (same prompt, teacher "
        "and sampling reuse the answer).",
    )
    rows_per_shard: int = Field(
        default=1024, ge=1, description="Rows per written Parquet shard (at most)."
    )
    gpu_hour_usd: float = Field(default=0.0, ge=0, description="$/GPU-hour, for the cost figure.")
    splits: list[Literal["train", "validation"]] = Field(
        default_factory=_default_splits,
        description="Which data splits the teacher labels.",
    )


# --------------------------------------------------------------------------------------------
# student / train
# --------------------------------------------------------------------------------------------


class LoraConfig(Section):
    r: int = Field(default=16, ge=1, description="LoRA rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA alpha.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | str = Field(
        default="all-linear", description="Modules to adapt (peft's target_modules)."
    )


class StudentConfig(Section):
    model: str = Field(..., description="Student model: a local Hugging Face folder.")
    tokenizer: str | None = Field(
        default=None, description="Tokenizer folder; default the model's."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the model folder."
    )
    lora: LoraConfig | None = Field(
        default=None, description="Train LoRA adapters; merged at export."
    )


LossName = Literal["sft", "kd", "reverse_kl", "jsd"]


class TrainConfig(Section):
    loss: LossName = Field(
        default="sft",
        description="sft: cross-entropy on the teacher's text. kd/reverse_kl/jsd: logit "
        "distillation on the teacher's top-k logprobs, mixed as alpha·logit + (1−alpha)·sft.",
    )
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="Weight of the logit loss in the mix."
    )
    temperature: float = Field(
        default=1.0, gt=0, description="Distillation temperature T (loss × T²)."
    )
    lr: float = Field(default=2e-5, gt=0, lt=1, description="Peak learning rate.")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Cosine floor as a fraction of lr."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    epochs: int = Field(default=1, ge=1, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps."
    )
    micro_batch_size: int = Field(
        default=4, ge=1, description="Sequences per worker per forward pass."
    )
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Sequences per optimizer step over all workers; default micro × workers. "
        "Gradient accumulation = global / (micro × workers).",
    )
    max_seq_len: int = Field(
        default=512, ge=8, description="Truncate prompt+answer to this many tokens."
    )
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Gradient-norm clip; None disables."
    )
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (processes).")
    use_gpu: bool | None = Field(
        default=None, description="None: use GPUs when the cluster has them."
    )
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs per training worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(
        default=False, description="ZeRO optimizer state offload to CPU."
    )
    offload_params: bool = Field(default=False, description="ZeRO-3 parameter offload to CPU.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Training precision."
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed config, merged over distray's (DeepSpeed's own names).",
    )
    validation_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Held-out fraction when no validation data is given."
    )
    log_every_steps: int = Field(default=10, ge=1, description="One log line every N steps.")
    report_every_steps: int = Field(default=50, ge=1, description="ray.train.report every N steps.")
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Validation loss every N steps."
    )
    checkpoint_every_steps: int | None = Field(
        default=None, ge=1, description="Checkpoint every N steps (and always at epoch end)."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept by Ray Train.")
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        description="Stop after N evaluations without validation-loss improvement.",
    )
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts (FailureConfig).")
    packing: bool = Field(
        default=False, description="Pack several short examples into one sequence."
    )

    @property
    def is_logit_loss(self) -> bool:
        """True when the loss needs the teacher's logprobs."""
        return self.loss != "sft"


# --------------------------------------------------------------------------------------------
# evaluate / serve / bench
# --------------------------------------------------------------------------------------------

ScorerName = Literal[
    "exact_match",
    "numeric",
    "choice",
    "regex",
    "bleu",
    "rouge_l",
    "f1",
    "teacher_agreement",
]


def _default_scorers() -> list[ScorerName]:
    return ["exact_match"]


def _default_models() -> list[Literal["teacher", "student", "baseline"]]:
    return ["teacher", "student", "baseline"]


class EvaluateConfig(Section):
    scorers: list[ScorerName] = Field(
        default_factory=_default_scorers, description="Scorers run on every model."
    )
    regex: str | None = Field(default=None, description="Pattern for the `regex` scorer.")
    models: list[Literal["teacher", "student", "baseline"]] = Field(
        default_factory=_default_models,
        description="Which models to compare.",
    )
    baseline: str | None = Field(
        default=None,
        description="Baseline model folder; default the student before distillation "
        "(student.model).",
    )
    backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="Engine for local models (the API teacher always uses its API)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM settings for the evaluated local models."
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="Evaluate at most this many test rows."
    )
    max_tokens: int = Field(default=128, ge=1, description="Most tokens per answer.")
    latency_samples: int = Field(
        default=20, ge=1, description="Single-request latency: median of N."
    )
    measure_efficiency: bool = Field(
        default=True,
        description="Measure memory, latency and throughput of each local model in a fresh "
        "process (one extra engine load per model); false keeps only the scores.",
    )


class ServeConfig(Section):
    host: str = Field(
        default="127.0.0.1", description="Bind address; 0.0.0.0 exposes it to the network."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    api_key_env: str | None = Field(
        default=None,
        description="Env var with the API key clients must send as Bearer; None: open.",
    )
    backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="Engine behind the endpoint."
    )
    model: str | None = Field(
        default=None, description="Model folder; default the exported student."
    )
    model_name: str = Field(default="student", description="Model id clients send in requests.")
    serve_teacher: bool = Field(
        default=False, description="Also deploy the teacher (as `teacher`)."
    )
    min_replicas: int = Field(default=1, ge=0, description="Serve autoscaling: fewest replicas.")
    max_replicas: int = Field(default=1, ge=1, description="Serve autoscaling: most replicas.")
    target_ongoing_requests: int = Field(default=16, ge=1, description="Serve autoscaling target.")
    max_tokens_cap: int = Field(
        default=1024, ge=1, description="Requests asking for more are rejected."
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Longest accepted prompt."
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM settings.")
    detached: bool = Field(default=False, description="Return once deployed instead of blocking.")
    stream_batching_interval_ms: float | None = Field(
        default=None,
        ge=0,
        description="Ray Serve LLM groups streamed tokens for this long before sending them "
        "(fewer messages at high load, later first token); 0 sends each token at once. "
        "None: Ray's default (50 ms). vllm backend only.",
    )
    access_log: bool = Field(
        default=False,
        description="One log line per request in every Serve replica (Ray Serve's access "
        "log, shipped through Ray's log pipeline); off by default.",
    )


class EndpointConfig(Section):
    name: str = Field(..., description="Label in the report (student, teacher, ...).")
    base_url: str = Field(..., description="OpenAI-compatible base URL ending in /v1.")
    model: str = Field(..., description="Model id to send.")
    api_key_env: str | None = Field(default=None, description="Env var with the API key.")


class BenchConfig(Section):
    endpoints: list[EndpointConfig] = Field(
        default_factory=list,
        description="Endpoints to measure; default the ones `serve` deploys for this run.",
    )
    concurrency: list[int] = Field(
        default_factory=lambda: [1, 4, 16], description="Concurrency sweep (closed loop)."
    )
    request_rates: list[float] = Field(
        default_factory=list, description="Poisson request-rate sweep (req/s), optional."
    )
    num_prompts: int = Field(default=64, ge=1, description="Requests per sweep point.")
    max_tokens: int = Field(default=64, ge=1, description="Output tokens per request.")
    prompts: str | None = Field(
        default=None,
        description="Prompt file; default the run's test data, else generated prompts.",
    )
    timeout_s: float = Field(default=120.0, gt=0, description="Per-request timeout.")
    ignore_eos: bool = Field(
        default=True,
        description="Send vLLM's `ignore_eos` so every answer has exactly max_tokens tokens "
        "(stable TPOT and throughput); set false for servers that reject unknown fields.",
    )


class ResourcesConfig(Section):
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join; None uses RAY_ADDRESS or starts a local Ray.",
    )
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="Logical CPUs for a local Ray (Serve needs more than engines).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for every Ray worker. Values of secret-looking "
        "names (TOKEN, KEY, SECRET, PASSWORD) show as <redacted> in config.resolved.yaml; "
        "HF_TOKEN and the teachers' api_key_env pass through from the driver's environment.",
    )


class DemoConfig(Section):
    """The quickstart's stand-in teacher: a small model distray trains itself on a built-in task."""

    train_teacher: bool = Field(
        default=False,
        description="Train the stand-in teacher on the built-in task's ground truth when "
        "teacher.model does not exist yet (cached for later runs).",
    )
    teacher_layers: int = Field(default=4, ge=1, description="Stand-in teacher layers.")
    teacher_hidden: int = Field(default=256, ge=32, description="Stand-in teacher hidden size.")
    teacher_heads: int = Field(default=8, ge=1, description="Stand-in teacher attention heads.")
    teacher_train_rows: int = Field(
        default=20000, ge=1, description="Ground-truth rows for the teacher."
    )
    teacher_steps: int = Field(default=500, ge=1, description="Teacher training steps.")
    teacher_lr: float = Field(default=3e-3, gt=0, description="Teacher learning rate.")
    student_layers: int = Field(
        default=2, ge=1, description="Student layers (make the student folder)."
    )
    student_hidden: int = Field(default=128, ge=32, description="Student hidden size.")
    student_heads: int = Field(default=4, ge=1, description="Student attention heads.")
    baseline_labels: int = Field(
        default=200, ge=1, description="Ground-truth labels the baseline student is trained on."
    )
    baseline_epochs: int = Field(
        default=40,
        ge=1,
        description="Epochs over the baseline's few labels (it sees them many times).",
    )


# --------------------------------------------------------------------------------------------
# the whole config
# --------------------------------------------------------------------------------------------


class DistrayConfig(Section):
    """The whole run: every stage reads its section and nothing else is passed around."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name and folder.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Task preset and prompt.")
    data: DataConfig = Field(default_factory=DataConfig, description="Input prompt data.")
    teacher: TeacherConfig | None = Field(
        default=None, description="The teacher (kind: vllm/openai/hf)."
    )
    teachers: list[TeacherConfig] = Field(
        default_factory=list, description="Several teachers (multi-teacher generation)."
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Generation.")
    student: StudentConfig | None = Field(default=None, description="The student model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="Load benchmark.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray.")
    demo: DemoConfig = Field(default_factory=DemoConfig, description="Quickstart stand-ins.")

    @model_validator(mode="before")
    @classmethod
    def _apply_task_preset(cls, data: Any) -> Any:
        # A preset fills defaults underneath what the user wrote, so every value stays
        # overridable. Imported lazily: tasks.py imports nothing from here at module level.
        if isinstance(data, dict):
            task_type = (data.get("task") or {}).get("type", "custom")
            from distray.tasks import preset_defaults

            preset = preset_defaults(task_type)
            if preset:
                data = _deep_merge(preset, data)
            # `kind` defaults to vllm, the common case (a local or hub model on engine actors).
            if isinstance(data.get("teacher"), dict) and "kind" not in data["teacher"]:
                data = {**data, "teacher": {"kind": "vllm", **data["teacher"]}}
            if isinstance(data.get("teachers"), list):
                data = {
                    **data,
                    "teachers": [
                        {"kind": "vllm", **t} if isinstance(t, dict) and "kind" not in t else t
                        for t in data["teachers"]
                    ],
                }
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> DistrayConfig:
        if self.teacher is not None and self.teachers:
            raise ValueError("set `teacher` (one) or `teachers` (several), not both")
        labels = [t.label for t in self.all_teachers]
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"`teachers` labels must be unique, got {labels}; give each a distinct `name`"
            )
        tr = self.train
        if tr.global_batch_size is not None:
            per_step = tr.micro_batch_size * tr.num_workers
            if tr.global_batch_size % per_step:
                raise ValueError(
                    f"`train.global_batch_size` ({tr.global_batch_size}) must be divisible by "
                    f"micro_batch_size × num_workers ({tr.micro_batch_size} × {tr.num_workers} "
                    f"= {per_step})"
                )
        if tr.is_logit_loss:
            if self.generate.logprobs is None:
                raise ValueError(
                    f"`train.loss` ({tr.loss}) distils from the teacher's logprobs, but "
                    "`generate.logprobs` is not set; set generate.logprobs: 5 (top-k) or use "
                    "train.loss: sft"
                )
            if any(t.kind == "openai" for t in self.all_teachers) and self.generate.logprobs > 5:
                raise ValueError(
                    f"`generate.logprobs` ({self.generate.logprobs}) is above 5, the most "
                    "OpenAI-compatible APIs return (top_logprobs ≤ 5 on many); lower it"
                )
            for i, t in enumerate(self.all_teachers):
                # Logprobs over HTTP come back as token strings; only a vLLM endpoint asked for
                # `token_id:<n>` gives the ids a logit loss needs (engines/openai.py).
                if not isinstance(t, OpenAITeacher):
                    continue
                tokens_as_ids = t.extra_body.get("return_tokens_as_token_ids")
                if tokens_as_ids is not True:
                    at = f"teachers.{i}" if self.teachers else "teacher"
                    raise ValueError(
                        f"`train.loss` ({tr.loss}) needs the teacher's token ids, but "
                        f"`{at}.extra_body.return_tokens_as_token_ids` is {tokens_as_ids!r}, so "
                        f"openai teacher `{t.label}` returns logprobs as text; for a vLLM "
                        f"endpoint set {at}.extra_body: {{return_tokens_as_token_ids: true}}, "
                        "else use train.loss: sft"
                    )
        if tr.offload_params and tr.zero_stage != 3:
            raise ValueError(
                f"`train.offload_params` needs ZeRO stage 3, got `train.zero_stage` "
                f"({tr.zero_stage}); set train.zero_stage: 3 or offload_params: false"
            )
        if tr.zero_stage == 0 and (tr.offload_optimizer or tr.offload_params):
            raise ValueError("`train.offload_optimizer` needs `train.zero_stage` ≥ 1")
        if self.serve.min_replicas > self.serve.max_replicas:
            raise ValueError(
                f"`serve.min_replicas` ({self.serve.min_replicas}) must be ≤ "
                f"`serve.max_replicas` ({self.serve.max_replicas})"
            )
        if "regex" in self.evaluate.scorers and not self.evaluate.regex:
            raise ValueError("`evaluate.scorers` has `regex` but `evaluate.regex` is not set")
        if "choice" in self.evaluate.scorers and not self.task.labels:
            # choice works on letters too; labels only narrow it, so this is fine.
            pass
        if self.generate.filters.verifier == "label" and not self.task.labels:
            raise ValueError(
                "`generate.filters.verifier` is `label` but `task.labels` is empty; "
                "list the allowed answers in task.labels"
            )
        for t in self.all_teachers:
            if isinstance(t, VLLMTeacher) and isinstance(t.concurrency, tuple):
                lo, hi = t.concurrency
                if not 1 <= lo <= hi:
                    raise ValueError(
                        f"`teacher.concurrency` ({list(t.concurrency)}) must be [min, max] with "
                        "1 ≤ min ≤ max"
                    )
        return self

    @property
    def all_teachers(self) -> list[VLLMTeacher | OpenAITeacher | HFTeacher]:
        """`teachers`, or `[teacher]`, or [] when neither is set."""
        if self.teachers:
            return list(self.teachers)
        return [self.teacher] if self.teacher is not None else []

    @property
    def run_dir(self) -> str:
        """The run folder `<output_dir>/<run.name>`."""
        return self.run.dir


# --------------------------------------------------------------------------------------------
# loading, overrides, errors
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["train.lr=1e-5", "teacher.kind=hf"]` into a nested dict.

    Values are parsed as YAML scalars/flow collections (`1e-5` → float, `[1,4]` → list,
    `null` → None).

    Raises:
        ConfigError: an item has no `=` or an empty key.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not key=value; write it as e.g. train.lr=1e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override `{item}` has an empty key; write it as section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        # YAML reads 1e-5 as a string (no dot); numbers are what users mean.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{item}` sets inside `{p}`, which is not a section")
        node[parts[-1]] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return `data` with dotted `key=value` overrides merged in."""
    return _deep_merge(data, parse_overrides(overrides))


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Follow a pydantic error location to the model class that owns its last key."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            # discriminated-union tag (vllm/openai/hf) appears in the location
            for cls in (VLLMTeacher, OpenAITeacher, HFTeacher):
                if cls.model_fields["kind"].default == part:
                    current = cls
                    break
            else:
                return None
            continue
        current = _unwrap_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    """The BaseModel class inside `X | None`, `list[X]`, `Annotated[...]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(
            str(p) for p in loc if not (isinstance(p, str) and p in ("vllm", "openai", "hf"))
        )
        if e["type"] == "extra_forbidden":
            owner = _model_at(DistrayConfig, loc)
            names = list(owner.model_fields) if owner else []
            key = str(loc[-1])
            # Prefix matches first (`lr_rate` → `lr`), then spelling neighbours (`lrr` → `lr`).
            prefix = [n for n in names if key.startswith(n + "_") or n.startswith(key)]
            close = prefix + [
                n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.6) if n not in prefix
            ]
            close = close[:3]
            hint = (
                "did you mean "
                + " or ".join(f"`{'.'.join(path.split('.')[:-1] + [c])}`" for c in close)
                + "?"
                if close
                else f"valid names here: {', '.join(names)}"
            )
            lines.append(f"`{path}` is not a setting; {hint}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            got = e.get("input", {}).get("kind") if isinstance(e.get("input"), dict) else None
            what = f"is {got!r}" if got is not None else "is missing"
            lines.append(
                f"`{path}.kind` {what}; set it to vllm (local engines), openai (an "
                "OpenAI-compatible API) or hf (transformers)"
            )
        elif e["type"] == "value_error" or not path:
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            lines.append(msg if not path else f"`{path}`: {msg}")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"`{path}` ({got_s}): {e['msg']}")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "(dict)") -> DistrayConfig:
    """Validate a plain dict into a `DistrayConfig`.

    Raises:
        ConfigError: with one line per problem, each naming the field, the value and the fix.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"config {source} must be a mapping of sections, got {type(data).__name__}"
        )
    try:
        return DistrayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from e


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> DistrayConfig:
    """Load a YAML config, apply dotted overrides, validate.

    Args:
        path: YAML file; None starts from defaults.
        overrides: `section.key=value` strings.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types, contradictions.
    """
    data: dict[str, Any] = {}
    source = "(defaults)"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file `{p}` does not exist; pass a YAML file, e.g. jobs/configs/quickstart.yaml"
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file `{p}` is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file `{p}` must hold a mapping of sections")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data, source)


#: Parts of an env var name that mark its value as a secret.
_SECRET_NAME_PARTS = ("TOKEN", "KEY", "SECRET", "PASSWORD")

_REDACTED = "<redacted>"


def _is_secret_name(name: str) -> bool:
    """True for an env var name like HF_TOKEN, OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY."""
    return any(part in name.upper() for part in _SECRET_NAME_PARTS)


def dump_config(cfg: DistrayConfig, *, redact: bool = True) -> str:
    """The resolved config as YAML (every field, defaults included).

    Args:
        cfg: the config.
        redact: show `resources.env` values with a secret-looking name as `<redacted>`, so
            config.resolved.yaml holds no tokens; False keeps them (a config shipped to a job
            that needs them). `resources` is no stage's input (pipeline.changed_settings), so a
            redacted file still tells a rerun which stages are stale.
    """
    data = cfg.model_dump(mode="json")
    if redact:
        env = data["resources"]["env"]
        data["resources"]["env"] = {
            k: _REDACTED if _is_secret_name(k) else v for k, v in env.items()
        }
    return yaml.safe_dump(data, sort_keys=False)


def write_resolved(cfg: DistrayConfig) -> str:
    """Write `config.resolved.yaml` into the run folder (local or cloud URI) and return its path."""
    from distray.formats import write_text

    path = f"{cfg.run_dir}/config.resolved.yaml"
    write_text(path, dump_config(cfg))
    return path
