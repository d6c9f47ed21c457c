"""Serve the distilled student (and optionally the teacher) behind an OpenAI-compatible HTTP API.

    distray serve --config run.yaml                       # foreground; Ctrl-C shuts down
    distray serve --config run.yaml serve.detached=true   # deploy and return (ray job submit)

Routes: `POST /v1/chat/completions` (plain and SSE streaming), `POST /v1/completions`,
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (200 when every model's engine answers).

Two backends share one hardened FastAPI front (`serve.backend`):

- `vllm`: Ray Serve LLM (`ray.serve.llm`): one `LLMServer` deployment per model (vLLM engine,
  autoscaled from `serve.min_replicas/max_replicas/target_ongoing_requests`) behind an
  `OpenAiIngress` subclass. Streamed chunks are grouped every `serve.stream_batching_interval_ms`
  as Ray does, except the first, which is sent at once (lower time to first token).
- `hf`: a plain Serve deployment running transformers, for machines without vLLM.

Python: `deploy(cfg, models) -> [EndpointConfig]` and `shutdown()` for the pipeline (deploy, then
`bench.bench_endpoints`, then shut down); `run(cfg) -> ServeResult` for `distray serve`.

Safety (both backends): binds `serve.host` (127.0.0.1 by default); with `serve.api_key_env` set,
every route but `/health` needs `Authorization: Bearer <key>` (401 otherwise); `max_tokens` × `n`
above `serve.max_tokens_cap` and prompts above `serve.max_prompt_tokens` get 400; malformed
requests (bad JSON, wrong types, unknown model, unknown route) get a 4xx with an OpenAI-style
`{"error": {...}}` body, never a 500.
"""

# No `from __future__ import annotations` here on purpose: FastAPI reads the route handlers'
# annotations, and the request classes are imported inside factories (ray.serve.llm pulls in
# vLLM), so string annotations could not be resolved from this module's globals.

import asyncio
import hashlib
import hmac
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distray.config import DistrayConfig, EndpointConfig, HFTeacher, VLLMTeacher
from distray.errors import ConfigError, StageError
from distray.paths import RunPaths, is_hub_id

__all__ = [
    "APP_NAME",
    "Limits",
    "RequestRejected",
    "ServeResult",
    "check_bearer",
    "deploy",
    "endpoint_url",
    "key_digest",
    "openai_error",
    "output_budget",
    "resolve_models",
    "run",
    "served_endpoints",
    "shutdown",
]

logger = logging.getLogger(__name__)

APP_NAME = "distray"
# Paths reachable without the API key: load balancers and `distray serve` itself probe them.
OPEN_PATHS = frozenset({"/health"})


# --------------------------------------------------------------------------------------------
# request guards (pure; shared by both backends and unit-tested without Ray)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-request caps the front enforces before a request reaches an engine."""

    max_tokens_cap: int
    max_prompt_tokens: int | None = None


class RequestRejected(Exception):
    """A request the front refuses; becomes an OpenAI-style error response."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.type = type


def openai_error(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> dict[str, Any]:
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def key_digest(key: str) -> str:
    """SHA-256 of an API key. Only the digest travels to Serve replicas, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_bearer(authorization: str | None, digest: str | None) -> str | None:
    """Check an `Authorization` header against the key digest.

    Returns:
        None when the request may pass (no key configured, or the right key), else the reason.
    """
    if digest is None:
        return None
    if not authorization:
        return "missing API key; send `Authorization: Bearer <key>`"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "malformed Authorization header; send `Authorization: Bearer <key>`"
    if not hmac.compare_digest(key_digest(token.strip()), digest):
        return "incorrect API key"
    return None


def output_budget(max_tokens: int | None, n: int | None, cap: int, *, param: str = "max_tokens") -> int:
    """The `max_tokens` a request runs with, given the server's output cap.

    A request may ask for at most `cap` output tokens in all (`max_tokens` × `n`); without
    `max_tokens` it gets `cap // n` (vLLM would otherwise fill the whole context).

    Raises:
        RequestRejected: `max_tokens` or `n` below 1, or `max_tokens × n` above `cap`.
    """
    n = 1 if n is None else n
    if n < 1:
        raise RequestRejected(f"`n` must be at least 1, got {n}", param="n")
    if max_tokens is None:
        if cap // n < 1:
            raise RequestRejected(
                f"`n` ({n}) is above the server's output cap ({cap} tokens per request)", param="n"
            )
        return cap // n
    if max_tokens < 1:
        raise RequestRejected(f"`{param}` must be at least 1, got {max_tokens}", param=param)
    if max_tokens * n > cap:
        raise RequestRejected(
            f"`{param}` ({max_tokens}) × `n` ({n}) is above the server's cap of {cap} output "
            f"tokens per request; ask for at most {cap // n}",
            param=param,
        )
    return max_tokens


