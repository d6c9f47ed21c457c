"""Config sections for the run, the task, the input data and the teachers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Section",
    "RunConfig",
    "TaskType",
    "TaskConfig",
    "BuiltinTaskData",
    "DataConfig",
    "VLLMTeacher",
    "OpenAITeacher",
    "HFTeacher",
    "TeacherConfig",
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

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, v: str) -> str:
        # The run folder is <output_dir>/<name> and `--force` deletes inside it: a name that
        # climbs out (`..`), nests (`a/b`) or is empty would point it at other folders.
        bad = (not v.strip() or v in (".", "..") or any(c in v for c in "/\\\0")
               or v != v.strip())
        if bad:
            raise ValueError(
                f"must be one folder name, got {v!r}: not empty, not `.` or `..`, no `/`, "
                "`\\` or surrounding spaces; e.g. run.name=llama8b-kd-v2"
            )
        return v

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
        "then point at the generated files (set by `distray.prepare`).",
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
    max_retry_after_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest wait honoured from a server's Retry-After header; a longer ask "
        "is cut to this (the row fails sooner, and a rerun sends it again).",
    )
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
