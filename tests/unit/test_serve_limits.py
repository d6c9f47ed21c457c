"""Serve's request guards and config resolution, without Ray.

    .venv/bin/python -m pytest tests/unit/test_serve_limits.py -q
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from distray.config import config_from_dict
from distray.errors import ConfigError
from distray.hf_engine import IncrementalText
from distray.serve.endpoints import api_key_digest, endpoint_url, resolve_models, served_endpoints
from distray.serve.guards import (
    PromptCounter,
    RequestRejected,
    body_problem,
    check_bearer,
    check_prompt_tokens,
    check_seed,
    check_stop,
    completion_prompt_count,
    key_digest,
    model_context,
    openai_error,
    output_budget,
)
from distray.serve.vllm_app import llm_config


def test_bearer_check() -> None:
    d = key_digest("s3cret")
    assert check_bearer(None, None) is None  # no key configured: open
    assert check_bearer("Bearer s3cret", d) is None
    assert check_bearer("bearer  s3cret ", d) is None
    assert "missing" in (check_bearer(None, d) or "")
    assert "incorrect" in (check_bearer("Bearer nope", d) or "")
    assert "malformed" in (check_bearer("Basic s3cret", d) or "")
    assert "malformed" in (check_bearer("Bearer", d) or "")
    assert "s3cret" not in d  # only the digest travels


def test_output_budget_caps_max_tokens_times_n() -> None:
    assert output_budget(16, 1, 64) == 16
    assert output_budget(None, 1, 64) == 64  # default: the cap, not the whole context
    assert output_budget(None, 4, 64) == 16
    assert output_budget(32, 2, 64) == 32
    with pytest.raises(RequestRejected, match="ask for at most 32") as e:
        output_budget(40, 2, 64)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    with pytest.raises(RequestRejected, match="at least 1"):
        output_budget(0, 1, 64)
    with pytest.raises(RequestRejected, match="`n`"):
        output_budget(None, 0, 64)
    with pytest.raises(RequestRejected, match="max_completion_tokens"):
        output_budget(100, 1, 64, param="max_completion_tokens")


def test_output_cap_counts_every_prompt_of_a_batch() -> None:
    """/v1/completions with a list of prompts: vLLM answers each, so the cap covers them all."""
    prompt = ["a", "b", "c", "d"]
    assert completion_prompt_count(prompt) == 4
    assert completion_prompt_count("a") == completion_prompt_count([1, 2, 3]) == 1
    assert completion_prompt_count([[1, 2], [3]]) == 2
    with pytest.raises(RequestRejected, match=r"× 4 prompts.*ask for at most 16"):
        output_budget(64, 1, 64, prompts=completion_prompt_count(prompt))
    with pytest.raises(RequestRejected, match="at most 8"):
        output_budget(10, 2, 64, prompts=4)
    assert output_budget(None, 1, 64, prompts=4) == 16
    assert output_budget(16, 1, 64, prompts=4) == 16
    with pytest.raises(RequestRejected, match="output cap"):
        output_budget(None, 1, 64, prompts=65)


def test_default_max_tokens_fits_the_context_left() -> None:
    """Without max_tokens, a 512-token model with a 1024 cap still answers (the room it has)."""
    assert output_budget(None, 1, 1024, room=512 - 40) == 472
    assert output_budget(None, 2, 1024, room=600) == 512  # the cap's share is smaller
    assert output_budget(None, 1, 1024, room=None) == 1024  # context unknown: the cap
    with pytest.raises(RequestRejected, match="no room") as e:
        output_budget(None, 1, 1024, room=0)
    assert e.value.code == "context_length_exceeded"
    assert output_budget(100, 1, 1024, room=10) == 100  # asked for: the engine judges the fit


def test_model_context_from_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    assert model_context(str(tmp_path)) == 512
    (tmp_path / "config.json").write_text('{"text_config": {"max_position_embeddings": 4096}}')
    assert model_context(str(tmp_path)) == 4096
    assert model_context(str(tmp_path / "missing")) is None


def test_seed_range() -> None:
    check_seed(None)
    check_seed(2**63 - 1)
    check_seed(-(2**63))
    for bad in (2**64, 2**63, -(2**63) - 1):
        with pytest.raises(RequestRejected, match="64-bit") as e:
            check_seed(bad)
        assert e.value.param == "seed" and e.value.status_code == 400


@pytest.mark.parametrize(("body", "what"), [
    (b'{"prompt": "\\ud800"}', "`prompt` holds a lone UTF-16 surrogate"),
    (b'{"messages": [{"role": "user", "content": "x\\uDFFF"}]}', "`messages[0].content`"),
    (b'{"prompt": "hi", "temperature": NaN}', "`NaN`"),
    (b'{"prompt": "hi", "top_p": -Infinity}', "`-Infinity`"),
])
def test_body_problems_are_named(body: bytes, what: str) -> None:
    assert what in (body_problem(body) or "")


def test_ordinary_bodies_pass() -> None:
    assert body_problem(b'{"prompt": "NaN and Infinity are words", "x": "\\ud83d\\ude00"}') is None
    assert body_problem(b"{not json") is None  # the handler's own 400 names it


def test_prompt_cap() -> None:
    check_prompt_tokens(100, None)
    check_prompt_tokens(100, 100)
    with pytest.raises(RequestRejected, match="101 tokens") as e:
        check_prompt_tokens(101, 100)
    assert e.value.code == "context_length_exceeded"


def test_openai_error_shape() -> None:
    body = openai_error("bad", param="model", code="model_not_found")
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}}


def _cfg(tmp_path, **serve):
    return config_from_dict({"run": {"output_dir": str(tmp_path), "name": "r"}, "serve": serve})


def test_student_folder_must_exist(tmp_path) -> None:
    with pytest.raises(ConfigError, match="run `distray train` first"):
        resolve_models(_cfg(tmp_path))
    student = tmp_path / "r" / "train" / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    assert resolve_models(_cfg(tmp_path)) == {"student": str(student)}


def test_serving_the_teacher_needs_a_local_teacher(tmp_path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path)},
        "teacher": {"kind": "openai", "model": "gpt-4o"},
        "serve": {"model": str(m), "serve_teacher": True},
    })
    with pytest.raises(ConfigError, match="kind vllm or hf"):
        resolve_models(cfg)
    def vllm_teacher(model: str) -> Any:
        return config_from_dict({
            "run": {"output_dir": str(tmp_path)},
            "teacher": {"kind": "vllm", "model": model},
            "serve": {"model": str(m), "serve_teacher": True},
        })

    assert resolve_models(vllm_teacher(str(m))) == {"student": str(m), "teacher": str(m)}
    # A hub id is vLLM's to download; a missing local folder is named, with the fix.
    assert resolve_models(vllm_teacher("org/big"))["teacher"] == "org/big"
    with pytest.raises(ConfigError, match="/models/big.*serve_teacher=false"):
        resolve_models(vllm_teacher("/models/big"))


def test_served_endpoints_and_url(tmp_path) -> None:
    cfg = _cfg(tmp_path, host="0.0.0.0", port=9001, serve_teacher=True, api_key_env="K")
    assert endpoint_url(cfg) == "http://127.0.0.1:9001"
    eps = served_endpoints(cfg)
    assert [e.name for e in eps] == ["student", "teacher"]
    assert eps[0].base_url == "http://127.0.0.1:9001/v1" and eps[0].api_key_env == "K"
    assert served_endpoints(cfg, {"student": "x"}, route_prefix="/hf")[0].base_url == (
        "http://127.0.0.1:9001/hf/v1"
    )


def test_default_bind_is_loopback(tmp_path) -> None:
    assert _cfg(tmp_path).serve.host == "127.0.0.1"


def test_missing_api_key_env_is_a_config_error(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DISTRAY_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="DISTRAY_UNSET_KEY"):
        api_key_digest(_cfg(tmp_path, api_key_env="DISTRAY_UNSET_KEY"))
    monkeypatch.setenv("DISTRAY_UNSET_KEY", "k")
    assert api_key_digest(_cfg(tmp_path, api_key_env="DISTRAY_UNSET_KEY")) == key_digest("k")
    assert os.environ["DISTRAY_UNSET_KEY"] == "k"


def test_open_bind_without_a_key_warns(tmp_path, caplog) -> None:
    from distray.serve import is_loopback, warn_if_open

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.8.0.1") and not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    with caplog.at_level("WARNING", logger="distray.serve"):
        assert warn_if_open(_cfg(tmp_path, host="0.0.0.0", port=8123))
    assert "0.0.0.0" in caplog.text and "serve.api_key_env" in caplog.text
    assert not warn_if_open(_cfg(tmp_path, host="0.0.0.0", api_key_env="K"))
    assert not warn_if_open(_cfg(tmp_path))


# ---- the prompt cap sees the whole request --------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from distray.tiny import make_tokenizer

    return str(make_tokenizer(tmp_path_factory.mktemp("tok-count")))


def test_prompt_cap_counts_all_prompts_together(tok_dir) -> None:
    counter = PromptCounter({"m": tok_dir}, limit=50)
    one = "word " * 8
    each = counter.check_completion("m", [one])
    assert each is not None and each[0] < 50
    with pytest.raises(RequestRejected, match=r"the 8 prompts have \d+ tokens in all"):
        counter.check_completion("m", [one] * 8)
    with pytest.raises(RequestRejected):
        counter.check_completion("m", [list(range(30)), list(range(30))])


def test_prompt_cap_counts_tools_tool_calls_and_documents(tok_dir) -> None:
    counter = PromptCounter({"m": tok_dir}, limit=200)
    msgs = [{"role": "user", "content": "hi"}]
    base = counter.check_chat("m", msgs)
    assert base is not None and base < 50
    big = "x" * 400
    tools = [{"type": "function", "function": {"name": "f", "description": big}}]
    with pytest.raises(RequestRejected, match="above the server's limit of 200"):
        counter.check_chat("m", msgs, tools=tools)
    with pytest.raises(RequestRejected):
        counter.check_chat("m", msgs, documents=[{"title": "t", "text": big}])
    calls = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": big}}]}]
    with pytest.raises(RequestRejected):
        counter.check_chat("m", msgs + calls)


def test_counter_without_a_cap_counts_only_when_asked(tok_dir) -> None:
    counter = PromptCounter({"m": tok_dir}, limit=None, contexts={"m": 512})
    assert counter.check_chat("m", [{"role": "user", "content": "hi"}]) is None
    n = counter.check_chat("m", [{"role": "user", "content": "hi"}], need_count=True)
    assert n is not None and counter.room("m", n) == 512 - n
    assert PromptCounter({"m": "s3://bucket/model"}, limit=10).check_completion("m", "hi " * 50) is None


# ---- the front: body size, body content, key first -------------------------------------------


@pytest.fixture(scope="module")
def front() -> Any:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from distray.serve.front import harden

    app = harden(FastAPI(), key_digest("k"), max_request_bytes=1000)

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        return {"echo": body}

    return TestClient(app, headers={"Authorization": "Bearer k"})


def test_body_over_the_limit_is_413(front) -> None:
    r = front.post("/v1/completions", json={"prompt": "x" * 2000})
    assert r.status_code == 413 and "serve.max_request_bytes" in r.json()["error"]["message"]

    def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b" " * 400

    assert front.post("/v1/completions", content=chunks()).status_code == 413
    assert front.post("/v1/completions", json={"prompt": "x" * 100}).json() == {"echo": {"prompt": "x" * 100}}


def test_key_is_checked_before_the_body(front) -> None:
    r = front.post("/v1/completions", content=b"x" * 5000, headers={"Authorization": "Bearer no"})
    assert r.status_code == 401


@pytest.mark.parametrize("body", [
    b'{"prompt": "\\ud800"}', b'{"prompt": "a", "temperature": NaN}',
])
def test_unusable_text_and_numbers_are_400(front, body: bytes) -> None:
    r = front.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_every_answer_is_counted_with_its_status_and_reason(front) -> None:
    from distray.serve.front import COUNTS

    before = dict(COUNTS)
    front.post("/v1/completions", json={"prompt": "ok"})
    front.post("/v1/completions", json={"prompt": "x" * 2000})
    front.post("/v1/completions", json={"prompt": "ok"}, headers={"Authorization": "Bearer no"})

    def added(key: tuple[str, ...]) -> int:
        return COUNTS.get(key, 0) - before.get(key, 0)

    assert added(("requests", "/v1/completions", "200")) == 1
    assert added(("requests", "/v1/completions", "413")) == 1
    assert added(("rejected", "413", "request_too_large")) == 1
    assert added(("rejected", "401", "invalid_api_key")) == 1


def test_unknown_paths_without_a_key_add_no_new_counters(front) -> None:
    """300 distinct unknown paths, no key: every answer is counted, under one route label."""
    from distray.serve.front import COUNTS

    front.get("/probe-warm", headers={"Authorization": ""})
    before = dict(COUNTS)
    for i in range(300):
        assert front.get(f"/probe-{i}", headers={"Authorization": ""}).status_code == 401
    added = {k: v - before.get(k, 0) for k, v in COUNTS.items() if v != before.get(k, 0)}
    assert added == {("requests", "other", "401"): 300, ("rejected", "401", "invalid_api_key"): 300}
    assert len(COUNTS) == len(before)


def test_metric_labels_come_from_fixed_sets() -> None:
    from distray.serve.front import REASON_LABELS, ROUTE_LABELS, STATUS_LABELS, metric_labels

    assert metric_labels("/v1/chat/completions", 200) == {"route": "/v1/chat/completions", "status": "200"}
    assert metric_labels("/v1/models/anything/at/all", 404)["route"] == "/v1/models/{model}"
    odd = metric_labels("/x" * 500, 418, {"code": "c" * 300, "type": "made_up"})
    assert odd == {"route": "other", "status": "other", "reason": "other"}
    assert metric_labels("/v1/completions", 400, {"code": "int_parsing", "type": "invalid_request_error"})[
        "reason"] == "invalid_request_error"
    assert metric_labels("/health", 401, {"code": "invalid_api_key"})["reason"] == "invalid_api_key"
    assert "other" in ROUTE_LABELS and "other" in STATUS_LABELS and "other" in REASON_LABELS


def test_health_sees_whether_the_key_was_sent() -> None:
    """`/health` is open; the front tells it whether the caller holds the key, so it checks
    the engines only for those who do."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.responses import JSONResponse

    from distray.serve.front import AUTHENTICATED, harden

    app = harden(FastAPI(), key_digest("k"))

    async def health(request: Any) -> Any:
        return JSONResponse({"authenticated": request.scope.get(AUTHENTICATED)})

    app.add_route("/health", health)

    c = TestClient(app)
    assert c.get("/health").json() == {"authenticated": False}
    assert c.get("/health", headers={"Authorization": "Bearer wrong"}).json() == {"authenticated": False}
    assert c.get("/health", headers={"Authorization": "Bearer k"}).json() == {"authenticated": True}