def check_prompt_tokens(count: int, limit: int | None) -> None:
    """Raise RequestRejected when a prompt has more than `limit` tokens."""
    if limit is not None and count > limit:
        raise RequestRejected(
            f"the prompt has {count} tokens, above the server's limit of {limit}; shorten it",
            param="messages",
            code="context_length_exceeded",
        )


def _text_of(content: Any) -> str:
    """Text of an OpenAI message `content`: a string, or a list of `{type: text, text}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if isinstance(p, dict):
            parts.append(str(p.get("text") or ""))
        else:
            parts.append(str(getattr(p, "text", "") or ""))
    return "".join(parts)


def _plain_messages(messages: Any) -> list[dict[str, str]]:
    out = []
    for m in messages:
        get = m.get if isinstance(m, dict) else (lambda k, _m=m: getattr(_m, k, None))
        out.append({"role": str(get("role") or "user"), "content": _text_of(get("content"))})
    return out


class _PromptCounter:
    """Counts prompt tokens with each model's tokenizer; loaded only when a limit is set."""

    def __init__(
        self, model_paths: dict[str, str], limit: int | None, remote_code: frozenset[str] = frozenset()
    ) -> None:
        self.limit = limit
        self._tok: dict[str, Any] = {}
        if limit is None:
            return
        from transformers import AutoTokenizer

        for name, path in model_paths.items():
            self._tok[name] = AutoTokenizer.from_pretrained(path, trust_remote_code=name in remote_code)

    def check_chat(self, model: str, messages: Any) -> None:
        if self.limit is None or model not in self._tok:
            return
        tok = self._tok[model]
        plain = _plain_messages(messages)
        try:
            ids = tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        except Exception:  # a model without a chat template: count the raw text
            ids = tok("\n".join(m["content"] for m in plain))["input_ids"]
        check_prompt_tokens(len(ids), self.limit)

    def check_completion(self, model: str, prompt: Any) -> None:
        if self.limit is None or model not in self._tok:
            return
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        for p in prompts:
            count = len(p) if isinstance(p, list) else len(self._tok[model](str(p))["input_ids"])
            check_prompt_tokens(count, self.limit)


# --------------------------------------------------------------------------------------------
# the hardened FastAPI front (both backends)
# --------------------------------------------------------------------------------------------


