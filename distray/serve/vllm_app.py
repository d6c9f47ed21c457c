"""The `vllm` serve backend: Ray Serve LLM (`ray.serve.llm`) behind distray's hardened ingress.

    distray serve --config run.yaml serve.backend=vllm

One `LLMServer` deployment per model (a vLLM engine, autoscaled from `serve.min_replicas`,
`max_replicas` and `target_ongoing_requests`) behind `DistrayIngress`, a subclass of Ray's
`OpenAiIngress`. Streamed chunks are grouped every `serve.stream_batching_interval_ms` as Ray
does, except the first, which is sent at once (lower time to first token).

Every `ray.llm._internal` import in distray is in this file, written against Ray 2.60.0 (the
version pyproject.toml pins), and so are the overrides of `LLMServer` / `OpenAiIngress`
methods Ray does not document (`_batch_output_stream`, `_get_model_id`). Ray does not promise
these names across releases; when the pin moves, this file is the one to check
(`tests/integration/test_serve.py` exercises all of it).
"""

# No `from __future__ import annotations` here on purpose: FastAPI reads the route handlers'
# annotations, and the request classes are imported inside factories (ray.serve.llm pulls in
# vLLM), so string annotations could not be resolved from this module's globals.

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from distray.config import DistrayConfig, VLLMTeacher
from distray.errors import ConfigError
from distray.serve.endpoints import trusts_remote_code
from distray.serve.front import AUTHENTICATED, harden
from distray.serve.guards import (
    Limits,
    PromptCounter,
    check_seed,
    check_stop,
    completion_prompt_count,
    model_context,
    output_budget,
)

__all__ = ["build", "first_token_server_cls", "ingress_cls", "llm_config", "openai_app"]

logger = logging.getLogger(__name__)


def llm_config(cfg: DistrayConfig, name: str, path: str, on_gpu: bool) -> dict[str, Any]:
    """Keyword arguments of `ray.serve.llm.LLMConfig` for one model.

    The teacher keeps its own `engine_kwargs` and placement (as in generate); the student gets
    `serve.engine_kwargs`. `trust_remote_code` is set only when that model's config allows it.
    """
    s = cfg.serve
    engine_kwargs: dict[str, Any] = {}
    placement = None
    teacher = cfg.all_teachers[0] if name == "teacher" and cfg.all_teachers else None
    if isinstance(teacher, VLLMTeacher):
        engine_kwargs.update(teacher.engine_kwargs)
        placement = teacher.placement_group_config
    else:
        engine_kwargs.update(s.engine_kwargs)
    if trusts_remote_code(cfg, name):
        engine_kwargs.setdefault("trust_remote_code", True)
    if not on_gpu:
        # vLLM's CPU backend has no CUDA graphs.
        engine_kwargs.setdefault("enforce_eager", True)
        # Any client may send the OpenAI `seed` field: a seeded request prefilled in chunks
        # kills vLLM 0.32's CPU engine core (see engines.vllm.engine_kwargs_for).
        engine_kwargs.setdefault("enable_chunked_prefill", False)
        from distray.ray_utils import cpu_placement

        placement = placement or cpu_placement()
    autoscaling = s.autoscaling_config()
    if s.min_replicas == 0:
        autoscaling["initial_replicas"] = 1  # be able to answer right after deploy
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": name, "model_source": path},
        "engine_kwargs": engine_kwargs,
        "deployment_config": {"autoscaling_config": autoscaling},
    }
    if placement:
        out["placement_group_config"] = placement
    if s.stream_batching_interval_ms is not None:
        out["experimental_configs"] = {"stream_batching_interval_ms": s.stream_batching_interval_ms}
    return out


