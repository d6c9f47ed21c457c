"""The `openai` teacher: any OpenAI-compatible /v1/chat/completions endpoint.

    distray generate --config C teacher.kind=openai teacher.model=gpt-4o teacher.max_in_flight=32

GPT-4, Claude behind a compatible gateway, DeepSeek's API, or a vLLM / Ray Serve deployment
elsewhere. One Ray Data actor holds an async HTTP client; the API key reaches it as the environment
variable `api_key_env` names (set on the actor's runtime_env), never as an argument:

- at most `max_in_flight` requests are open at once (one semaphore across all the actor's batches);
- 429, 408, 409, 5xx, timeouts, dropped connections and malformed 200 bodies (`parse_response`)
  are retried up to `max_retries` times with exponential backoff and full jitter
  (`backoff_base_s` × 2^attempt, capped at `backoff_max_s`); a `Retry-After` (or
  `retry-after-ms`) header is a floor on the wait, up to `max_retry_after_s`;
- 401, 403 and 404 stop the run at once (`StageError` naming the endpoint, the status and what
  to check): a revoked key or a wrong model would fail every row, and rows written as final
  rejects would never be retried. Rows not yet sent stay unsent, so a rerun sends them;
- a request that still fails, or fails with another 4xx, becomes a reject (`request_failed`);
  one that ran out of retries goes to a retry shard, which a rerun sends again; another 4xx
  (an over-long prompt's 400) is marked `_retryable: False` and is final (`teacher.generate`);
- a 200 whose logprobs name a token id no vocabulary has (`token_id:-5`) is final at once
  (`bad_token_id`): training would index the student's embedding table with it;
- once `MIN_REQUESTS_FOR_RATIO` requests have finished, a success ratio under
  `min_success_ratio` stops the run with a `StageError` naming the endpoint and the last errors.

Why not ray.data.llm's HttpRequestProcessor: in Ray 2.60 it sends a whole batch at once (no
in-flight bound), retries without jitter or Retry-After and not on 500, and raises on the first
row that exhausts its retries, which would fail the whole dataset instead of rejecting one row.

Prompts are sent as chat messages; the endpoint applies its own template and counts tokens, so
`generate.max_prompt_tokens` is not checked here: an over-long prompt comes back as HTTP 400,
which becomes a `request_failed` reject.

Logprobs: `top_logprobs` per position come back as token strings. Token ids are only known when
the server returns them as `token_id:<n>`: vLLM's `return_tokens_as_token_ids`, which distray
does not send by itself (OpenAI's own API rejects unknown fields with HTTP 400); set
`teacher.extra_body: {return_tokens_as_token_ids: true}` for a vLLM endpoint. Without token ids
the logprob columns stay null, so a logit loss (`train.loss` kd/reverse_kl/jsd) with an openai
teacher requires that setting (checked at config load).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from distray import formats as F
from distray.config import OpenAITeacher, SamplingConfig
from distray.engines import common
from distray.engines.base import Endpoint, Engine
from distray.engines.common import sample_seed
from distray.engines.results import ERROR
from distray.errors import ConfigError, StageError
from distray.http_retry import backoff_s, fatal_status, retry_after_s, retryable_status

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

__all__ = [
    "BadTokenId", "ENGINE", "MIN_REQUESTS_FOR_RATIO", "MalformedResponse", "OpenAIClient", "OpenAIEngine", "api_key",
    "generate",
    "parse_logprobs", "parse_response", "preflight",
]

#: Finished requests before the success ratio can stop a run (fewer say too little).
MIN_REQUESTS_FOR_RATIO = 10

#: Extra column: HTTP attempts the row took (for stats).
ATTEMPTS = "_attempts"

#: Extra column: False when a failed request is final (a plain 4xx), else True (null on success).
RETRYABLE = "_retryable"


def api_key(teacher: OpenAITeacher) -> str | None:
    """The API key from the env var `teacher.api_key_env` names.

    Raises:
        ConfigError: the variable is named but not set.
    """
    if not teacher.api_key_env:
        return None
    key = os.environ.get(teacher.api_key_env)
    if not key:
        raise ConfigError(
            f"`teacher.api_key_env` names {teacher.api_key_env}, which is not set; export it, or "
            "set teacher.api_key_env: null for an endpoint that needs no key"
        )
    return key


def preflight(teacher: OpenAITeacher, key: str | None) -> None:
    """One quick request before the run starts, so a wrong URL or key fails in seconds.

    Raises:
        StageError: the endpoint cannot be reached, or rejects the key.
    """
    import httpx

    url = teacher.base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.get(url, headers=headers, timeout=min(teacher.timeout_s, 15.0))
    except httpx.HTTPError as e:
        raise StageError(
            f"cannot reach the teacher endpoint {teacher.base_url} ({type(e).__name__}: {e}); "
            "check teacher.base_url and that the server is up"
        ) from e
    if resp.status_code in (401, 403):
        raise StageError(
            f"the teacher endpoint {teacher.base_url} refused the API key (HTTP "
            f"{resp.status_code}); check the key in ${teacher.api_key_env}"
        )


class MalformedResponse(ValueError):
    """A 200 body that is not a chat completion distray can store; the request is retried."""


class BadTokenId(MalformedResponse):
    """A `token_id:<n>` that no vocabulary has (negative, or past int32): the row is rejected
    for good (`bad_token_id`), since training would index an embedding table with it."""


#: Token ids are stored as int32 (`formats.TEACHER_DATA_SCHEMA`).
_MAX_TOKEN_ID = 2**31 - 1


def _parse_token_id(token: str, where: str = "logprobs.content") -> int | None:
    """The id of a `token_id:<n>` token, None for a token string.

    Raises:
        BadTokenId: `n` is negative or does not fit int32.
    """
    if token.startswith("token_id:"):
        try:
            tid = int(token.split(":", 1)[1])
        except ValueError:
            return None
        if not 0 <= tid <= _MAX_TOKEN_ID:
            raise BadTokenId(
                f"{where}.token is {token[:40]!r}: a token id must be between 0 and {_MAX_TOKEN_ID}"
            )
        return tid
    return None


def _logprob(value: Any, where: str) -> float:
    """A logprob as a float ≤ 0; -inf becomes -1e30 (Arrow and the KD loss need finite values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedResponse(f"{where}.logprob is {type(value).__name__}, not a number")
    v = float(value)
    # A logprob is ≤ 0; a little above 0 is float rounding, more is garbage.
    if math.isnan(v) or v > 1e-3:
        raise MalformedResponse(f"{where}.logprob is {v}")
    return min(max(v, -1e30), 0.0)


def _entry(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedResponse(f"{where} is {type(value).__name__}, not an object")
    return value


def parse_logprobs(content: list[dict[str, Any]] | None, k: int) -> tuple[Any, Any, Any]:
    """`choices[0].logprobs.content` → (response ids, top-k ids, top-k logprobs), or Nones
    when the server gave token strings rather than ids.

    Raises:
        MalformedResponse: an entry is not an object, or a logprob is NaN, positive or not a
            number (it would poison the KD loss).
        BadTokenId: a token id is negative or past int32 (training would index with it).
    """
    if not content:
        return None, None, None
    if not isinstance(content, list):
        raise MalformedResponse(f"logprobs.content is {type(content).__name__}, not a list")
    resp_ids: list[int] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for i, raw in enumerate(content):
        pos = _entry(raw, f"logprobs.content[{i}]")
        tid = _parse_token_id(str(pos.get("token", "")), f"logprobs.content[{i}]")
        if tid is None:  # token strings, not ids: the columns stay null, nothing to check
            return None, None, None
        resp_ids.append(tid)
        cands = pos.get("top_logprobs") or []
        if not isinstance(cands, list):
            raise MalformedResponse(f"logprobs.content[{i}].top_logprobs is not a list")
        where = f"logprobs.content[{i}].top_logprobs"
        scored = []
        for j, raw_cand in enumerate(cands):
            c = _entry(raw_cand, f"{where}[{j}]")
            scored.append((_logprob(c.get("logprob"), f"{where}[{j}]"), c))
        best = sorted(scored, key=lambda sc: -sc[0])[:k]
        ids = [_parse_token_id(str(c.get("token", "")), where) for _, c in best]
        if any(i is None for i in ids):
            return None, None, None
        top_ids.append([int(i) for i in ids if i is not None])
        top_lps.append([lp for lp, _ in best])
    return resp_ids, top_ids, top_lps


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedResponse(f"usage.{name} is {value!r}, not a count")
    return value


def _content(message: dict[str, Any]) -> str:
    """The answer text: a string, or a list of `{type: text, text}` parts (some gateways)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise MalformedResponse(f"message.content is {type(content).__name__}, not text")


def parse_response(data: Any, k: int | None) -> dict[str, Any]:
    """A chat-completion body → the teacher-data columns of its first choice, type-checked.

    Every value is checked before it reaches Arrow or the KD loss: a body with a null or
    string `message`, non-text `content`, string token counts or NaN logprobs raises.

    Args:
        data: the decoded JSON body of an HTTP 200.
        k: the top-k logprobs asked for, or None.

    Returns:
        `{response, finish_reason, prompt_tokens, completion_tokens, response_token_ids,
        topk_token_ids, topk_logprobs}`.

    Raises:
        MalformedResponse: the body does not have that shape or those types.
    """
    body = _entry(data, "the body")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse("`choices` is missing or empty")
    choice = _entry(choices[0], "choices[0]")
    message = _entry(choice.get("message"), "choices[0].message")
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        raise MalformedResponse(f"finish_reason is {type(finish).__name__}, not a string")
    usage = body.get("usage")
    usage = {} if usage is None else _entry(usage, "usage")
    ids = top_ids = top_lps = None
    if k is not None:
        lp = choice.get("logprobs")
        if lp is not None:
            ids, top_ids, top_lps = parse_logprobs(_entry(lp, "logprobs").get("content"), k)
    return {
        F.RESPONSE: _content(message),
        F.FINISH_REASON: finish or "stop",
        F.PROMPT_TOKENS: _count(usage, "prompt_tokens"),
        F.COMPLETION_TOKENS: _count(usage, "completion_tokens"),
        F.RESPONSE_TOKEN_IDS: ids,
        F.TOPK_TOKEN_IDS: top_ids,
        F.TOPK_LOGPROBS: top_lps,
    }


class _Stop(Exception):
    """A status that fails every later request too (401, 403, 404): the run stops."""


class OpenAIClient:
    """A Ray Data callable class (async): answers a batch of rows over HTTP.

    The API key is read here from the environment variable `teacher.api_key_env` names, so it
    never travels as an argument (arguments are pickled into the actor's task spec).
    """

    def __init__(
        self,
        teacher: dict[str, Any],
        sampling: dict[str, Any],
        logprobs: int | None,
    ) -> None:
        self.t = OpenAITeacher(**teacher)
        self.s = SamplingConfig(**sampling)
        self.k = logprobs
        self.url = self.t.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        key = api_key(self.t)
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self.ok = 0
        self.failed = 0
        self.last_errors: deque[str] = deque(maxlen=3)
        self.stopped: str | None = None

    def _payload(self, row: dict[str, Any]) -> dict[str, Any]:
        s = self.s
        body: dict[str, Any] = {
            "model": self.t.model,
            "messages": row[F.MESSAGES],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
        }
        seed = sample_seed(s, int(row.get(F.SAMPLE_INDEX) or 0))
        if seed is not None:
            body["seed"] = seed
        if s.stop:
            body["stop"] = list(s.stop)
        if self.k is not None:
            body["logprobs"] = True
            body["top_logprobs"] = self.k
        body.update(self.t.extra_body)
        return body

    def _stop_message(self, code: int, text: str) -> str:
        t = self.t
        if code == 404:
            fix = (
                f"check teacher.model (`{t.model}`: the endpoint does not know it) and "
                f"teacher.base_url (`{t.base_url}`: it must end in /v1)"
            )
        elif t.api_key_env:
            fix = (
                f"check the API key in ${t.api_key_env} (teacher.api_key_env): it was refused "
                "or lacks access to this model"
            )
        else:
            fix = "the endpoint needs an API key: set teacher.api_key_env to the variable holding it"
        return (
            f"the teacher endpoint {self.url} answered HTTP {code} ({text[:200]!r}); {fix}. "
            "The run stopped at once: rows already answered are kept, rows not yet sent stay "
            "unsent and a rerun sends them"
        )

    async def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        import httpx

        assert self._client is not None and self._sem is not None
        body = self._payload(row)
        t = self.t
        error = "request_failed: no attempt made"
        attempt = 0
        retryable = True
        row["_t0"] = time.time()
        for attempt in range(t.max_retries + 1):
            retry_after = None
            async with self._sem:
                if self.stopped:  # another row hit a 401/403/404: send nothing more
                    raise _Stop(self.stopped)
                try:
                    resp = await self._client.post(self.url, json=body, headers=self.headers)
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    error = f"request_failed: {type(e).__name__} after {attempt + 1} attempts"
                    retryable = True
                else:
                    if resp.status_code == 200:
                        try:
                            return self._result(row, parse_response(resp.json(), self.k), attempt + 1)
                        except BadTokenId as e:  # the server's tokenizer is broken: final
                            error = f"bad_token_id: {e}"
                            retryable = False
                        except ValueError as e:  # MalformedResponse, or a body that is not JSON
                            error = f"request_failed: malformed response ({type(e).__name__}: {e})"
                            retryable = True
                    elif fatal_status(resp.status_code):
                        self.stopped = self.stopped or self._stop_message(resp.status_code, resp.text)
                        raise _Stop(self.stopped)
                    else:
                        retryable = retryable_status(resp.status_code)
                        retry_after = retry_after_s(resp.headers)
                        error = (
                            f"request_failed: HTTP {resp.status_code} after {attempt + 1} "
                            f"attempts: {resp.text[:200]}"
                        )
            if not retryable or attempt == t.max_retries:
                break
            # Sleep outside the semaphore, so waiting rows do not hold request slots.
            await asyncio.sleep(
                backoff_s(attempt, t.backoff_base_s, t.backoff_max_s, retry_after, t.max_retry_after_s)
            )
        self.failed += 1
        self.last_errors.append(error)
        out = common.empty_result(row, error)
        out[ATTEMPTS] = attempt + 1
        out[RETRYABLE] = retryable
        # Every row carries the same keys: Arrow takes a batch's columns from its first row.
        out["_t1"] = None
        return out

    def _result(self, row: dict[str, Any], columns: dict[str, Any], attempts: int) -> dict[str, Any]:
        row.update(columns)
        row[ERROR] = None
        row[ATTEMPTS] = attempts
        row[RETRYABLE] = None
        row["_t1"] = time.time()
        self.ok += 1
        return row

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import httpx

        if self._client is None:
            # Created here, inside the actor's event loop, which every batch shares.
            n = self.t.max_in_flight
            self._client = httpx.AsyncClient(
                timeout=self.t.timeout_s,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            )
            self._sem = asyncio.Semaphore(n)
        rows = batch.to_pylist()
        for r in rows:
            r.setdefault(ERROR, None)
        tasks = [asyncio.ensure_future(self._one(r)) for r in rows]
        try:
            out = await asyncio.gather(*tasks)
        except _Stop as e:
            # Rows still waiting for a request slot are never sent; the batch writes nothing.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise StageError(str(e)) from None
        done = self.ok + self.failed
        if done >= MIN_REQUESTS_FOR_RATIO and self.ok / done < self.t.min_success_ratio:
            raise StageError(
                f"the teacher endpoint {self.t.base_url} is failing: {self.ok} of {done} requests "
                f"succeeded ({self.ok / done:.0%}) < teacher.min_success_ratio "
                f"({self.t.min_success_ratio:.0%}); last errors: {list(self.last_errors)}. Rows "
                "already answered are kept; rerun to resume once the endpoint is healthy"
            )
        return pa.Table.from_pylist(out)


def generate(
    ds: ray.data.Dataset,
    teacher: OpenAITeacher,
    sampling: SamplingConfig,
    logprobs: int | None,
) -> ray.data.Dataset:
    """Answer every teacher row of `ds` through the endpoint (see the module docstring)."""
    import ray.data

    key = api_key(teacher)
    preflight(teacher, key)
    # The key reaches the actor as an environment variable (merged into the job's runtime_env),
    # never as a constructor argument.
    env = {teacher.api_key_env: key} if teacher.api_key_env and key else {}
    return ds.map_batches(
        OpenAIClient,
        fn_constructor_kwargs={
            "teacher": teacher.model_dump(),
            "sampling": sampling.model_dump(),
            "logprobs": logprobs,
        },
        batch_format="pyarrow",
        batch_size=teacher.max_in_flight,
        # Several batches in flight on the actor's event loop keep the request pool full
        # while a slow batch drains; the semaphore still bounds open requests.
        compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=4),
        num_cpus=0.5,
        runtime_env={"env_vars": env} if env else None,
    )


class OpenAIEngine(Engine):
    """`teacher.kind: openai`: an OpenAI-compatible endpoint (prompt limits are the server's)."""

    kind = "openai"
    local = False
    config: OpenAITeacher

    def generate(
        self, ds: ray.data.Dataset, sampling: SamplingConfig, logprobs: int | None, *,
        max_prompt_tokens: int | None = None,
    ) -> ray.data.Dataset:
        return generate(ds, self.config, sampling, logprobs)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        t = self.config
        return (prompt_tokens * t.usd_per_1m_input_tokens + completion_tokens * t.usd_per_1m_output_tokens) / 1e6

    def check_answered(self, part: dict[str, Any]) -> None:
        """The end-of-run success-ratio check (the actor stops early once enough requests
        finished); `part` holds `teacher_requests` and the reject `reasons` of a pass.

        Raises:
            StageError: fewer than `min_success_ratio` of the requests succeeded.
        """
        t = self.config
        n = part["teacher_requests"]
        failed = part["reasons"].get("request_failed", 0)
        if n and (n - failed) / n < t.min_success_ratio:
            raise StageError(
                f"the teacher endpoint {t.base_url} is failing: {n - failed} of {n} requests "
                f"succeeded ({(n - failed) / n:.0%}) < teacher.min_success_ratio "
                f"({t.min_success_ratio:.0%}); see the request_failed rows in "
                "rejects/retry-*, which a rerun sends again once the endpoint is healthy"
            )

    def endpoint(self) -> Endpoint:
        t = self.config
        return Endpoint(
            base_url=t.base_url, model=t.model, api_key_env=t.api_key_env, timeout_s=t.timeout_s,
            max_retries=t.max_retries, backoff_base_s=t.backoff_base_s, backoff_max_s=t.backoff_max_s,
        )


ENGINE = OpenAIEngine