def _safe_param(value: Any) -> str | None:
    """The offending input as a short string: the error body must always serialise."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value[:200].decode("utf-8", "replace")
    text = value if isinstance(value, str) else repr(value)
    return text[:200]


class _BearerAuth:
    """ASGI middleware: the API-key check, before body parsing (so 401 beats 400)."""

    def __init__(self, app: Any, digest: str | None) -> None:
        self.app = app
        self.digest = digest

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # under a route prefix (`/hf/health`)
            path = path[len(root):]
        if scope["type"] != "http" or self.digest is None or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = None
        for k, v in scope.get("headers", []):
            if k.lower() == b"authorization":
                header = v.decode("latin-1")
                break
        reason = check_bearer(header, self.digest)
        if reason is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        body = openai_error(reason, type="authentication_error", code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _harden(app: Any, digest: str | None) -> Any:
    """Add the OpenAI-style error handlers and the API-key middleware to a FastAPI app."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse

    async def on_rejected(request: Any, exc: RequestRejected) -> Any:
        body = openai_error(exc.message, type=exc.type, param=exc.param, code=exc.code)
        return JSONResponse(body, status_code=exc.status_code)

    async def on_validation(request: Any, exc: RequestValidationError) -> Any:
        # Replaces Ray's handler, which 500s when the offending input is bytes (text/plain).
        errors = exc.errors() or [{"msg": "invalid request"}]
        first = errors[0]
        if first.get("type") == "json_invalid":
            where = [p for p in first.get("loc", ()) if isinstance(p, int)]
            at = f" (at character {where[0]})" if where else ""
            body = openai_error(f"the request body is not valid JSON{at}", code="json_invalid")
            return JSONResponse(body, status_code=400)
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        body = openai_error(
            f"invalid request: {first.get('msg', 'invalid value')} at `{loc}`",
            param=_safe_param(loc),
            code=str(first.get("type", "invalid_value")),
        )
        return JSONResponse(body, status_code=400)

    async def on_http(request: Any, exc: StarletteHTTPException) -> Any:
        # FastAPI's default is `{"detail": ...}`; OpenAI clients read `error.message`.
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        if exc.status_code >= 500:
            kind = "server_error"
        body = openai_error(str(exc.detail), type=kind, code=exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(RequestRejected, on_rejected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    # Added last so it runs first (Starlette middleware is LIFO).
    app.add_middleware(_BearerAuth, digest=digest)
    return app


# --------------------------------------------------------------------------------------------
# vLLM backend: Ray Serve LLM, with our ingress
# --------------------------------------------------------------------------------------------


def _first_token_server_cls() -> Any:
    """Ray's `LLMServer` with the first streamed chunk sent as soon as it exists.

    Ray Serve LLM groups a stream's chunks every `stream_batching_interval_ms` (50 ms by
    default) to cut per-message overhead, but its batcher also holds the *first* chunk for a
    full interval, adding up to 50 ms to every request's time to first token. Here the first
    flush happens when the first chunk arrives (with whatever the engine produced in the same
    step, e.g. the role chunk and the first token); later chunks are batched as Ray does.
    """
    from ray.llm._internal.serve.core.server.llm_server import LLMServer
    from ray.llm._internal.serve.utils.batcher import Batcher

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


def _vllm_app(
    models: dict[str, dict[str, Any]], limits: Limits, digest: str | None, ingress_options: dict[str, Any]
) -> Any:
    """Build the Ray Serve LLM application: LLMServer per model behind `DistrayIngress`.

    This is `ray.serve.llm.build_openai_app` assembled by hand (the composition its docs show),
    because the builder takes neither a FastAPI app nor extra routes, and we need both: the
    API-key middleware, the OpenAI-style 404/405/400 bodies (Ray's ingress answers an unknown
    model with FastAPI's `{"detail": ...}` and a text/plain body with a 500), the output/prompt
    caps, and `/health`. The ingress stays one hop, as in Ray's own app.

    Topologies measured and not taken (`benchmarks/serve.py --ray-stock --ray-single-hop`, tiny
    model, 2 CPUs, c=16, request throughput relative to bare `vllm.entrypoints.openai.api_server`):
    across runs this app 0.39-0.43x, Ray's stock app 0.38x, Ray's `LLMServer` itself as the
    ASGI ingress (one hop fewer) 0.32-0.43x, and with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` 0.37x:
    all within run-to-run noise of each other, so the hop count is not what costs here; Ray
    Serve's proxy and replica processes share the two cores with the engine. Ray's "direct
    streaming" needs HAProxy, which listens on all interfaces.
    """
    from fastapi import Request
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        to_model_metadata,
    )
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
    from starlette.responses import JSONResponse, Response

    llm_configs = [LLMConfig(**spec["llm_config"]) for spec in models.values()]
    model_paths = {name: spec["path"] for name, spec in models.items()}
    remote_code = frozenset(
        name for name, spec in models.items() if spec["llm_config"]["engine_kwargs"].get("trust_remote_code")
    )

    class DistrayIngress(OpenAiIngress):
        """Ray's OpenAI ingress plus the output/prompt caps and a real health route."""

        def __init__(
            self,
            llm_deployments: dict[str, Any],
            model_cards: dict[str, Any],
            *,
            lora_paths: dict[str, str] | None = None,
            limits: Limits,
            model_paths: dict[str, str],
            remote_code: frozenset[str] = frozenset(),
        ) -> None:
            super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
            self._limits = limits
            self._counter = _PromptCounter(model_paths, limits.max_prompt_tokens, remote_code)

        async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
            model = await self._get_model_id(body.model)
            if body.max_completion_tokens is not None:
                body.max_completion_tokens = output_budget(
                    body.max_completion_tokens, body.n, self._limits.max_tokens_cap,
                    param="max_completion_tokens",
                )
            else:
                body.max_tokens = output_budget(body.max_tokens, body.n, self._limits.max_tokens_cap)
            self._counter.check_chat(model, body.messages)
            return await super().chat(body, request)

        async def completions(self, body: CompletionRequest, request: Request) -> Response:
            model = await self._get_model_id(body.model)
            body.max_tokens = output_budget(body.max_tokens, body.n, self._limits.max_tokens_cap)
            self._counter.check_completion(model, body.prompt)
            return await super().completions(body, request)

        async def health(self) -> Response:
            failed = {}
            for name, handle in self._default_serve_handles.items():
                try:
                    await asyncio.wait_for(handle.check_health.remote(), timeout=10)
                except Exception as e:  # any failure means "not healthy", with the reason
                    failed[name] = f"{type(e).__name__}: {e}"[:300]
            status = 503 if failed else 200
            return JSONResponse(
                {"status": "unhealthy" if failed else "ok", "models": sorted(self._model_cards),
                 "failed": failed},
                status_code=status,
            )

    endpoint_map = {k: DEFAULT_ENDPOINTS[k] for k in ("models", "model_data", "completions", "chat")}
    endpoint_map["health"] = lambda app: app.get("/health")
    app = _harden(init(), digest)
    ingress_cls = make_fastapi_ingress(DistrayIngress, endpoint_map=endpoint_map, app=app)
    options = OpenAiIngress.get_deployment_options(llm_configs)  # type: ignore[arg-type]
    options.update(ingress_options)
    deployment: Any = serve.deployment(ingress_cls, **options)
    server_cls = _first_token_server_cls()
    return deployment.bind(
        llm_deployments={
            c.model_id: build_llm_deployment(c, name_prefix="LLMServer:", deployment_cls=server_cls)
            for c in llm_configs
        },
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in llm_configs},
        limits=limits,
        model_paths=model_paths,
        remote_code=remote_code,
    )


