"""Request guards of the serve front: output and prompt caps, API-key check, OpenAI error bodies.

    .venv/bin/python -m pytest tests/unit/test_serve_limits.py -q

Pure functions, shared by both backends and unit-tested without Ray. A refused request raises
`RequestRejected`; the front (`distray.serve.front`) turns it into an OpenAI-style error.

Everything a request can get wrong is checked here, before it reaches an engine, so a bad
request is a 400 and never a 500 or a stream cut short after its 200: the whole output a
request asks for (`max_tokens` × `n` × prompts), the whole prompt (messages, tools, tool calls,
documents; every prompt of a batch together), the seed's range, and text that is not Unicode.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

from distray import prompts

__all__ = [
    "Limits",
    "PromptCounter",
    "RequestRejected",
    "body_problem",
    "check_bearer",
    "MAX_STOP_SEQUENCES",
    "check_prompt_tokens",
    "check_seed",
    "check_stop",
    "completion_prompt_count",
    "key_digest",
    "model_context",
    "openai_error",
    "output_budget",
    "plain_messages",
]

logger = logging.getLogger(__name__)

#: vLLM (and OpenAI) take a signed 64-bit seed; a bigger one fails inside the engine.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

#: OpenAI's limit on `stop`. Every stop string is searched for after every token, so a long
#: list costs the server on each step of the answer.
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Limits:
    """Per-request caps the front enforces before a request reaches an engine."""

    max_tokens_cap: int
    max_prompt_tokens: int | None = None
    max_request_bytes: int | None = None
    body_read_timeout_s: float | None = None


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


def output_budget(
    max_tokens: int | None,
    n: int | None,
    cap: int,
    *,
    prompts: int = 1,
    room: int | None = None,
    param: str = "max_tokens",
) -> int:
    """The `max_tokens` a request runs with, given the server's output cap.

    A request may ask for at most `cap` output tokens in all: `max_tokens` × `n` × the number of
    prompts (a /v1/completions batch). Without `max_tokens` it gets `cap // (n × prompts)`,
    lowered to `room`, the context left after its longest prompt (vLLM would otherwise fill the
    whole context, and a default above the room is refused by the engine).

    Raises:
        RequestRejected: `max_tokens` or `n` below 1, the whole request above `cap`, or no
            room left in the context.
    """
    n = 1 if n is None else n
    if n < 1:
        raise RequestRejected(f"`n` must be at least 1, got {n}", param="n")
    sequences = n * max(1, prompts)
    times = f"`n` ({n})" + (f" × {prompts} prompts" if prompts > 1 else "")
    if max_tokens is None:
        if cap // sequences < 1:
            raise RequestRejected(
                f"{times} is above the server's output cap ({cap} tokens per request)", param="n"
            )
        if room is not None and room < 1:
            raise RequestRejected(
                "the prompt fills the model's context: no room is left for an answer; shorten it",
                param="messages", code="context_length_exceeded",
            )
        return min(cap // sequences, room) if room is not None else cap // sequences
    if max_tokens < 1:
        raise RequestRejected(f"`{param}` must be at least 1, got {max_tokens}", param=param)
    if max_tokens * sequences > cap:
        raise RequestRejected(
            f"`{param}` ({max_tokens}) × {times} is above the server's cap of {cap} output "
            f"tokens per request; ask for at most {cap // sequences}",
            param=param, code="max_tokens_cap",
        )
    return max_tokens


def completion_prompt_count(prompt: Any) -> int:
    """How many prompts a /v1/completions `prompt` holds: a string or one list of token ids is
    one; a list of strings or of token-id lists is one per item."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def check_seed(seed: Any) -> None:
    """Raise RequestRejected for a seed outside the signed 64-bit range."""
    if seed is not None and not SEED_MIN <= int(seed) <= SEED_MAX:
        raise RequestRejected(
            f"`seed` must be a signed 64-bit integer ({SEED_MIN} to {SEED_MAX})", param="seed"
        )


