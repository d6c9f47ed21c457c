"""Serve's request guards and config resolution, without Ray.

    .venv/bin/python -m pytest tests/unit/test_serve.py -q
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from distray.config import config_from_dict
from distray.errors import ConfigError
from distray.serve import (
    RequestRejected,
    check_bearer,
    check_prompt_tokens,
    endpoint_url,
    key_digest,
    openai_error,
    output_budget,
    resolve_models,
    served_endpoints,
)


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
    from distray.serve import _api_key_digest

    monkeypatch.delenv("DISTRAY_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match="DISTRAY_UNSET_KEY"):
        _api_key_digest(_cfg(tmp_path, api_key_env="DISTRAY_UNSET_KEY"))
    monkeypatch.setenv("DISTRAY_UNSET_KEY", "k")
    assert _api_key_digest(_cfg(tmp_path, api_key_env="DISTRAY_UNSET_KEY")) == key_digest("k")
    assert os.environ["DISTRAY_UNSET_KEY"] == "k"