# --------------------------------------------------------------------------------------------
# hf backend: transformers in a plain Serve deployment
# --------------------------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False


class _HFChatRequest(_SamplingFields):
    messages: list[_Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = None


class _HFCompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] = Field(...)


class _IncrementalText:
    """Streamed text of one answer: each token decodes a few ids, not the whole answer.

    Detokenization follows vLLM's and TGI's incremental decoders: decode the window from the
    previous emit's start (`prefix`) and keep what is past the text already known, waiting
    while the window ends in an incomplete UTF-8 sequence (U+FFFD). Stop strings are looked
    for only in the held-back tail plus the new text, and the last `max(len(stop)) - 1`
    characters are held back, so a stop split across tokens is found and never sent.

    Example (stop "ab"): push "x" → "", push "a" → "x", push "b" → "" and `stopped`.
    """

    def __init__(self, tok: Any, stops: list[str]) -> None:
        self.tok = tok
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is context already decoded; ids[read:] is new
        self.read = 0
        self.held = ""  # decoded but not sent: it may be the start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tok.decode(ids, skip_special_tokens=True)
        return text

    def _new_text(self, final: bool) -> str:
        window = self.ids[self.prefix:]
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(window)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""  # nothing printable yet (e.g. half a multi-byte character)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def _emit(self, new: str, final: bool) -> str:
        text = self.held + new
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return text[: min(cuts)]
        if final or len(text) <= self.keep:
            self.held = "" if final else text
            return text if final else ""
        self.held = text[len(text) - self.keep:]
        return text[: len(text) - self.keep]

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that can be sent now."""
        self.ids.append(token)
        return self._emit(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """The rest of the text once generation ends (held-back and undecoded tail)."""
        return self._emit(self._new_text(final=True), final=True)


class _HFModel:
    """One transformers model on CPU/GPU: greedy or nucleus decoding, one token per step.

    Decoding runs a step at a time under a lock, so concurrent requests interleave token by
    token instead of queueing whole answers: no batching, but fair TTFT under load.
    """

    def __init__(self, path: str, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok: Any = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model: Any = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model: Any = model.to(self.device).eval()  # type: ignore[arg-type]
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.eos = {i for i in [self.tok.eos_token_id] if i is not None}
        self.lock = threading.Lock()

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids: Any = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    def text_ids(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def tokens(
        self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
        seed: int | None, ignore_eos: bool,
    ) -> Iterator[int]:
        """Yield generated token ids; each `next()` is one forward step (call off the loop)."""
        torch = self.torch
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        ids = torch.tensor([prompt_ids], device=self.device)
        past = None
        for _ in range(max_tokens):
            with self.lock, torch.no_grad():
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if temperature == 0:
                tok = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                tok = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            if tok in self.eos and not ignore_eos:
                return
            yield tok
            ids = torch.tensor([[tok]], device=self.device)


def _hf_app(
    models: dict[str, str], limits: Limits, digest: str | None, deployment_options: dict[str, Any],
    remote_code: frozenset[str] = frozenset(),
) -> Any:
    """A Serve deployment serving `models` with transformers behind the same hardened front.

    `remote_code` names the models whose folders may run their own code (trust_remote_code).
    """
    from fastapi import FastAPI
    from ray import serve
    from starlette.responses import JSONResponse, StreamingResponse

    app = _harden(FastAPI(), digest)
    sentinel = object()

    @serve.deployment(**deployment_options)
    @serve.ingress(app)
    class HFServer:
        def __init__(self, models: dict[str, str], limits: Limits, remote_code: frozenset[str]) -> None:
            self.models = {name: _HFModel(path, name in remote_code) for name, path in models.items()}
            self.limits = limits
            self.created = int(time.time())

        def _model(self, name: str | None) -> tuple[str, _HFModel]:
            if name is None and len(self.models) == 1:
                name = next(iter(self.models))
            if name not in self.models:
                raise RequestRejected(
                    f"model `{name}` does not exist; available: {sorted(self.models)}",
                    status_code=404, param="model", code="model_not_found",
                )
            return name, self.models[name]

        def _card(self, name: str) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "distray",
                    "root": name}

        @app.get("/health")
        async def health(self) -> Any:
            return {"status": "ok", "models": sorted(self.models), "failed": {}}

        @app.get("/v1/models")
        async def list_models(self) -> Any:
            return {"object": "list", "data": [self._card(n) for n in sorted(self.models)]}

        @app.get("/v1/models/{model:path}")
        async def get_model(self, model: str) -> Any:
            name, _ = self._model(model)
            return self._card(name)

        @app.post("/v1/chat/completions")
        async def chat(self, body: _HFChatRequest) -> Any:
            name, m = self._model(body.model)
            if body.max_completion_tokens is not None:
                budget = output_budget(body.max_completion_tokens, body.n, self.limits.max_tokens_cap,
                                       param="max_completion_tokens")
            else:
                budget = output_budget(body.max_tokens, body.n, self.limits.max_tokens_cap)
            plain = _plain_messages([mm.model_dump() for mm in body.messages])
            try:
                prompt_ids = m.chat_ids(plain)
            except Exception as e:
                raise RequestRejected(f"cannot apply the chat template: {e}", param="messages") from e
            return await self._respond(name, m, body, prompt_ids, budget, chat=True)

        @app.post("/v1/completions")
        async def completions(self, body: _HFCompletionRequest) -> Any:
            name, m = self._model(body.model)
            budget = output_budget(body.max_tokens, body.n, self.limits.max_tokens_cap)
            p: Any = body.prompt
            if isinstance(p, list) and p and isinstance(p[0], str):
                if len(p) != 1:
                    raise RequestRejected("the hf backend takes one prompt per request", param="prompt")
                p = p[0]
            if isinstance(p, list):
                if any(not 0 <= t < len(m.tok) for t in p):
                    raise RequestRejected("a prompt token id is out of vocabulary", param="prompt")
                prompt_ids: list[int] = list(p)
            else:
                prompt_ids = m.text_ids(p)
            return await self._respond(name, m, body, prompt_ids, budget, chat=False)

        async def _respond(
            self, name: str, m: _HFModel, body: _SamplingFields, prompt_ids: list[int],
            budget: int, *, chat: bool,
        ) -> Any:
            if body.n != 1:
                raise RequestRejected("the hf backend supports n=1 only", param="n")
            if not prompt_ids:
                raise RequestRejected("the prompt is empty", param="prompt")
            check_prompt_tokens(len(prompt_ids), self.limits.max_prompt_tokens)
            if len(prompt_ids) + budget > m.max_len:
                raise RequestRejected(
                    f"prompt ({len(prompt_ids)} tokens) + max_tokens ({budget}) exceeds the "
                    f"model's context of {m.max_len} tokens",
                    param="max_tokens", code="context_length_exceeded",
                )
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            it = m.tokens(prompt_ids, budget, body.temperature, body.top_p, body.seed, body.ignore_eos)

            async def pieces() -> AsyncIterator[tuple[str, str | None, int]]:
                """(text delta, finish_reason or None, completion tokens so far)."""
                text = _IncrementalText(m.tok, stops)
                while True:
                    tok: Any = await asyncio.to_thread(next, it, sentinel)
                    if tok is sentinel:
                        done = len(text.ids)
                        rest = text.flush()
                        yield rest, "stop" if text.stopped or done < budget else "length", done
                        return
                    delta = text.push(tok)
                    if text.stopped:
                        yield delta, "stop", len(text.ids)
                        return
                    yield delta, None, len(text.ids)

            def usage(done: int) -> dict[str, int]:
                return {"prompt_tokens": len(prompt_ids), "completion_tokens": done,
                        "total_tokens": len(prompt_ids) + done}

            def choice(delta: str, finish: str | None, stream: bool) -> dict[str, Any]:
                if chat:
                    key = "delta" if stream else "message"
                    msg = {"role": "assistant", "content": delta} if not stream else {"content": delta}
                    return {"index": 0, key: msg, "finish_reason": finish, "logprobs": None}
                return {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}

            obj = "chat.completion" if chat else "text_completion"
            if not body.stream:
                text, finish, done = "", "stop", 0
                async for delta, fin, done in pieces():  # noqa: B007 (done: the last count)
                    text += delta
                    finish = fin or finish
                return JSONResponse({"id": rid, "object": obj, "created": created, "model": name,
                                     "choices": [choice(text, finish, False)], "usage": usage(done)})

            import json

            chunk_obj = "chat.completion.chunk" if chat else "text_completion"
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def sse() -> AsyncIterator[str]:
                def event(payload: dict[str, Any]) -> str:
                    return f"data: {json.dumps(payload)}\n\n"

                head = {"id": rid, "object": chunk_obj, "created": created, "model": name}
                if chat:
                    yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}]})
                done = 0
                async for delta, fin, done in pieces():  # noqa: B007 (done: the last count)
                    if delta or fin:
                        yield event({**head, "choices": [choice(delta, fin, True)]})
                if include_usage:
                    yield event({**head, "choices": [], "usage": usage(done)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

    server: Any = HFServer
    return server.bind(models=models, limits=limits, remote_code=remote_code)


# --------------------------------------------------------------------------------------------
# deploying
# --------------------------------------------------------------------------------------------


@dataclass
class ServeResult:
    """What `run` deployed: where it listens and which models it serves."""

    url: str
    base_url: str
    app_name: str
    backend: str
    models: dict[str, str]
    endpoints: list[EndpointConfig] = field(default_factory=list)
    startup_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["endpoints"] = [e.model_dump() for e in self.endpoints]
        return d


def endpoint_url(cfg: DistrayConfig) -> str:
    """The server's root URL as a client reaches it (0.0.0.0 and :: map to 127.0.0.1)."""
    host = cfg.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.serve.port}"


