"""The hardened HTTP front both serve backends share: API-key and body middleware, OpenAI-style
errors, and Prometheus metrics of the serving layer.

    app = harden(FastAPI(), digest, max_request_bytes=8 << 20)   # digest: guards.key_digest(key)

Every refusal gets an OpenAI-style `{"error": {...}}` body with a 4xx status, never a 500 or
FastAPI's `{"detail": ...}`: OpenAI clients read `error.message`. Order per request: the API
key (401), then the body's size (413) and content (`guards.body_problem`, 400), then the route.
"""

from __future__ import annotations

from typing import Any

from distray.serve.guards import RequestRejected, body_problem, check_bearer, openai_error

__all__ = [
    "AUTHENTICATED",
    "COUNTS",
    "OPEN_PATHS",
    "REASON_LABELS",
    "ROUTE_LABELS",
    "STATUS_LABELS",
    "BearerAuth",
    "BodyGuard",
    "RequestMetrics",
    "harden",
    "metric_labels",
]

#: Paths reachable without the API key: load balancers and `distray serve` itself probe them.
OPEN_PATHS = frozenset({"/health"})

#: The ASGI scope key `BearerAuth` sets to True for a request that carried the right key (or
#: when no key is configured): `/health` checks the engines only for such a request.
AUTHENTICATED = "distray.authenticated"

# Metric labels come from fixed sets, never from what a client sends: a label taken from the
# path (or a model name, or an error text) gives every distinct request its own series, and
# anyone who can reach the port could grow the metrics export without bound.
#: Route labels: the served routes, and `other` for every other path.
ROUTE_LABELS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}",
                "/health", "other")
#: Status labels: the statuses the front and the engines answer with, and `other`.
STATUS_LABELS = ("200", "400", "401", "403", "404", "405", "408", "413", "415", "422", "429",
                 "500", "502", "503", "504", "other")
#: Reason labels of refusals: the error body's `code`, else its `type`, when listed; else `other`.
REASON_LABELS = (
    "invalid_api_key", "request_too_large", "request_timeout", "json_invalid", "invalid_value",
    "model_not_found", "context_length_exceeded", "max_tokens_cap", "too_many_stop_sequences",
    "invalid_request_error", "not_found_error", "authentication_error", "server_error", "other",
)
_STATUSES = frozenset(STATUS_LABELS)
_REASONS = frozenset(REASON_LABELS)


def _route_path(scope: dict[str, Any]) -> str:
    """The request path under the app's route prefix (`/hf/health` → `/health`)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path


def metric_labels(path: str, status: int, error: dict[str, Any] | None = None) -> dict[str, str]:
    """`route`, `status` and `reason` labels of one answer, each from its fixed set.

    Args:
        path: the request path under the app's route prefix.
        status: the HTTP status answered.
        error: the OpenAI error body's `error` object, for a 4xx/5xx.
    """
    if path in ROUTE_LABELS and path != "other":
        route = path
    elif path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        route = "/v1/models/{model}"
    else:
        route = "other"
    code = str(status) if str(status) in _STATUSES else "other"
    out = {"route": route, "status": code}
    if status >= 400:
        err = error or {}
        reason = next((str(v) for v in (err.get("code"), err.get("type")) if str(v) in _REASONS), "other")
        out["reason"] = reason
    return out


def _safe_param(value: Any) -> str | None:
    """The offending input as a short string: the error body must always serialise."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value[:200].decode("utf-8", "replace")
    text = value if isinstance(value, str) else repr(value)
    return text[:200]


class BearerAuth:
    """ASGI middleware: the API-key check, before body parsing (so 401 beats 400)."""

    def __init__(self, app: Any, digest: str | None) -> None:
        self.app = app
        self.digest = digest

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for k, v in scope.get("headers", []):
            if k.lower() == b"authorization":
                header = v.decode("latin-1")
                break
        reason = check_bearer(header, self.digest)
        scope[AUTHENTICATED] = reason is None
        if reason is None or _route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        body = openai_error(reason, type="authentication_error", code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def _refuse(scope: dict[str, Any], receive: Any, send: Any, status: int, body: dict[str, Any]) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status)(scope, receive, send)


