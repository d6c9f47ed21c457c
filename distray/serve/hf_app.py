"""The `hf` serve backend: transformers in a plain Serve deployment, for machines without vLLM.

    distray serve --config run.yaml serve.backend=hf

Same routes and the same hardened front as the vllm backend. Each replica holds one
`distray.hf_engine.HFEngine` per model; a request decodes one token per forward step, and
concurrent requests interleave token by token (no batching, but fair time to first token).
Streams are detokenized incrementally (`hf_engine.IncrementalText`): stop strings are found
across tokens and never sent. `n` must be 1. Every check runs before a stream starts; an engine
failure mid-stream still ends the stream with an error event and `[DONE]`.
"""

# No `from __future__ import annotations` here on purpose: FastAPI reads the route handlers'
# annotations (the request classes below) when the routes are declared.

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distray import prompts
from distray.config import DistrayConfig
from distray.hf_engine import HFEngine, IncrementalText
from distray.serve.endpoints import trusts_remote_code
from distray.serve.front import harden
from distray.serve.guards import (
    Limits,
    PromptCounter,
    RequestRejected,
    chat_extras,
    check_prompt_tokens,
    check_seed,
    check_stop,
    openai_error,
    output_budget,
    plain_messages,
)

__all__ = ["build", "hf_app"]

logger = logging.getLogger(__name__)

#: Context length assumed for a model whose config does not state one.
DEFAULT_MAX_MODEL_LEN = 2048


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


class _ChatRequest(_SamplingFields):
    messages: list[_Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None
    documents: list[Any] | None = None


class _CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] = Field(...)


def _chat_prompt_ids(engine: HFEngine, messages: list[_Message]) -> list[int]:
    """The chat prompt as `prompts.render_prompt` renders it for every other stage."""
    plain = plain_messages([m.model_dump() for m in messages])
    if not getattr(engine.tok, "chat_template", None):
        raise RequestRejected(
            "cannot apply the chat template: the model has none; use /v1/completions", param="messages"
        )
    try:
        return prompts.render_prompt(engine.tok, plain, apply_chat_template=True)[1]
    except Exception as e:
        raise RequestRejected(f"cannot apply the chat template: {e}", param="messages") from e


def _completion_prompt_ids(engine: HFEngine, prompt: Any) -> list[int]:
    """A completion prompt (one string, a one-string list, or token ids) as token ids."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise RequestRejected("the hf backend takes one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        vocab = len(engine.tok)  # once: len() of a tokenizer walks its added tokens
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestRejected("a prompt token id is out of vocabulary", param="prompt")
        return list(prompt)
    return list(engine.tok(prompt)["input_ids"])


def _chat_prompt(counter: PromptCounter, name: str, engine: HFEngine, body: "_ChatRequest") -> tuple[list[int], int]:
    """(prompt ids, tokens of tools/tool calls/documents) of a chat request; run in a worker
    thread, after `PromptCounter.precheck` refused what cannot fit without tokenizing it."""
    messages = [m.model_dump() for m in body.messages]
    extras = chat_extras(messages, body.tools, body.documents)
    chars = sum(len(m["content"]) for m in plain_messages(messages)) + len(extras)
    counter.precheck(name, chars, messages=len(messages))
    prompt_ids = _chat_prompt_ids(engine, body.messages)
    extra_tokens = len(engine.tok(extras, add_special_tokens=False)["input_ids"]) if extras else 0
    return prompt_ids, extra_tokens


def _completion_prompt(counter: PromptCounter, name: str, engine: HFEngine, prompt: Any) -> list[int]:
    """A completion prompt's ids; run in a worker thread, after `PromptCounter.precheck`."""
    if isinstance(prompt, str):
        counter.precheck(name, len(prompt))
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        counter.precheck(name, len(prompt[0]))
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        bound = min(b for b in (counter.limit, counter.contexts.get(name)) if b is not None)
        if len(prompt) > bound:
            check_prompt_tokens(len(prompt), bound)
    return _completion_prompt_ids(engine, prompt)