def test_a_body_sent_too_slowly_is_408() -> None:
    """A client trickling its body gets 408 when `body_read_timeout_s` runs out, and the
    handler never runs."""
    import asyncio

    from fastapi import FastAPI

    from distray.serve.front import harden

    app = harden(FastAPI(), None, max_request_bytes=1000, body_read_timeout_s=0.3)
    ran = []

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        ran.append(body)
        return {}

    async def call(pace_s: float) -> tuple[int, dict[str, Any]]:
        parts = [b'{"prompt":', b' "hi"', b"}"]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if not parts:
                await asyncio.sleep(3600)
            await asyncio.sleep(pace_s)
            chunk = parts.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "query_string": b"",
                 "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1)}
        await asyncio.wait_for(app(scope, receive, send), 5)
        import json

        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(body)

    status, body = asyncio.run(call(0.2))  # 0.6 s for the whole body: over the 0.3 s
    assert status == 408 and body["error"]["code"] == "request_timeout" and not ran
    status, _ = asyncio.run(call(0.01))
    assert status == 200 and ran == [{"prompt": "hi"}]


def test_at_most_four_stop_sequences() -> None:
    check_stop(None)
    check_stop("one")
    check_stop(["a", "b", "c", "d"])
    for bad in (["x"] * 5, ["\u0001"] * 100_000):
        with pytest.raises(RequestRejected, match="at most 4") as e:
            check_stop(bad)
        assert e.value.status_code == 400 and e.value.param == "stop"


