"""Request guards of the serve front: output and prompt caps, API-key check, OpenAI error bodies.

    .venv/bin/python -m pytest tests/unit/test_serve_limits.py -q

Pure functions, shared by both backends and unit-tested without Ray. A refused request raises
`RequestRejected`; the front (`distray.serve.front`) turns it into an OpenAI-style error.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from distray import prompts

__all__ = [
    "Limits",
    "PromptCounter",
    "RequestRejected",
    "check_bearer",
    "check_prompt_tokens",
    "key_digest",
    "openai_error",
    "output_budget",
    "plain_messages",
]


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


def plain_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages (dicts or request objects) as `{role, content}` with text content."""
    out = []
    for m in messages:
        get = m.get if isinstance(m, dict) else (lambda k, _m=m: getattr(_m, k, None))
        out.append({"role": str(get("role") or "user"), "content": _text_of(get("content"))})
    return out


class PromptCounter:
    """Counts prompt tokens with each model's tokenizer; loaded only when a limit is set.

    Chat prompts are counted as `prompts.render_prompt` renders them, so the count is the
    prompt the engine will see.
    """

    def __init__(
        self, model_paths: dict[str, str], limit: int | None, remote_code: frozenset[str] = frozenset()
    ) -> None:
        self.limit = limit
        self._tok: dict[str, Any] = {}
        if limit is None:
            return
        for name, path in model_paths.items():
            self._tok[name] = prompts.load_tokenizer(path, name in remote_code)

    def check_chat(self, model: str, messages: Any) -> None:
        """Raise RequestRejected when the rendered chat prompt is over the limit."""
        if self.limit is None or model not in self._tok:
            return
        tok = self._tok[model]
        plain = plain_messages(messages)
        try:
            ids = prompts.render_prompt(tok, plain, apply_chat_template=True)[1]
        except Exception:  # a template that refuses these turns: count the raw text
            ids = prompts.render_prompt(tok, plain, apply_chat_template=False)[1]
        check_prompt_tokens(len(ids), self.limit)

    def check_completion(self, model: str, prompt: Any) -> None:
        """Raise RequestRejected when a completion prompt (text, ids, or a list) is over the limit."""
        if self.limit is None or model not in self._tok:
            return
        batch = prompt if isinstance(prompt, list) else [prompt]
        if batch and isinstance(batch[0], int):
            batch = [batch]
        for p in batch:
            count = len(p) if isinstance(p, list) else len(self._tok[model](str(p))["input_ids"])
            check_prompt_tokens(count, self.limit)