def resolve_models(cfg: DistrayConfig) -> dict[str, str]:
    """Model id → folder for what `serve` deploys: the student, and the teacher if asked.

    Raises:
        ConfigError: the student folder is missing, or `serve.serve_teacher` names a teacher
            that is not a local model.
    """
    student = cfg.serve.model or RunPaths(cfg.run_dir).student
    if "://" not in student and not os.path.isfile(os.path.join(student, "config.json")):
        where = "`serve.model`" if cfg.serve.model else "the exported student (default)"
        raise ConfigError(
            f"{where} `{student}` is not a model folder (no config.json); run `distray train` "
            "first, or set serve.model to a Hugging Face folder"
        )
    models = {cfg.serve.model_name: student}
    if cfg.serve.serve_teacher:
        teachers = cfg.all_teachers
        if not teachers:
            raise ConfigError("`serve.serve_teacher` is true but no `teacher` is configured")
        t = teachers[0]
        if not isinstance(t, (VLLMTeacher, HFTeacher)):
            raise ConfigError(
                f"`serve.serve_teacher` needs a local teacher (kind vllm or hf), got kind "
                f"`{t.kind}`; benchmark the API teacher by listing it in bench.endpoints instead"
            )
        if "teacher" == cfg.serve.model_name:
            raise ConfigError("`serve.model_name` is `teacher`, which the teacher uses; rename it")
        local = "://" not in t.model and not is_hub_id(t.model)
        if local and not os.path.isfile(os.path.join(t.model, "config.json")):
            raise ConfigError(
                f"`teacher.model` `{t.model}` is not a model folder (no config.json), and "
                "`serve.serve_teacher` deploys it; fix the path (with the demo teacher: run "
                "`distray generate` or `distray run` first, which build it), or set "
                "serve.serve_teacher=false"
            )
        models["teacher"] = t.model
    return models


