"""`Engine`: what the stages ask of an engine kind, answered once per kind.

    python -c "from distray.engines import engine_for; help(engine_for)"

A stage holds a model config (`teacher.kind` vllm / openai / hf; evaluate builds one for the
student) and asks its `Engine` rather than branching on the kind: generate rows, the GPUs its
replicas hold, its context length, its pass-through engine_kwargs, what its answers cost, and,
for an HTTP model, its endpoint. A new backend is one more subclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import ray.data

    from distray.config import SamplingConfig

__all__ = ["Endpoint", "Engine"]


@dataclass(frozen=True)
class Endpoint:
    """An HTTP model's endpoint and retry settings (the key stays in the env var it names)."""

    base_url: str
    model: str
    api_key_env: str | None
    timeout_s: float
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float


class Engine:
    """One engine kind over its config (a VLLMTeacher, OpenAITeacher or HFTeacher).

    Attributes:
        kind: the `teacher.kind` it runs.
        local: True when it loads a model folder into this cluster's actors; False for an
            HTTP endpoint.
    """

    kind: ClassVar[str] = ""
    local: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def model(self) -> str:
        return str(self.config.model)

    def generate(
        self, ds: ray.data.Dataset, sampling: SamplingConfig, logprobs: int | None, *,
        max_prompt_tokens: int | None = None,
    ) -> ray.data.Dataset:
        """Answer teacher rows (`rows.expand_rows` output); fills `common.RESULT_COLUMNS`."""
        raise NotImplementedError

    def score(self, prepared: ray.data.Dataset, k: int) -> ray.data.Dataset:
        """Teacher-forced scores of given tokens (`engines.scoring`: rows with `_ids`,
        `_n_prompt`, `error`, `_row` in; `_row`, `error`, `_scores` out); lazy.

        Raises:
            ConfigError: the kind cannot score given tokens (an HTTP endpoint).
        """
        from distray.errors import ConfigError

        raise ConfigError(
            f"a `{self.kind}` model cannot score given tokens (prompt logprobs); use a local "
            "teacher (kind vllm or hf)"
        )

    def gpus(self, on_gpu: bool, *, min_replicas: bool = False) -> float:
        """GPUs all of its replicas hold (0 on a CPU cluster or for an endpoint): at most, or
        with `min_replicas` at the low end of an autoscaling range."""
        return 0.0

    def context_length(self) -> int | None:
        """Prompt + answer tokens the engine takes, when it is known before it starts."""
        return None

    def engine_kwargs(self) -> dict[str, Any]:
        """The pass-through engine settings (vLLM's `engine_kwargs`; empty for other kinds)."""
        return {}

    def placement(self) -> dict[str, Any]:
        """VLLMTeacher fields that size and place another model's vLLM engine like this one
        (evaluate runs the teacher's folder so); empty for other kinds."""
        return {}

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What the tokens cost (priced endpoints; 0 for the engines the run owns)."""
        return 0.0

    def check_answered(self, part: dict[str, Any]) -> None:
        """Raise when a finished pass shows the engine is failing (see `OpenAIEngine`)."""

    def endpoint(self) -> Endpoint | None:
        """The HTTP endpoint of a remote model; None for a local one."""
        return None