class _Answer:
    """One request's answer: the engine's token stream as OpenAI JSON or SSE chunks.

    Args:
        max_tokens: the request's `max_tokens` (or `max_completion_tokens`); None when omitted.
        extra_tokens: prompt tokens the engine does not see but the cap counts (tools, ...).

    Raises:
        RequestRejected: `n` is not 1, the seed is out of range, the prompt is empty or over
            the prompt cap, or prompt + max_tokens does not fit in the model's context.
    """

    _END = object()

    def __init__(
        self, name: str, engine: HFEngine, body: _SamplingFields, prompt_ids: list[int],
        max_tokens: int | None, limits: Limits, *, chat: bool, extra_tokens: int = 0,
        param: str = "max_tokens",
    ) -> None:
        if body.n != 1:
            raise RequestRejected("the hf backend supports n=1 only", param="n")
        check_seed(body.seed)
        check_stop(body.stop)
        if not prompt_ids:
            raise RequestRejected("the prompt is empty", param="prompt")
        check_prompt_tokens(len(prompt_ids) + extra_tokens, limits.max_prompt_tokens)
        max_len = engine.max_model_len or DEFAULT_MAX_MODEL_LEN
        budget = output_budget(
            max_tokens, body.n, limits.max_tokens_cap, room=max_len - len(prompt_ids), param=param
        )
        if len(prompt_ids) + budget > max_len:
            raise RequestRejected(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({budget}) exceeds the "
                f"model's context of {max_len} tokens",
                param="max_tokens", code="context_length_exceeded",
            )
        self.name, self.engine, self.body = name, engine, body
        self.prompt_ids, self.budget, self.chat = prompt_ids, budget, chat
        self.stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def pieces(self) -> AsyncIterator[tuple[str, str | None, int]]:
        """(text delta, finish_reason or None, completion tokens so far), one per token."""
        b = self.body
        it = self.engine.stream(
            self.prompt_ids, max_tokens=self.budget, temperature=b.temperature, top_p=b.top_p,
            seed=b.seed, ignore_eos=b.ignore_eos,
        )
        text = IncrementalText(self.engine.tok, self.stops)
        while True:
            # Each step blocks on the model: run it off the event loop.
            tok: Any = await asyncio.to_thread(next, it, self._END)
            if tok is self._END:
                done = len(text.ids)
                rest = text.flush()
                yield rest, "stop" if text.stopped or done < self.budget else "length", done
                return
            delta = text.push(tok)
            if text.stopped:
                yield delta, "stop", len(text.ids)
                return
            yield delta, None, len(text.ids)

    def usage(self, done: int) -> dict[str, int]:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": done, "total_tokens": n + done}

    def choice(self, delta: str, finish: str | None, stream: bool) -> dict[str, Any]:
        if self.chat:
            key = "delta" if stream else "message"
            msg = {"role": "assistant", "content": delta} if not stream else {"content": delta}
            return {"index": 0, key: msg, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}

    async def whole(self) -> dict[str, Any]:
        """The non-streamed response body."""
        text, finish, done = "", "stop", 0
        async for delta, fin, done in self.pieces():  # noqa: B007 (done: the last count)
            text += delta
            finish = fin or finish
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.name,
                "choices": [self.choice(text, finish, False)], "usage": self.usage(done)}

    async def sse(self) -> AsyncIterator[str]:
        """The streamed response: `data: {chunk}` events, then `data: [DONE]`."""

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        obj = "chat.completion.chunk" if self.chat else "text_completion"
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.name}
        if self.chat:
            yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        done = 0
        try:
            async for delta, fin, done in self.pieces():  # noqa: B007 (done: the last count)
                if delta or fin:
                    yield event({**head, "choices": [self.choice(delta, fin, True)]})
        except Exception as e:  # the 200 is sent: end the stream with an error, not a cut
            logger.exception("hf stream of `%s` failed", self.name)
            yield event(openai_error(f"the engine failed: {type(e).__name__}", type="server_error"))
            yield "data: [DONE]\n\n"
            return
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield event({**head, "choices": [], "usage": self.usage(done)})
        yield "data: [DONE]\n\n"