def served_endpoints(
    cfg: DistrayConfig, models: dict[str, str] | None = None, *, route_prefix: str = "/"
) -> list[EndpointConfig]:
    """The endpoints `serve` deploys for this config (what `bench` measures by default)."""
    names = list(models) if models is not None else [cfg.serve.model_name] + (
        ["teacher"] if cfg.serve.serve_teacher else []
    )
    base = endpoint_url(cfg) + route_prefix.rstrip("/") + "/v1"
    return [
        EndpointConfig(name=n, base_url=base, model=n, api_key_env=cfg.serve.api_key_env)
        for n in names
    ]


def _api_key_digest(cfg: DistrayConfig) -> str | None:
    env = cfg.serve.api_key_env
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise ConfigError(
            f"`serve.api_key_env` is `{env}` but ${env} is empty; export {env}=<key> or unset "
            "serve.api_key_env to serve without a key"
        )
    return key_digest(key)


def _trusts_remote_code(cfg: DistrayConfig, name: str) -> bool:
    """Whether the served model `name` may run code from its folder: the teacher's or the
    student's `trust_remote_code` (off by default)."""
    if name == "teacher" and cfg.all_teachers:
        return bool(getattr(cfg.all_teachers[0], "trust_remote_code", False))
    return bool(cfg.student and cfg.student.trust_remote_code)