def first_token_server_cls() -> Any:
    """Ray's `LLMServer` with the first streamed chunk sent as soon as it exists.

    Ray Serve LLM groups a stream's chunks every `stream_batching_interval_ms` (50 ms by
    default) to cut per-message overhead, but its batcher also holds the *first* chunk for a
    full interval, adding up to 50 ms to every request's time to first token. Here the first
    flush happens when the first chunk arrives (with whatever the engine produced in the same
    step, e.g. the role chunk and the first token); later chunks are batched as Ray does.
    """
    from ray.llm._internal.serve.utils.batcher import Batcher
    from ray.serve.llm import LLMServer

    class _FirstTokenBatcher(Batcher):  # type: ignore[type-arg]
        async def stream(self) -> AsyncGenerator[Any, None]:
            if not self.interval_s:  # 0 (no batching) or None (one batch): Ray's behaviour
                async for batch in super().stream():
                    yield batch
                return
            item = asyncio.ensure_future(self.queue.get())
            done = asyncio.ensure_future(self.done_event.wait())
            await asyncio.wait({item, done}, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            first = [item.result()] if item.done() and not item.cancelled() else []
            if not item.done():
                item.cancel()
            await asyncio.sleep(0)  # let the reader enqueue chunks of the same engine step
            rest, _ = self.check_done_and_drain()
            if first or rest:
                yield self._merge_results(first + rest)
            # Ray's interval batching for the rest; it returns at once when the stream already
            # ended (and re-raises an engine error).
            async for batch in super().stream():
                yield batch

    class DistrayLLMServer(LLMServer):
        def _batch_output_stream(self, generator: Any) -> Any:
            return _FirstTokenBatcher(generator, interval_ms=self._get_batch_interval_ms()).stream()

    return DistrayLLMServer


def ingress_cls() -> Any:
    """`DistrayIngress`: Ray's OpenAI ingress plus the request guards and a real health route.

    Every check runs before `super()` forwards the request, so a streamed request is refused
    with a 400 instead of a 200 and a stream cut short. Prompts are counted in a worker thread
    (the ingress event loop serves every request of this replica; a chat template and a
    tokenizer over a long prompt would stall them all), after `PromptCounter.precheck` has
    refused, untokenized, any prompt longer than the cap could allow.
    """
    from fastapi import Request
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
    )
    from ray.serve.llm.ingress import OpenAiIngress
    from starlette.responses import JSONResponse, Response

    class DistrayIngress(OpenAiIngress):
        def __init__(
            self,
            llm_deployments: dict[str, Any],
            model_cards: dict[str, Any],
            *,
            lora_paths: dict[str, str] | None = None,
            limits: Limits,
            model_paths: dict[str, str],
            remote_code: frozenset[str] = frozenset(),
            contexts: dict[str, int | None] | None = None,
        ) -> None:
            super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
            self._limits = limits
            self._counter = PromptCounter(model_paths, limits.max_prompt_tokens, remote_code, contexts)

        async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
            model = await self._get_model_id(body.model)
            check_seed(body.seed)
            check_stop(body.stop)
            cap = self._limits.max_tokens_cap
            omitted = body.max_completion_tokens is None and body.max_tokens is None
            count = await asyncio.to_thread(
                self._counter.check_chat, model, body.messages, body.tools,
                getattr(body, "documents", None), need_count=omitted,
            )
            if body.max_completion_tokens is not None:
                body.max_completion_tokens = output_budget(
                    body.max_completion_tokens, body.n, cap, param="max_completion_tokens",
                )
            else:
                body.max_tokens = output_budget(
                    body.max_tokens, body.n, cap, room=self._counter.room(model, count)
                )
            return await super().chat(body, request)

        async def completions(self, body: CompletionRequest, request: Request) -> Response:
            model = await self._get_model_id(body.model)
            check_seed(body.seed)
            check_stop(body.stop)
            omitted = body.max_tokens is None
            counts = await asyncio.to_thread(
                self._counter.check_completion, model, body.prompt, need_count=omitted,
            )
            room = self._counter.room(model, max(counts)) if counts else None
            body.max_tokens = output_budget(
                body.max_tokens, body.n, self._limits.max_tokens_cap,
                prompts=completion_prompt_count(body.prompt), room=room,
            )
            return await super().completions(body, request)

        async def health(self, request: Request) -> Response:
            # Status only: engine errors and model names are for the logs, not for anyone
            # who can reach this open route. Without the key, this process's liveness only:
            # an open route must not let anyone send RPCs to every engine.
            if not request.scope.get(AUTHENTICATED, False):
                return JSONResponse({"status": "ok"})
            failed = False
            for name, handle in self._default_serve_handles.items():
                try:
                    await asyncio.wait_for(handle.check_health.remote(), timeout=10)
                except Exception as e:  # any failure means "not healthy"
                    failed = True
                    logger.warning("health: model `%s` is not healthy: %s: %s", name, type(e).__name__, e)
            return JSONResponse(
                {"status": "unhealthy" if failed else "ok"}, status_code=503 if failed else 200
            )

    return DistrayIngress


