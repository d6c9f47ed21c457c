"""The hardened HTTP front both serve backends share: API-key and body middleware, OpenAI-style errors.

    app = harden(FastAPI(), digest, max_request_bytes=8 << 20)   # digest: guards.key_digest(key)

Every refusal gets an OpenAI-style `{"error": {...}}` body with a 4xx status, never a 500 or
FastAPI's `{"detail": ...}`: OpenAI clients read `error.message`. Order per request: the API
key (401), then the body's size (413) and content (`guards.body_problem`, 400), then the route.
"""

from __future__ import annotations

from typing import Any

from distray.serve.guards import RequestRejected, body_problem, check_bearer, openai_error

__all__ = ["OPEN_PATHS", "BearerAuth", "BodyGuard", "harden"]

#: Paths reachable without the API key: load balancers and `distray serve` itself probe them.
OPEN_PATHS = frozenset({"/health"})


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


async def _refuse(scope: dict[str, Any], receive: Any, send: Any, status: int, body: dict[str, Any]) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(body, status_code=status)(scope, receive, send)


class BodyGuard:
    """ASGI middleware: a request body over `max_bytes` gets 413 (checked on Content-Length,
    then on the bytes received), and a body `guards.body_problem` refuses gets 400, before any
    handler parses it. The body is then replayed to the app unchanged."""

    def __init__(self, app: Any, max_bytes: int | None) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
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


def harden(app: Any, digest: str | None, max_request_bytes: int | None = None) -> Any:
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
    app.add_middleware(BodyGuard, max_bytes=max_request_bytes)
    app.add_middleware(BearerAuth, digest=digest)
    return app