class BodyGuard:
    """ASGI middleware: a request body over `max_bytes` gets 413 (checked on Content-Length,
    then on the bytes received), a body not received in full within `read_timeout_s` gets 408
    (a client trickling bytes would otherwise hold a request slot for as long as it likes),
    and a body `guards.body_problem` refuses gets 400, before any handler parses it. The body
    is then replayed to the app unchanged."""

    def __init__(self, app: Any, max_bytes: int | None, read_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s

    def _too_large(self, size: int | str) -> dict[str, Any]:
        return openai_error(
            f"the request body ({size} bytes) is above the server's limit of {self.max_bytes} "
            "bytes (serve.max_request_bytes)", code="request_too_large",
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length" and limit is not None and v.isdigit() and int(v) > limit:
                await _refuse(scope, receive, send, 413, self._too_large(int(v)))
                return
        import asyncio

        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = None if self.read_timeout_s is None else loop.time() + self.read_timeout_s
        while True:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                late = openai_error(
                    f"the request body was not received within {self.read_timeout_s:g} s "
                    f"({size} bytes arrived; serve.body_read_timeout_s)", code="request_timeout",
                )
                await _refuse(scope, receive, send, 408, late)
                return
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:
                await _refuse(scope, receive, send, 413, self._too_large(f"over {limit}"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = body_problem(body)
        if problem is not None:
            await _refuse(scope, receive, send, 400, openai_error(problem, code="invalid_value"))
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())  # later calls wait for the disconnect, as before

        await self.app(scope, replay, send)


#: Requests this process answered, by ("requests", route, status) and ("rejected", status,
#: reason), every label from its fixed set: at most |routes| × |statuses| + |statuses| × |reasons|
#: keys, whatever clients send.
COUNTS: dict[tuple[str, ...], int] = {}

#: Buckets for the TTFT and end-to-end histograms, in seconds.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RequestMetrics:
    """ASGI middleware, outermost: Prometheus metrics for distray's own serving layer.

    Exported through Ray's metrics agent (`ray.serve.metrics`, aggregated over every ingress
    replica of the node, scraped at the node's metrics export port), next to Ray Serve's and
    vLLM's engine metrics (`ray_vllm:*`, from Ray LLM's `log_engine_metrics`):

    - `ray_distray_serve_requests_total{route, status}`: every request, by route and status;
    - `ray_distray_serve_rejected_total{status, reason}`: 4xx/5xx, with the error body's `code`
      (`invalid_api_key`, `request_too_large`, `max_tokens_cap`, ...);
    - `ray_distray_serve_ttft_seconds{route}`: request start to the first body bytes;
    - `ray_distray_serve_e2e_seconds{route}`: request start to the last body bytes.

    Every label comes from a fixed set (`ROUTE_LABELS`, `STATUS_LABELS`, `REASON_LABELS`; see
    `metric_labels`), so the number of series is bounded whatever paths clients try.

    `COUNTS` keeps the same counters in the replica process, for tests without a metrics agent.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts = COUNTS
        self._ray: dict[str, Any] | None = None
        try:
            from ray.serve import metrics

            self._ray = {
                "requests": metrics.Counter("distray_serve_requests_total", "Requests by route and status.",
                                            tag_keys=("route", "status")),  # type: ignore[arg-type]
                "rejected": metrics.Counter("distray_serve_rejected_total", "4xx/5xx by status and reason.",
                                            tag_keys=("status", "reason")),  # type: ignore[arg-type]
                "ttft": metrics.Histogram("distray_serve_ttft_seconds", "Time to the first body bytes.",
                                          boundaries=list(LATENCY_BUCKETS_S), tag_keys=("route",)),
                "e2e": metrics.Histogram("distray_serve_e2e_seconds", "Time to the last body bytes.",
                                         boundaries=list(LATENCY_BUCKETS_S), tag_keys=("route",)),
            }
        except Exception:  # noqa: BLE001 - no Ray here (a unit test): keep the in-replica counts
            self._ray = None

    def _count(self, kind: str, tags: dict[str, str]) -> None:
        key = (kind, *tags.values())
        self.counts[key] = self.counts.get(key, 0) + 1
        if self._ray is not None:
            self._ray[kind].inc(tags=tags)

    def _observe(self, kind: str, value: float, route: str) -> None:
        if self._ray is not None:
            self._ray[kind].observe(value, tags={"route": route})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import json
        import time

        t0 = time.perf_counter()
        path = _route_path(scope)
        route = metric_labels(path, 200)["route"]
        state: dict[str, Any] = {"status": 0, "first": None, "error": b""}

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = int(message["status"])
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body and state["first"] is None:
                    state["first"] = now = time.perf_counter()
                    self._observe("ttft", now - t0, route)
                if state["status"] >= 400 and len(state["error"]) < 4096:
                    state["error"] += body
                if not message.get("more_body", False):
                    self._observe("e2e", time.perf_counter() - t0, route)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            status = state["status"] or 500
            err: dict[str, Any] = {}
            if status >= 400:
                try:
                    err = json.loads(state["error"] or b"{}").get("error") or {}
                except (ValueError, AttributeError):
                    err = {}
            labels = metric_labels(path, status, err if isinstance(err, dict) else {})
            self._count("requests", {"route": labels["route"], "status": labels["status"]})
            if status >= 400:
                self._count("rejected", {"status": labels["status"], "reason": labels["reason"]})


def harden(
    app: Any, digest: str | None, max_request_bytes: int | None = None,
    body_read_timeout_s: float | None = None,
) -> Any:
    """Add the OpenAI-style error handlers, the body guard and the API-key middleware to a
    FastAPI app."""
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
    # Starlette middleware is LIFO: the key check, added last, runs first (401 beats 413/400).
    app.add_middleware(BodyGuard, max_bytes=max_request_bytes, read_timeout_s=body_read_timeout_s)
    app.add_middleware(BearerAuth, digest=digest)
    app.add_middleware(RequestMetrics)  # outermost: sees every answer, 401s included
    return app
