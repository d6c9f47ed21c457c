"""Config sections for the stages: generate, student/train, evaluate, resources, demo (serve and
bench are in `distray.config.serving`, re-exported here)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from distray.config.base import Section
from distray.config.serving import BenchConfig, EndpointConfig, ServeConfig

__all__ = [
    "MLflowConfig",
    "TrackingConfig",
    "FromTeacherConfig",
    "SamplingConfig",
    "Verifier",
    "FilterConfig",
    "GenerateConfig",
    "LoraConfig",
    "StudentConfig",
    "LossName",
    "OnPolicyConfig",
    "TrainConfig",
    "ScorerName",
    "EvaluateConfig",
    "ServeConfig",
    "EndpointConfig",
    "BenchConfig",
    "ResourcesConfig",
    "DemoConfig",
]

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
        "and sampling reuse the answer; a run the cache answers in full starts no teacher engine).",
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


class FromTeacherConfig(Section):
    layers: int = Field(..., ge=1, description="Decoder layers the student keeps.")
    select: Literal["uniform", "block-influence"] = Field(
        default="uniform",
        description="uniform: evenly spaced layers (first and last kept); block-influence: drop "
        "the layers that change their hidden state least on calibration prompts (ShortGPT).",
    )
    calibration: str | None = Field(
        default=None, description="Prompt file for block-influence; default built-in prompts."
    )


class StudentConfig(Section):
    model: str = Field(
        default="",
        description="Student model: a local Hugging Face folder, a hub id, or an offline alias "
        "(`distray models list`); filled in by `from_teacher`.",
    )
    from_teacher: FromTeacherConfig | None = Field(
        default=None,
        description="Make the student from the teacher by depth pruning, once, into "
        "<run>/student-init (shares the teacher's tokenizer, so logit KD applies).",
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer folder; default the model's."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the model folder."
    )
    lora: LoraConfig | None = Field(
        default=None, description="Train LoRA adapters; merged at export."
    )

    @model_validator(mode="after")
    def _model_or_from_teacher(self) -> StudentConfig:
        if not self.model and self.from_teacher is None:
            raise ValueError(
                "`student.model` is not set; name a model folder, hub id or alias, or set "
                "student.from_teacher: {layers: N} to prune the teacher"
            )
        return self


LossName = Literal["sft", "kd", "reverse_kl", "jsd"]


def _on_policy_sampling() -> SamplingConfig:
    return SamplingConfig(temperature=1.0, max_tokens=128)


class OnPolicyConfig(Section):
    """On-policy distillation (GKD): the student answers, the teacher scores its tokens."""

    rounds: int = Field(default=4, ge=1, description="Rounds of rollouts → scoring → training.")
    prompts_per_round: int = Field(
        default=256, ge=1, description="Fresh training prompts the student answers each round."
    )
    sampling: SamplingConfig = Field(
        default_factory=_on_policy_sampling,
        description="The student's sampling for rollouts (n must be 1).",
    )
    lmbda: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of on-policy rows in each round's training mix (GKD's λ); the rest "
        "are off-policy teacher rows from generate.",
    )
    steps_per_round: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps per round; None: train.epochs passes over the round's mix.",
    )
    eval_prompts: int = Field(
        default=64,
        ge=0,
        description="Fixed prompts (validation split, else test) for the per-round metrics; "
        "0 turns them off.",
    )
    schedule: Literal["auto", "turns", "overlap"] = Field(
        default="auto",
        description="overlap: student and teacher engines run at once, scoring streams behind "
        "the rollouts; turns: one after the other; auto: overlap on GPU clusters.",
    )
    backend: Literal["vllm", "hf"] = Field(
        default="vllm", description="Engine of the student's rollouts."
    )
    engine_kwargs: dict[str, Any] | None = Field(
        default=None, description="vLLM settings of the student engine; default evaluate's."
    )
    concurrency: int = Field(default=1, ge=1, description="Student engine replicas.")
    batch_size: int = Field(default=64, ge=1, description="Rows per batch sent to an engine.")

    @model_validator(mode="after")
    def _one_sample(self) -> OnPolicyConfig:
        if self.sampling.n != 1:
            raise ValueError(
                f"`train.on_policy.sampling.n` ({self.sampling.n}) must be 1: each round draws "
                "fresh prompts instead; raise prompts_per_round"
            )
        return self


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
    mode: Literal["off_policy", "on_policy"] = Field(
        default="off_policy",
        description="off_policy: learn from the teacher's answers (generate's data). on_policy: "
        "rounds in which the student answers and the teacher scores its tokens (train.on_policy).",
    )
    on_policy: OnPolicyConfig | None = Field(
        default=None, description="Settings of train.mode: on_policy (defaults when omitted)."
    )

    @model_validator(mode="before")
    @classmethod
    def _on_policy_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") == "on_policy" and data.get("on_policy") is None:
            data = {**data, "on_policy": {}}
        return data

    @model_validator(mode="after")
    def _on_policy_loss(self) -> TrainConfig:
        if self.mode == "on_policy" and self.loss == "sft":
            raise ValueError(
                "`train.mode` is on_policy but `train.loss` is sft, which would copy the "
                "student's own answers; use train.loss: kd, reverse_kl or jsd"
            )
        return self

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
    # White-box fidelity to the teacher (distray.evaluate.fidelity): on by default through
    # `evaluate.fidelity`; naming them here runs them with `fidelity: false` too.
    "teacher_nll",
    "token_agreement",
    "rouge_l_vs_teacher",
    "repetition",  # degeneration (evaluate.scorers); evaluate always runs it
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
    extra_models: dict[str, str] = Field(
        default_factory=dict, description="More models to evaluate like the student: name → "
        "model folder or alias (`distray evaluate --model NAME=PATH`).",
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
    fidelity: bool = Field(
        default=True,
        description="Score every model against the teacher's own answers: teacher_nll and "
        "token_agreement (teacher-forced, for models that share the local teacher's vocabulary; "
        "skipped with the reason logged otherwise) and rouge_l_vs_teacher. False runs only "
        "those named in `scorers`.",
    )
    equal_length_tokens: int | None = Field(
        default=None,
        ge=0,
        description="Output tokens of the equal-length latency requests (ignore_eos, so every "
        "model writes exactly this many): request latency and TPOT at equal length, beside the "
        "free-running figures. None uses max_tokens; 0 turns them off.",
    )

    @model_validator(mode="after")
    def _extra_model_names(self) -> EvaluateConfig:
        import re  # a name becomes predictions/<name>.parquet and a key of metrics.json

        for name, path in self.extra_models.items():
            if name in ("teacher", "student", "baseline") or not path or not re.fullmatch(
                    r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
                raise ValueError(f"`evaluate.extra_models` has `{name}: {path!r}`; a name is letters, "
                                 "digits, _ - . (not teacher/student/baseline) and a path, e.g. kd=PATH")
        return self


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
        "names (TOKEN, KEY, SECRET, PASSWORD, AUTH, ...) show as <redacted> in config.resolved.yaml "
        "and travel to a submitted job as environment variables only; HF_TOKEN and the "
        "teachers' api_key_env pass through from the driver's environment.",
    )
    shared_filesystem: bool = Field(
        default=False,
        description="`run.output_dir` is a local path that every node of a multi-node cluster "
        "mounts at the same place (NFS, a cluster filesystem). Without it a local output_dir on "
        "a cluster of more than one node is refused before any work starts: use s3:// or gs://.",
    )


class MLflowConfig(Section):
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI (http://..., sqlite:///..., a folder); default "
        "<output_dir>/mlruns, a local folder store that needs no server.",
    )
    experiment: str = Field(default="distray", description="MLflow experiment name.")


class TrackingConfig(Section):
    mlflow: MLflowConfig | None = Field(
        default=None, description="Log to MLflow: {} for a local folder store."
    )
    tensorboard: bool = Field(
        default=False, description="Write TensorBoard event files into <run>/logs/tensorboard."
    )

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard


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

