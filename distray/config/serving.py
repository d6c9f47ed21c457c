"""Config sections for serving and load-testing: serve, bench (and bench's endpoints)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from distray.config.base import Section

__all__ = ["BenchConfig", "EndpointConfig", "ServeConfig"]


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
    upscale_delay_s: float | None = Field(
        default=None, ge=0,
        description="Serve autoscaling: how long load must stay above the target before a "
        "replica is added. None: Ray Serve's default (30 s).",
    )
    downscale_delay_s: float | None = Field(
        default=None, ge=0,
        description="Serve autoscaling: how long load must stay below the target before a "
        "replica is removed. None: Ray Serve's default (600 s).",
    )
    max_tokens_cap: int = Field(
        default=1024, ge=1, description="Requests asking for more are rejected."
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Longest accepted prompt."
    )
    max_request_bytes: int | None = Field(
        default=8 << 20,
        ge=1,
        description="Largest accepted request body in bytes (8 MiB); larger ones get HTTP 413 "
        "before they are parsed. None: no limit.",
    )
    body_read_timeout_s: float | None = Field(default=30.0, gt=0, description="Longest time a "
        "client may take to send a request body; a slower one gets HTTP 408. None: no limit.")
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

    def autoscaling_config(self) -> dict[str, Any]:
        """Ray Serve's `autoscaling_config` for each served model (both backends)."""
        out: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        if self.upscale_delay_s is not None:
            out["upscale_delay_s"] = self.upscale_delay_s
        if self.downscale_delay_s is not None:
            out["downscale_delay_s"] = self.downscale_delay_s
        return out


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
    rounds: int = Field(default=3, ge=1, description="Rounds per endpoint and load, endpoints "
        "alternating (A B A B ...); the summary quotes medians with the min–max.")
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