def _llm_config(
    cfg: DistrayConfig, name: str, path: str, on_gpu: bool
) -> dict[str, Any]:
    """Keyword arguments of `ray.serve.llm.LLMConfig` for one model."""
    s = cfg.serve
    engine_kwargs: dict[str, Any] = {}
    placement = None
    teacher = cfg.all_teachers[0] if name == "teacher" and cfg.all_teachers else None
    if isinstance(teacher, VLLMTeacher):
        engine_kwargs.update(teacher.engine_kwargs)
        placement = teacher.placement_group_config
    else:
        engine_kwargs.update(s.engine_kwargs)
    if _trusts_remote_code(cfg, name):
        engine_kwargs.setdefault("trust_remote_code", True)
    if not on_gpu:
        # vLLM's CPU backend has no CUDA graphs.
        engine_kwargs.setdefault("enforce_eager", True)
        from distray.ray_utils import cpu_placement

        placement = placement or cpu_placement()
    autoscaling = {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
    }
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


def _build(cfg: DistrayConfig, models: dict[str, str]) -> Any:
    from distray.ray_utils import cluster_has_gpu

    limits = Limits(cfg.serve.max_tokens_cap, cfg.serve.max_prompt_tokens)
    digest = _api_key_digest(cfg)
    s = cfg.serve
    if s.backend == "hf":
        options = {
            "autoscaling_config": {
                "min_replicas": max(1, s.min_replicas),
                "max_replicas": s.max_replicas,
                "target_ongoing_requests": s.target_ongoing_requests,
            },
            "max_ongoing_requests": max(64, 4 * s.target_ongoing_requests),
            "ray_actor_options": {"num_cpus": 1},
        }
        remote_code = frozenset(n for n in models if _trusts_remote_code(cfg, n))
        return _hf_app(models, limits, digest, options, remote_code)
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "`serve.backend` is `vllm` but vLLM is not installed; install distray[cpu] or "
            "distray[gpu], or set serve.backend=hf"
        ) from e
    on_gpu = cluster_has_gpu()
    specs = {
        name: {"path": path, "llm_config": _llm_config(cfg, name, path, on_gpu)}
        for name, path in models.items()
    }
    # The ingress only forwards (and tokenizes for the prompt cap): no CPU slot, so it never
    # competes with the engines for logical CPUs, as Ray's own request router does.
    ingress_options = {"ray_actor_options": {"num_cpus": 0}}
    return _vllm_app(specs, limits, digest, ingress_options)


_started_serve = False
_deployed_apps: set[str] = set()