class _NoTokenizing:
    """A tokenizer whose vocabulary is known but which must never be called."""

    chat_template = "{{ messages }}"

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "abcd": 1}  # at most 4 characters per token

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized a prompt the cheap bound refuses")

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("rendered a prompt the cheap bound refuses")


def test_prompts_that_cannot_fit_are_refused_before_tokenizing() -> None:
    """A prompt over cap × (longest token) characters, or a chat with more turns than the cap,
    is refused by its length alone: the tokenizer and the chat template never see it."""
    counter = PromptCounter({"m": "unused"}, limit=100, tokenizers={"m": _NoTokenizing()})
    assert counter.token_chars("m") == 4
    big = "x" * (8 << 20)
    with pytest.raises(RequestRejected, match="longer than the 100 tokens") as e:
        counter.check_chat("m", [{"role": "user", "content": big}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestRejected, match="101 messages"):
        counter.check_chat("m", [{"role": "user", "content": ""}] * 101)
    with pytest.raises(RequestRejected):
        counter.check_completion("m", ["x" * 300, "x" * 300])  # 600 > 400 characters in all
    # No cap, but the default max_tokens needs a count: the model's context bounds it.
    open_counter = PromptCounter({"m": "unused"}, limit=None, contexts={"m": 512},
                                 tokenizers={"m": _NoTokenizing()})
    with pytest.raises(RequestRejected, match="512 tokens of the model's context"):
        open_counter.check_chat("m", [{"role": "user", "content": big}], need_count=True)
    # Each prompt of a batch fits the context: the context bound looks at the longest one.
    with pytest.raises(AssertionError, match="tokenized"):
        open_counter.check_completion("m", ["x" * 2000] * 4, need_count=True)


def test_the_cheap_bound_never_refuses_what_fits(tok_dir) -> None:
    """On the real tokenizer, prompts at the cap pass the bound and get their real count."""
    counter = PromptCounter({"m": tok_dir}, limit=200, contexts={"m": 512})
    for text in ("hello " * 20, "日本語 " * 10, "🙂" * 20, "x" * 150):
        n = counter.check_chat("m", [{"role": "user", "content": text}], need_count=True)
        assert n is not None and n <= 200


# ---- hf backend: incremental detokenization and stop strings ------------------------------


@pytest.fixture(scope="module")
def byte_tok(tok_dir: str) -> Any:
    """The tiny byte-level BPE tokenizer: multi-byte characters span several tokens."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _stream(tok: Any, ids: list[int], stops: list[str]) -> tuple[list[str], bool]:
    text = IncrementalText(tok, stops)
    chunks = []
    for i in ids:
        chunks.append(text.push(i))
        if text.stopped:
            return chunks, True
    chunks.append(text.flush())
    return chunks, text.stopped


TEXTS = ["hello world, the model answer is 42.", "héllo 日本語 🙂 naïve — ok", "🙂🙂 x 日"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_chunks_add_up_to_the_full_decode(byte_tok, text: str) -> None:
    ids = byte_tok.encode(text, add_special_tokens=False)
    eos = byte_tok.eos_token_id
    for seq in (ids, ids[:-1], ids + [eos] + ids):  # also cut mid-character, and a special token
        chunks, stopped = _stream(byte_tok, seq, [])
        assert "".join(chunks) == byte_tok.decode(seq, skip_special_tokens=True) and not stopped
        assert not any("\ufffd" in c for c in chunks[:-1])  # no half characters mid-stream
    assert "".join(_stream(byte_tok, ids, [])[0][:-1]) == text  # sent as it came, not at the end


def test_random_ids_add_up_to_the_full_decode(byte_tok) -> None:
    import random

    rng = random.Random(0)
    for _ in range(50):
        seq = [rng.randrange(len(byte_tok)) for _ in range(rng.randint(1, 40))]
        assert "".join(_stream(byte_tok, seq, [])[0]) == byte_tok.decode(seq, skip_special_tokens=True)


@pytest.mark.parametrize(("text", "stop"), [
    ("hello world, the model answer is 42.", "o w"),
    ("hello world, the model answer is 42.", "42"),
    ("héllo 日本語 🙂 naïve", "本語 🙂"),
    ("abc", "c"),
])
def test_stop_string_split_across_tokens_is_found_and_not_sent(byte_tok, text: str, stop: str) -> None:
    ids = byte_tok.encode(text, add_special_tokens=False)
    chunks, stopped = _stream(byte_tok, ids, ["never", stop])
    assert stopped and "".join(chunks) == text[: text.index(stop)]


def test_stop_string_not_completed_is_sent_at_the_end(byte_tok) -> None:
    ids = byte_tok.encode("hello wor", add_special_tokens=False)
    chunks, stopped = _stream(byte_tok, ids, ["world"])
    assert not stopped and "".join(chunks) == "hello wor"


def test_each_token_decodes_a_short_window(byte_tok) -> None:
    """Streaming cost per token stays flat: no re-decoding of the whole answer."""
    sizes: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kw: Any) -> str:
            sizes.append(len(ids))
            return str(byte_tok.decode(ids, **kw))

    text = IncrementalText(Counting(), ["zz"])
    for i in byte_tok.encode("the answer is 42, 日本 " * 40, add_special_tokens=False):
        text.push(i)
    assert len(sizes) > 400 and max(sizes) <= 8


def test_hf_sampling_survives_extreme_but_valid_settings(tiny_model) -> None:
    """temperature 1e-40 and top_p 1e-300 are valid OpenAI values; they must not turn the
    logits into NaN (a 500, or a stream cut after its 200)."""
    from distray.hf_engine import HFEngine

    engine = HFEngine(tiny_model)
    ids = engine.tok("hello")["input_ids"]
    for kw in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-300},
               {"temperature": 0.7, "seed": 2**64 - 1}):
        out = list(engine.stream(ids, max_tokens=3, ignore_eos=True, **kw))
        assert len(out) == 3


# ---- trust_remote_code reaches the engines -------------------------------------------------


def test_llm_config_trusts_remote_code_only_when_enabled(tmp_path) -> None:
    def cfg(student_trust: bool, teacher_trust: bool) -> Any:
        return config_from_dict({
            "run": {"output_dir": str(tmp_path)},
            "student": {"model": "/m/student", "trust_remote_code": student_trust},
            "teacher": {"kind": "vllm", "model": "/m/teacher", "trust_remote_code": teacher_trust},
            "serve": {"serve_teacher": True},
        })

    def kwargs(c: Any, name: str) -> dict[str, Any]:
        out: dict[str, Any] = llm_config(c, name, f"/m/{name}", on_gpu=True)["engine_kwargs"]
        return out

    assert "trust_remote_code" not in kwargs(cfg(False, False), "student")
    assert kwargs(cfg(True, False), "student")["trust_remote_code"] is True
    assert "trust_remote_code" not in kwargs(cfg(True, False), "teacher")
    assert kwargs(cfg(False, True), "teacher")["trust_remote_code"] is True
    assert "trust_remote_code" not in kwargs(cfg(False, True), "student")


# ---- autoscaling settings reach Serve ------------------------------------------------------


def test_scaling_delays_reach_both_backends_only_when_set(tmp_path, monkeypatch) -> None:
    def cfg(**serve: Any) -> Any:
        return config_from_dict({
            "run": {"output_dir": str(tmp_path)}, "student": {"model": "/m/student"},
            "serve": {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2, **serve},
        })

    def vllm_scaling(c: Any) -> dict[str, Any]:
        out: dict[str, Any] = llm_config(c, "student", "/m/student", on_gpu=True)["deployment_config"]["autoscaling_config"]
        return out

    plain = vllm_scaling(cfg())
    assert plain == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 2, "initial_replicas": 1}
    tuned = cfg(upscale_delay_s=2, downscale_delay_s=45.5)
    assert vllm_scaling(tuned) == {**plain, "upscale_delay_s": 2, "downscale_delay_s": 45.5}
    # The hf backend keeps at least one replica, with the same delays.
    from distray.serve import hf_app

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(hf_app, "hf_app", lambda models, limits, digest, options, remote_code: seen.append(options))
    hf_app.build(tuned, {"student": "/m/student"}, None, None)  # type: ignore[arg-type]
    assert seen[0]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
        "upscale_delay_s": 2, "downscale_delay_s": 45.5,
    }
    with pytest.raises(Exception, match="downscale_delay_s"):
        cfg(downscale_delay_s=-1)


def test_seeded_sampling_on_cpu_prefills_whole_prompts(tmp_path) -> None:
    """vLLM 0.32's CPU engine dies on a seeded request prefilled in chunks; distray turns chunked
    prefill off where seeded requests can reach a CPU engine, and leaves it alone elsewhere."""
    from distray.config import VLLMTeacher
    from distray.engines.vllm import engine_kwargs_for

    t = VLLMTeacher(model="/m/teacher", engine_kwargs={"max_model_len": 256})
    assert engine_kwargs_for(t, None, False, seeded=True)["enable_chunked_prefill"] is False
    assert "enable_chunked_prefill" not in engine_kwargs_for(t, None, False, seeded=False)
    assert "enable_chunked_prefill" not in engine_kwargs_for(t, None, True, seeded=True)
    mine = VLLMTeacher(model="/m/teacher", engine_kwargs={"enable_chunked_prefill": True})
    assert engine_kwargs_for(mine, None, False, seeded=True)["enable_chunked_prefill"] is True
    # Serve: any client may send a seed.
    c = config_from_dict({"run": {"output_dir": str(tmp_path)}, "student": {"model": "/m/student"}})
    assert llm_config(c, "student", "/m/student", on_gpu=False)["engine_kwargs"]["enable_chunked_prefill"] is False
    assert "enable_chunked_prefill" not in llm_config(c, "student", "/m/student", on_gpu=True)["engine_kwargs"]


def test_distray_serve_model_path_serves_any_folder(tmp_path, monkeypatch) -> None:
    """`distray serve --model PATH` needs no config: it serves that folder as `student`."""
    from distray import cli, pipeline
    from distray.tiny import make_tokenizer

    folder = tmp_path / "my-model"
    make_tokenizer(folder)
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(pipeline, "run_stage", lambda cfg, name, **kw: seen.append(cfg) or {})
    assert cli.main(["serve", "--model", str(folder), "serve.port=8123"]) == 0
    (cfg,) = seen
    assert cfg.serve.model == str(folder) and cfg.serve.port == 8123
    assert resolve_models(cfg) == {"student": str(folder)}
    assert cli.main(["serve"]) == 2  # neither --config nor --model
