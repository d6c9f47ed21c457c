"""The openai teacher's HTTP client against a scripted local server (no Ray): malformed bodies,
401/403/404 stopping the run, Retry-After waited for and capped, the key read from the env.

    .venv/bin/python -m pytest tests/unit/test_openai_teacher.py -q
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pyarrow as pa
import pytest

from distray import formats as F
from distray.config import OpenAITeacher, SamplingConfig
from distray.engines.openai import BadTokenId, MalformedResponse, OpenAIClient, parse_response
from distray.errors import StageError
from distray.http_retry import backoff_s, fatal_status, retry_after_s

KEY_ENV = "DISTRAY_TEST_TEACHER_KEY"
KEY = "sk-test-4b1d"

Reply = tuple[int, dict[str, str], Any]


def ok_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    body.update(extra)
    return body


class Scripted:
    """127.0.0.1 server answering POSTs from a script of (status, headers, body); the last
    entry repeats. Records each request's time and Authorization header."""

    def __init__(self, script: list[Reply]) -> None:
        self.script = list(script)
        self.lock = threading.Lock()
        self.times: list[float] = []
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    server.times.append(time.monotonic())
                    server.auth.append(self.headers.get("Authorization"))
                    i = min(len(server.times), len(server.script)) - 1
                    code, headers, body = server.script[i]
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    def start(script: list[Reply]) -> Scripted:
        servers.append(Scripted(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def client(server: Scripted, logprobs: int | None = None, **teacher: Any) -> OpenAIClient:
    t = {"model": "m", "base_url": server.base_url, "api_key_env": None, "max_retries": 3,
         "backoff_base_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 10, **teacher}
    return OpenAIClient(OpenAITeacher(**t).model_dump(), SamplingConfig().model_dump(), logprobs)


def rows(n: int) -> pa.Table:
    return pa.Table.from_pylist([
        {F.ID: f"r{i}", F.MESSAGES: [{"role": "user", "content": f"q{i}"}], F.SAMPLE_INDEX: 0}
        for i in range(n)
    ])


def answer(c: OpenAIClient, n: int = 1) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = asyncio.run(c(rows(n))).to_pylist()
    return out


# ---- malformed 200 bodies are retried, never stored or crashed on ---------------------------


MALFORMED = {
    "message null": ok_body() | {"choices": [{"message": None, "finish_reason": "stop"}]},
    "message a string": ok_body() | {"choices": [{"message": "hi", "finish_reason": "stop"}]},
    "content a list of numbers": ok_body() | {"choices": [{"message": {"content": [1, 2]}}]},
    "content an object": ok_body() | {"choices": [{"message": {"content": {"a": 1}}}]},
    "usage counts as strings": ok_body(usage={"prompt_tokens": "3", "completion_tokens": "1"}),
    "usage a list": ok_body(usage=[3, 1]),
    "choices empty": ok_body(choices=[]),
    "body a list": [ok_body()],
    "finish_reason a number": ok_body() | {"choices": [{"message": {"content": "x"}, "finish_reason": 1}]},
    "not JSON": b"<html>bad gateway</html>",
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_200_is_retried_then_answered(scripted, what: str) -> None:
    server = scripted([(200, {}, MALFORMED[what]), (200, {}, ok_body("fine"))])
    (row,) = answer(client(server))
    assert row["error"] is None and row["response"] == "fine" and row["_attempts"] == 2
    # The stored row is one Arrow can write: the types the teacher-data schema wants.
    pa.Table.from_pylist([{f.name: row.get(f.name) for f in F.TEACHER_DATA_SCHEMA}],
                         schema=F.TEACHER_DATA_SCHEMA)


def test_malformed_every_time_is_a_retryable_reject(scripted) -> None:
    server = scripted([(200, {}, MALFORMED["message null"])])
    (row,) = answer(client(server, max_retries=2))
    assert row["error"].startswith("request_failed: malformed response")
    assert row["_retryable"] is True and row["response"] is None and len(server.times) == 3


def logprob_body(lp: Any) -> dict[str, Any]:
    body = ok_body("a")
    body["choices"][0]["logprobs"] = {"content": [
        {"token": "token_id:5", "logprob": -0.1,
         "top_logprobs": [{"token": "token_id:5", "logprob": lp}, {"token": "token_id:9", "logprob": -3.0}]},
    ]}
    return body


@pytest.mark.parametrize("lp", [math.nan, math.inf, "-0.1", None, 5.0])
def test_bad_logprobs_never_reach_kd(lp: Any) -> None:
    with pytest.raises(MalformedResponse, match="logprob"):
        parse_response(json.loads(json.dumps(logprob_body(lp))), 2)


def test_good_logprobs_and_text_parts_parse() -> None:
    cols = parse_response(logprob_body(-math.inf), 2)
    assert cols[F.TOPK_TOKEN_IDS] == [[9, 5]] and cols[F.TOPK_LOGPROBS] == [[-3.0, -1e30]]
    parts = ok_body() | {"choices": [{"message": {"content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}}]}
    assert parse_response(parts, None)[F.RESPONSE] == "ab"
    assert parse_response(ok_body() | {"usage": None}, None)[F.PROMPT_TOKENS] is None


@pytest.mark.parametrize("where", ["response", "top-k"])
def test_a_negative_token_id_is_a_final_reject_with_its_reason(scripted, where: str) -> None:
    body = logprob_body(-0.5)
    pos = body["choices"][0]["logprobs"]["content"][0]
    (pos if where == "response" else pos["top_logprobs"][1])["token"] = "token_id:-5"
    with pytest.raises(BadTokenId, match="token_id:-5"):
        parse_response(body, 2)
    server = scripted([(200, {}, body)])
    (row,) = answer(client(server, logprobs=2))
    assert row["error"].startswith("bad_token_id: ") and "token_id:-5" in row["error"]
    # Final at once: asked once, not retried now nor on a rerun (generate's retry shards
    # take only retryable failures).
    assert row["_retryable"] is False and len(server.times) == 1 and row[F.TOPK_TOKEN_IDS] is None
    from distray.teacher.publish import is_transient

    assert not is_transient(row)  # a final reject in rejects/, reason `bad_token_id`


# ---- 401 / 403 / 404 stop the run; unsent rows stay unsent --------------------------------


@pytest.mark.parametrize("code", [401, 403, 404])
def test_auth_and_model_errors_stop_at_once(scripted, monkeypatch, code: int) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    server = scripted([(code, {}, {"error": {"message": "nope"}})])
    c = client(server, api_key_env=KEY_ENV, max_in_flight=2)
    with pytest.raises(StageError) as e:
        answer(c, 20)
    msg = str(e.value)
    assert f"HTTP {code}" in msg and server.base_url + "/chat/completions" in msg
    assert (KEY_ENV in msg) if code != 404 else ("teacher.model (`m`" in msg)
    assert KEY not in msg
    # At most the requests already in flight were sent; the other rows were never sent.
    assert len(server.times) <= 2
    with pytest.raises(StageError):  # later batches on the same actor send nothing either
        answer(c, 3)
    assert len(server.times) <= 2


def test_other_4xx_stays_a_final_reject(scripted) -> None:
    server = scripted([(400, {}, {"error": {"message": "prompt too long"}})])
    (row,) = answer(client(server))
    assert row["_retryable"] is False and len(server.times) == 1


# ---- Retry-After: waited for, and capped --------------------------------------------------


def test_retry_after_is_waited_for(scripted) -> None:
    server = scripted([(429, {"Retry-After": "1"}, {"error": "slow down"}), (200, {}, ok_body())])
    (row,) = answer(client(server))
    assert row["error"] is None and len(server.times) == 2
    # backoff alone would wait at most 0.01 s
    assert server.times[1] - server.times[0] >= 0.95


def test_huge_retry_after_is_capped(scripted) -> None:
    server = scripted([(503, {"Retry-After": "86400"}, {"error": "down"}), (200, {}, ok_body())])
    t0 = time.monotonic()
    (row,) = answer(client(server, max_retry_after_s=0.5))
    waited = server.times[1] - server.times[0]
    assert row["error"] is None and 0.45 <= waited < 5 and time.monotonic() - t0 < 10


def test_retry_helpers() -> None:
    random.seed(0)
    assert backoff_s(0, 0.5, 4.0, 86400.0) == 60.0  # the default cap
    assert backoff_s(0, 0.5, 4.0, 86400.0, retry_after_cap_s=2.0) == 2.0
    assert backoff_s(2000, 0.5, 4.0, None) <= 4.0  # no float overflow after many attempts
    assert retry_after_s({"retry-after": "nan"}) is None
    assert retry_after_s({"retry-after": "-5"}) == 0.0
    assert [c for c in (400, 401, 403, 404, 429, 500) if fatal_status(c)] == [401, 403, 404]


# ---- the key travels as an environment variable, not an argument -------------------------


def test_key_is_read_from_the_env_in_the_actor(scripted, monkeypatch) -> None:
    assert "key" not in inspect.signature(OpenAIClient).parameters
    monkeypatch.setenv(KEY_ENV, KEY)
    server = scripted([(200, {}, ok_body())])
    answer(client(server, api_key_env=KEY_ENV))
    assert server.auth == [f"Bearer {KEY}"]


def test_generate_passes_the_key_as_env_only(monkeypatch) -> None:
    from distray.engines import openai as engine

    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr(engine, "preflight", lambda teacher, key: None)
    seen: dict[str, Any] = {}

    class DS:
        def map_batches(self, fn: Any, **kw: Any) -> Any:
            seen.update(kw)
            return self

    teacher = OpenAITeacher(model="m", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    engine.generate(DS(), teacher, SamplingConfig(), None)  # type: ignore[arg-type]
    assert KEY not in repr(seen["fn_constructor_kwargs"])
    assert seen["runtime_env"] == {"env_vars": {KEY_ENV: KEY}}


@pytest.mark.parametrize(("ratio", "stops"), [(0.0, False), (0.4, False), (0.5, False), (0.6, True), (1.0, True)])
def test_min_success_ratio_between_0_and_1(scripted, ratio: float, stops: bool) -> None:
    """Half of 20 requests fail (HTTP 500, no retries): the run goes on at a threshold up to
    50 % and stops above it, naming the figures."""
    server = scripted([(500 if i % 2 else 200, {}, ok_body()) for i in range(20)])
    c = client(server, max_retries=0, min_success_ratio=ratio, max_in_flight=4)
    if stops:
        with pytest.raises(StageError, match=r"10 of 20 requests succeeded \(50%\) < teacher.min_success_ratio"):
            answer(c, 20)
    else:
        out = answer(c, 20)
        assert sum(r[F.RESPONSE] is not None for r in out) == 10
