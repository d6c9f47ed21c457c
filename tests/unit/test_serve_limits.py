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
    RequestRejected,
    check_bearer,
    check_prompt_tokens,
    key_digest,
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


# ---- hf backend: incremental detokenization and stop strings ------------------------------


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny byte-level BPE tokenizer: multi-byte characters span several tokens."""
    from transformers import AutoTokenizer

    from distray.tiny import make_tokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


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