def check_stop(stop: Any) -> None:
    """Raise RequestRejected for more than `MAX_STOP_SEQUENCES` stop strings (OpenAI's cap)."""
    if isinstance(stop, (list, tuple)) and len(stop) > MAX_STOP_SEQUENCES:
        raise RequestRejected(
            f"`stop` holds {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
            param="stop", code="too_many_stop_sequences",
        )


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _lone_surrogate(value: Any, path: str = "body") -> str | None:
    """The path of the first string that is not valid Unicode text (a lone surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, path) or _lone_surrogate(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{path}[{i}]")
            if found:
                return found
    return None


def body_problem(body: bytes) -> str | None:
    """Why a JSON body must be refused before any handler parses it, or None.

    Python's JSON parser accepts what no engine can use: `NaN` and `Infinity` literals, and
    escapes of lone UTF-16 surrogates (`"\\ud800"`), which become strings the tokenizer cannot
    encode. The full parse runs only when the raw bytes hold a candidate, so ordinary bodies
    cost one scan. A body that is not JSON at all is left to the handler's own 400.
    """
    constant = b"NaN" in body or b"Infinity" in body
    if not constant and _SURROGATE_ESCAPE.search(body) is None:
        return None
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except _NonFinite as e:
        return f"the request body holds `{e}`, which is not a JSON number; send a finite number"
    except ValueError:
        return None
    where = _lone_surrogate(data)
    if where is not None:
        where = where.removeprefix("body.").removeprefix("body")
        return (
            f"`{where or 'body'}` holds a lone UTF-16 surrogate (such as \\ud800), which is not "
            "valid Unicode text; send the character, or a complete surrogate pair"
        )
    return None


def check_prompt_tokens(count: int, limit: int | None, *, prompts: int = 1) -> None:
    """Raise RequestRejected when a request's prompt tokens (all its prompts together) are
    above `limit`."""
    if limit is not None and count > limit:
        what = f"the {prompts} prompts have" if prompts > 1 else "the prompt has"
        raise RequestRejected(
            f"{what} {count} tokens in all, above the server's limit of {limit}; shorten it",
            param="messages" if prompts == 1 else "prompt",
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


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _plain(value: Any) -> Any:
    """A request field (pydantic models, TypedDicts, lists of either) as plain JSON data."""
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def plain_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages (dicts or request objects) as `{role, content}` with text content."""
    return [
        {"role": str(_get(m, "role") or "user"), "content": _text_of(_get(m, "content"))}
        for m in messages
    ]


def chat_extras(messages: Any, tools: Any = None, documents: Any = None) -> str:
    """The parts of a chat request the plain rendering leaves out, as the JSON text a chat
    template would put into the prompt: tool definitions, assistant tool calls, documents."""
    parts = [_plain(m_calls) for m in messages if (m_calls := _get(m, "tool_calls"))]
    parts += [_plain(x) for x in (tools, documents) if x]
    return json.dumps(parts, ensure_ascii=False) if parts else ""


#: config.json keys that give a model's context length, in the order vLLM reads them.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "max_sequence_length")