def deploy(
    cfg: DistrayConfig,
    models: dict[str, str] | None = None,
    *,
    ready_timeout_s: float = 900.0,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
) -> list[EndpointConfig]:
    """Deploy the Serve app and wait until `/health` answers 200.

    Args:
        cfg: the run config (`serve` section, `resources` for Ray).
        models: model id → folder; default `resolve_models(cfg)`.
        ready_timeout_s: how long to wait for engines to load.
        app_name: Serve application name (several apps can share one Serve instance).
        route_prefix: where the app is mounted; endpoints become `<url><prefix>/v1`.

    Returns:
        One `EndpointConfig` per served model, ready for `bench.bench_endpoints`.

    Raises:
        ConfigError: missing model folder, missing API key, vLLM missing for backend vllm.
        StageError: the deployment failed or did not become healthy in time.
    """
    global _started_serve
    from ray import serve

    from distray.ray_utils import init_ray

    models = models or resolve_models(cfg)
    # Ray first: building the LLM deployments reads the job's runtime_env (env vars such as
    # VLLM_CPU_KVCACHE_SPACE), and would otherwise auto-start a bare Ray without them.
    init_ray(cfg)
    app = _build(cfg, models)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        _started_serve = True
    except Exception as e:
        raise StageError(
            f"could not start Serve's HTTP proxy on {cfg.serve.host}:{cfg.serve.port}: {e}; "
            "pick a free port with serve.port=..."
        ) from e
    _check_proxy_address(cfg)
    try:
        serve.run(
            app, name=app_name, route_prefix=route_prefix, blocking=False,
            logging_config={"enable_access_log": cfg.serve.access_log},
        )
        _deployed_apps.add(app_name)
    except Exception as e:
        raise StageError(
            f"Serve app `{app_name}` failed to deploy {sorted(models)}: {e}; check the model "
            "folders and serve.engine_kwargs (the replica logs are in /tmp/ray/session_latest/logs/serve)"
        ) from e
    _wait_healthy(endpoint_url(cfg) + route_prefix.rstrip("/"), ready_timeout_s)
    return served_endpoints(cfg, models, route_prefix=route_prefix)


def _check_proxy_address(cfg: DistrayConfig) -> None:
    """Fail when Serve already runs on this cluster with another host/port than the config's.

    `serve.start` silently keeps the running proxy's settings; the URL distray prints and bench
    measures would then be wrong.
    """
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None
        host, port = client.http_config.host, client.http_config.port
    except Exception:  # an internal API: when it moves, skip the check rather than fail
        return
    if (host, port) != (cfg.serve.host, cfg.serve.port):
        raise ConfigError(
            f"Serve already runs on this Ray cluster at {host}:{port}, not at `serve.host`:"
            f"`serve.port` ({cfg.serve.host}:{cfg.serve.port}); set serve.host={host} "
            f"serve.port={port}, or stop the running Serve first (`serve shutdown`)"
        )


def _wait_healthy(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=15)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1.0)
    raise StageError(f"{url}/health did not answer 200 within {timeout_s:.0f} s (last: {last})")


def shutdown(app_name: str | None = None) -> None:
    """Delete distray's Serve app(s); stop Serve too when no other app is left on it.

    Args:
        app_name: the app to delete; None deletes every app `deploy` started in this process.
    """
    global _started_serve
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    names = [app_name] if app_name else sorted(_deployed_apps or {APP_NAME})
    try:
        for name in names:
            serve.delete(name, _blocking=True)
            _deployed_apps.discard(name)
        if _started_serve and not serve.status().applications:
            serve.shutdown()
            _started_serve = False
    except Exception as e:  # shutting down must not mask the error that led here
        logger.warning("Serve shutdown was not clean: %s", e)


def run(cfg: DistrayConfig) -> ServeResult:
    """Deploy the student (and the teacher with `serve.serve_teacher`) and serve until Ctrl-C.

    With `serve.detached`, return once healthy: the app keeps running on the Ray cluster
    (under `ray job submit`, after the job ends); `serve.delete("distray")` or
    `serve shutdown` stops it.

    Raises:
        ConfigError: see `deploy`.
        StageError: see `deploy`.
    """
    models = resolve_models(cfg)
    t0 = time.perf_counter()
    try:
        endpoints = deploy(cfg, models)
    except BaseException:  # Ctrl-C or a failure mid-deploy: don't leave half an app behind
        shutdown()
        raise
    url = endpoint_url(cfg)
    result = ServeResult(
        url=url,
        base_url=url + "/v1",
        app_name=APP_NAME,
        backend=cfg.serve.backend,
        models=models,
        endpoints=endpoints,
        startup_s=time.perf_counter() - t0,
    )
    auth = f" (API key from ${cfg.serve.api_key_env})" if cfg.serve.api_key_env else ""
    # The URL is this stage's product: print it where the user is looking, not only to the log.
    print(f"distray serve: {', '.join(models)} ready at {result.base_url}{auth}", flush=True)
    logger.info(
        "serve: %s on %s backend at %s in %.0f s", sorted(models), cfg.serve.backend,
        result.base_url, result.startup_s,
    )
    if cfg.serve.detached:
        if not (cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")):
            logger.warning(
                "serve.detached with a Ray started by this process: the app stops when the "
                "process exits; start a cluster (`ray start --head`) and set RAY_ADDRESS, or "
                "run in the foreground"
            )
        return result
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("distray serve: shutting down", flush=True)
        shutdown()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return result