def openai_app(
    models: dict[str, dict[str, Any]], limits: Limits, digest: str | None, ingress_options: dict[str, Any]
) -> Any:
    """The Ray Serve LLM application: an `LLMServer` per model behind `DistrayIngress`.

    This is `ray.serve.llm.build_openai_app` assembled by hand (the composition its docs show),
    because the builder takes neither a FastAPI app nor extra routes, and we need both: the
    API-key middleware, the OpenAI-style 404/405/400 bodies (Ray's ingress answers an unknown
    model with FastAPI's `{"detail": ...}` and a text/plain body with a 500), the output/prompt
    caps, and `/health`. The ingress stays one hop in front of the engines, as in Ray's own
    app: the other topologies `benchmarks/serve.py` measures (`--ray-stock`, `--ray-single-hop`)
    were no faster, and Ray's "direct streaming" needs HAProxy, which listens on all interfaces.

    Args:
        models: model id → `{"path": folder, "llm_config": llm_config(...)}`.
        limits: the output and prompt caps.
        digest: the API key's digest, or None to serve without a key.
        ingress_options: Serve deployment options of the ingress.
    """
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    llm_configs = [LLMConfig(**spec["llm_config"]) for spec in models.values()]
    model_paths = {name: spec["path"] for name, spec in models.items()}
    remote_code = frozenset(
        name for name, spec in models.items() if spec["llm_config"]["engine_kwargs"].get("trust_remote_code")
    )
    endpoint_map = {k: DEFAULT_ENDPOINTS[k] for k in ("models", "model_data", "completions", "chat")}
    endpoint_map["health"] = lambda app: app.get("/health")
    app = harden(init(), digest, limits.max_request_bytes, limits.body_read_timeout_s)
    ingress = make_fastapi_ingress(ingress_cls(), endpoint_map=endpoint_map, app=app)
    options = OpenAiIngress.get_deployment_options(llm_configs)  # type: ignore[arg-type]
    options.update(ingress_options)
    deployment: Any = serve.deployment(ingress, **options)
    server_cls = first_token_server_cls()
    return deployment.bind(
        llm_deployments={
            c.model_id: build_llm_deployment(c, name_prefix="LLMServer:", deployment_cls=server_cls)
            for c in llm_configs
        },
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in llm_configs},
        limits=limits,
        model_paths=model_paths,
        remote_code=remote_code,
        contexts={
            name: spec["llm_config"]["engine_kwargs"].get("max_model_len") or model_context(spec["path"])
            for name, spec in models.items()
        },
    )


def build(cfg: DistrayConfig, models: dict[str, str], limits: Limits, digest: str | None) -> Any:
    """The vllm backend's Serve application for `models` (model id → folder).

    Raises:
        ConfigError: vLLM is not installed.
    """
    from distray.ray_utils import cluster_has_gpu

    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "`serve.backend` is `vllm` but vLLM is not installed; install distray[cpu] or "
            "distray[gpu], or set serve.backend=hf"
        ) from e
    on_gpu = cluster_has_gpu()
    specs = {
        name: {"path": path, "llm_config": llm_config(cfg, name, path, on_gpu)}
        for name, path in models.items()
    }
    # The ingress only forwards (and tokenizes for the prompt cap): no CPU slot, so it never
    # competes with the engines for logical CPUs, as Ray's own request router does.
    ingress_options = {"ray_actor_options": {"num_cpus": 0}}
    return openai_app(specs, limits, digest, ingress_options)