def model_context(path: str) -> int | None:
    """A local model folder's context length from its config.json; None when unknown."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for cfg in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


class PromptCounter:
    """Counts prompt tokens with each model's tokenizer, loaded on first use.

    Chat prompts are counted as `prompts.render_prompt` renders them (the prompt the engine
    sees), plus the JSON text of tools, tool calls and documents. A model whose tokenizer
    cannot be loaded here (a remote URI) is not counted: its requests go on unchecked, as
    the engine still enforces its context.

    Args:
        model_paths: model id → folder.
        limit: the prompt-token cap (all prompts of a request together), or None.
        remote_code: the models whose tokenizers may run code from their folders.
        contexts: model id → context length (`max_model_len`), for the default `max_tokens`.
        tokenizers: model id → a tokenizer already loaded (the hf backend's engines' own).
    """

    def __init__(
        self,
        model_paths: dict[str, str],
        limit: int | None,
        remote_code: frozenset[str] = frozenset(),
        contexts: dict[str, int | None] | None = None,
        tokenizers: dict[str, Any] | None = None,
    ) -> None:
        self.limit = limit
        self.paths = dict(model_paths)
        self.remote_code = remote_code
        self.contexts = dict(contexts or {})
        self._tok: dict[str, Any] = dict(tokenizers or {})
        self._token_chars: dict[str, int] = {}
        # The serve ingress counts in worker threads: one at a time, as a fast tokenizer
        # shared between threads can fail ("Already borrowed") and a first load must not race.
        self._lock = threading.Lock()

    def token_chars(self, model: str) -> int | None:
        """The most characters one token of the model's vocabulary stands for; None when the
        tokenizer is not loaded here.

        A text of C characters is at least C / token_chars tokens (a byte-level token covers
        as many bytes as its vocabulary entry has characters, and a character is at least a
        byte), which bounds a prompt's tokens without tokenizing it.
        """
        if model not in self._token_chars:
            tok = self.tokenizer(model) if model in self.paths else None
            if tok is None:
                return None
            self._token_chars[model] = max((len(k) for k in tok.get_vocab()), default=1) or 1
        return self._token_chars[model]

    def precheck(self, model: str, chars: int, *, longest: int | None = None, messages: int = 0) -> None:
        """Refuse a prompt that cannot fit before any tokenizer or chat template sees it.

        A text of more than N × `token_chars` characters has more than N tokens, and a chat
        of more than N turns too (each turn adds at least its role marker). N is the prompt
        cap for all prompts together, and the model's context for the longest one.

        Args:
            model: the model id.
            chars: characters of all prompts of the request together.
            longest: characters of its longest prompt (default `chars`).
            messages: chat turns (0: not a chat, or no chat template).

        Raises:
            RequestRejected: the prompt is above a bound.
        """
        per_token = self.token_chars(model)
        if per_token is None:
            return
        longest = chars if longest is None else longest
        context = self.contexts.get(model)
        for bound, size, where in ((self.limit, chars, "serve.max_prompt_tokens"),
                                   (context, longest, "the model's context")):
            if bound is not None and (size > bound * per_token or messages > bound):
                what = f"{messages} messages" if messages > bound else f"{size} characters"
                raise RequestRejected(
                    f"the prompt ({what}) is longer than the {bound} tokens of {where}; shorten it",
                    param="messages" if messages else "prompt", code="context_length_exceeded",
                )

    def tokenizer(self, model: str) -> Any:
        """The model's tokenizer, or None when it cannot be loaded here."""
        if model not in self._tok:
            try:
                self._tok[model] = prompts.load_tokenizer(self.paths[model], model in self.remote_code)
            except Exception as e:  # count nothing rather than refuse every request
                logger.warning("cannot load the tokenizer of `%s` to count prompts: %s", model, e)
                self._tok[model] = None
        return self._tok[model]

    def chat_tokens(self, model: str, messages: Any, tools: Any = None, documents: Any = None) -> int | None:
        """Tokens of a chat request's whole prompt; None when the model is not counted.

        Raises:
            RequestRejected: `precheck` refuses it untokenized.
        """
        tok = self.tokenizer(model) if model in self.paths else None
        if tok is None:
            return None
        plain = plain_messages(messages)
        extras = chat_extras(messages, tools, documents)
        turns = len(plain) if getattr(tok, "chat_template", None) else 0
        self.precheck(model, sum(len(m["content"]) for m in plain) + len(extras), messages=turns)
        try:
            ids = prompts.render_prompt(tok, plain, apply_chat_template=True)[1]
        except Exception:  # a template that refuses these turns: count the raw text
            ids = prompts.render_prompt(tok, plain, apply_chat_template=False)[1]
        return len(ids) + (len(tok(extras, add_special_tokens=False)["input_ids"]) if extras else 0)

    def completion_tokens(self, model: str, prompt: Any) -> list[int] | None:
        """Tokens of each prompt of a /v1/completions `prompt`; None when not counted.

        Raises:
            RequestRejected: `precheck` refuses it untokenized.
        """
        tok = self.tokenizer(model) if model in self.paths else None
        if tok is None:
            return None
        batch = prompt if isinstance(prompt, list) else [prompt]
        if batch and isinstance(batch[0], int):
            batch = [batch]
        sizes = [len(p) if isinstance(p, str) else 0 for p in batch]
        self.precheck(model, sum(sizes), longest=max(sizes, default=0))
        return [len(p) if isinstance(p, list) else len(tok(str(p))["input_ids"]) for p in batch]

    def room(self, model: str, longest_prompt: int | None) -> int | None:
        """Context tokens left after the longest prompt; None when either is unknown."""
        context = self.contexts.get(model)
        if context is None or longest_prompt is None:
            return None
        return context - longest_prompt

    def check_chat(self, model: str, messages: Any, tools: Any = None, documents: Any = None,
                   *, need_count: bool = False) -> int | None:
        """Count a chat prompt when the cap or the caller needs it; raise above the cap.

        Returns:
            The prompt's tokens, or None when not counted.
        """
        if self.limit is None and not need_count:
            return None
        with self._lock:
            count = self.chat_tokens(model, messages, tools, documents)
        if count is not None:
            check_prompt_tokens(count, self.limit)
        return count

    def check_completion(self, model: str, prompt: Any, *, need_count: bool = False) -> list[int] | None:
        """Count a completion batch when the cap or the caller needs it; raise when all its
        prompts together are above the cap.

        Returns:
            Each prompt's tokens, or None when not counted.
        """
        if self.limit is None and not need_count:
            return None
        with self._lock:
            counts = self.completion_tokens(model, prompt)
        if counts is not None:
            check_prompt_tokens(sum(counts), self.limit, prompts=len(counts))
        return counts