async def _respond(answer: _Answer) -> Any:
    from starlette.responses import JSONResponse, StreamingResponse

    if answer.body.stream:
        return StreamingResponse(answer.sse(), media_type="text/event-stream")
    return JSONResponse(await answer.whole())


def hf_app(
    models: dict[str, str], limits: Limits, digest: str | None, deployment_options: dict[str, Any],
    remote_code: frozenset[str] = frozenset(),
) -> Any:
    """A Serve deployment serving `models` with transformers behind the same hardened front.

    Args:
        models: model id → folder.
        limits: the output and prompt caps.
        digest: the API key's digest, or None to serve without a key.
        deployment_options: Serve deployment options (autoscaling, actor resources).
        remote_code: the models whose folders may run their own code (trust_remote_code).
    """
    from fastapi import FastAPI
    from ray import serve

    app = harden(FastAPI(), digest, limits.max_request_bytes, limits.body_read_timeout_s)

    @serve.deployment(**deployment_options)
    @serve.ingress(app)
    class HFServer:
        def __init__(self, models: dict[str, str], limits: Limits, remote_code: frozenset[str]) -> None:
            self.models = {
                name: HFEngine(path, trust_remote_code=name in remote_code) for name, path in models.items()
            }
            self.limits = limits
            self.created = int(time.time())
            self.counter = PromptCounter(
                models, limits.max_prompt_tokens, remote_code,
                contexts={n: e.max_model_len or DEFAULT_MAX_MODEL_LEN for n, e in self.models.items()},
                tokenizers={n: e.tok for n, e in self.models.items()},
            )

        def _model(self, name: str | None) -> tuple[str, HFEngine]:
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
            # Status only: this route is open, model names are for authenticated clients.
            return {"status": "ok"}

        @app.get("/v1/models")
        async def list_models(self) -> Any:
            return {"object": "list", "data": [self._card(n) for n in sorted(self.models)]}

        @app.get("/v1/models/{model:path}")
        async def get_model(self, model: str) -> Any:
            name, _ = self._model(model)
            return self._card(name)

        @app.post("/v1/chat/completions")
        async def chat(self, body: _ChatRequest) -> Any:
            name, engine = self._model(body.model)
            check_stop(body.stop)  # before the prompt work: the cheapest refusal first
            # Off the event loop: it serves every request of this replica.
            prompt_ids, extra_tokens = await asyncio.to_thread(_chat_prompt, self.counter, name, engine, body)
            max_tokens: int | None
            if body.max_completion_tokens is not None:
                max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
            else:
                max_tokens, param = body.max_tokens, "max_tokens"
            return await _respond(_Answer(
                name, engine, body, prompt_ids, max_tokens, self.limits, chat=True,
                extra_tokens=extra_tokens, param=param,
            ))

        @app.post("/v1/completions")
        async def completions(self, body: _CompletionRequest) -> Any:
            name, engine = self._model(body.model)
            check_stop(body.stop)
            prompt_ids = await asyncio.to_thread(_completion_prompt, self.counter, name, engine, body.prompt)
            return await _respond(
                _Answer(name, engine, body, prompt_ids, body.max_tokens, self.limits, chat=False)
            )

    server: Any = HFServer
    return server.bind(models=models, limits=limits, remote_code=remote_code)


def build(cfg: DistrayConfig, models: dict[str, str], limits: Limits, digest: str | None) -> Any:
    """The hf backend's Serve application for `models` (model id → folder)."""
    s = cfg.serve
    options = {
        "autoscaling_config": {**s.autoscaling_config(), "min_replicas": max(1, s.min_replicas)},
        "max_ongoing_requests": max(64, 4 * s.target_ongoing_requests),
        "ray_actor_options": {"num_cpus": 1},
    }
    remote_code = frozenset(n for n in models if trusts_remote_code(cfg, n))
    return hf_app(models, limits, digest, options, remote_code)
