"""The whole config: every section, the task preset underneath, and the cross-field checks."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field, model_validator

from distray.config.base import (
    DataConfig,
    HFTeacher,
    OpenAITeacher,
    RunConfig,
    Section,
    TaskConfig,
    TeacherConfig,
    VLLMTeacher,
)
from distray.config.stages import (
    BenchConfig,
    DemoConfig,
    EvaluateConfig,
    GenerateConfig,
    ResourcesConfig,
    ServeConfig,
    StudentConfig,
    TrackingConfig,
    TrainConfig,
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
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="Experiment tracking (MLflow, TensorBoard)."
    )

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
                data = deep_merge(preset, data)
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



def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, recursively for nested dicts; neither input is changed."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
