"""The config contract: YAML + dotted overrides, helpful errors, cross-field checks at load.

    pytest tests/unit/test_config.py -q
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from distray.config import (
    DistrayConfig,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
)
from distray.errors import ConfigError
from distray.prepare import write_record


def _write(tmp_path: Path, data: dict[str, Any], name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _error(data: dict[str, Any], overrides: list[str] | None = None) -> str:
    from distray.config import apply_overrides

    with pytest.raises(ConfigError) as info:
        config_from_dict(apply_overrides(data, overrides or []))
    return str(info.value)


VLLM_TEACHER = {"kind": "vllm", "model": "/models/teacher"}


# ---- loading and overrides ---------------------------------------------------------------


def test_defaults_load_and_run_dir() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, DistrayConfig)
    assert cfg.run_dir == "runs/distray-run"
    assert cfg.teacher is None and cfg.all_teachers == []


def test_yaml_with_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, {"run": {"name": "demo"}, "teacher": VLLM_TEACHER, "train": {"lr": 1e-4}})
    cfg = load_config(path, ["train.lr=3e-5", "run.output_dir=/tmp/out", "teacher.batch_size=8"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.run_dir == "/tmp/out/demo"
    assert cfg.teacher is not None and cfg.teacher.kind == "vllm"
    assert cfg.teacher.batch_size == 8
    assert cfg.teacher.label == "teacher"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("train.lr=1e-5", 1e-5),
        ("train.lr=3E-4", 3e-4),
        ("train.epochs=3", 3),
        ("train.packing=true", True),
        ("train.max_steps=null", None),
        ("bench.concurrency=[1,4]", [1, 4]),
        ("run.name=my-run", "my-run"),
        ("task.system_prompt=", ""),
    ],
)
def test_override_values_are_typed(item: str, expected: Any) -> None:
    key, _ = item.split("=", 1)
    node: Any = parse_overrides([item])
    for part in key.split("."):
        node = node[part]
    assert node == expected
    assert type(node) is type(expected)


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=1"])
def test_bad_override_syntax(item: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([item])


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        parse_overrides(["train.lr=1e-5", "train.lr.x=1"])


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["teacher.kind=openai", "teacher.model=gpt-x", "train.lr=3e-5"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r1"])
    path = write_record(cfg)
    assert path == f"{tmp_path}/r1/config.resolved.yaml"
    assert load_config(path) == cfg


def test_task_preset_fills_defaults_but_user_wins() -> None:
    cfg = load_config(None, ["task.type=nli"])
    assert cfg.task.labels == ["entailment", "neutral", "contradiction"]
    assert cfg.generate.filters.verifier == "label"
    cfg = load_config(None, ["task.type=nli", "generate.filters.verifier=none"])
    assert cfg.generate.filters.verifier == "none"


# ---- errors a user sees --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr_rate=1e-5"], "`train.lr_rate` is not a setting; did you mean `train.lr`"),
        (["generate.sampling.temprature=1"], "did you mean `generate.sampling.temperature`"),
        (["trian.lr=1"], "did you mean `train`"),
    ],
)
def test_unknown_key_names_path_and_suggestion(overrides: list[str], expected: str) -> None:
    assert expected in _error({}, overrides)


def test_unknown_key_inside_a_teacher_kind() -> None:
    msg = _error({"teacher": {**VLLM_TEACHER, "engine_kwarg": {}}})
    assert "`teacher.engine_kwarg` is not a setting; did you mean `teacher.engine_kwargs`?" in msg
    msg = _error({"teachers": [{"kind": "hf", "model": "m", "batch_sise": 2}]})
    assert "did you mean `teachers.0.batch_size`" in msg


def test_wrong_type_and_range_show_the_value() -> None:
    assert "`train.lr` (2)" in _error({}, ["train.lr=2"])
    assert "less than 1" in _error({}, ["train.lr=2"])
    assert "`train.epochs` ('many')" in _error({}, ["train.epochs=many"])
    assert "'foo'" in _error({}, ["evaluate.scorers=[bleu,foo]"])


@pytest.mark.parametrize(
    ("data", "overrides", "expected"),
    [
        ({}, ["train.global_batch_size=30"], "(30) must be divisible by micro_batch_size"),
        ({}, ["train.loss=kd"], "`generate.logprobs` is not set"),
        (
            {"teacher": {"kind": "openai", "model": "gpt-x"}},
            ["train.loss=kd", "generate.logprobs=10"],
            "`generate.logprobs` (10) is above 5",
        ),
        (
            {"teacher": {"kind": "openai", "model": "gpt-x"}},
            ["train.loss=kd", "generate.logprobs=5"],
            "`teacher.extra_body.return_tokens_as_token_ids` is None",
        ),
        ({}, ["train.offload_params=true"], "needs ZeRO stage 3"),
        ({}, ["serve.min_replicas=3"], "`serve.min_replicas` (3) must be ≤"),
        ({}, ["generate.filters.verifier=label"], "`task.labels` is empty"),
        ({}, ["evaluate.scorers=[regex]"], "`evaluate.regex` is not set"),
        (
            {"teacher": VLLM_TEACHER, "teachers": [VLLM_TEACHER]},
            [],
            "not both",
        ),
        (
            {"teachers": [{"kind": "hf", "model": "a/x"}, {"kind": "hf", "model": "b/x"}]},
            [],
            "labels must be unique",
        ),
        ({"teacher": {**VLLM_TEACHER, "concurrency": [3, 1]}}, [], "1 ≤ min ≤ max"),
    ],
)
def test_cross_field_checks_fail_at_load(
    data: dict[str, Any], overrides: list[str], expected: str
) -> None:
    assert expected in _error(data, overrides)


def test_logit_loss_with_an_openai_teacher_needs_token_ids() -> None:
    teacher = {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:8000/v1"}
    msg = _error({"teacher": teacher}, ["train.loss=jsd", "generate.logprobs=5"])
    assert "return_tokens_as_token_ids: true" in msg and "train.loss: sft" in msg
    ok = {**teacher, "extra_body": {"return_tokens_as_token_ids": True}}
    cfg = config_from_dict({"teacher": ok, "train": {"loss": "kd"}, "generate": {"logprobs": 5}})
    assert cfg.train.is_logit_loss
    # Sequence-level KD from an API needs no token ids.
    assert config_from_dict({"teacher": teacher, "generate": {"logprobs": 5}}).train.loss == "sft"


def test_resolved_yaml_redacts_secret_env_values(tmp_path: Path) -> None:
    env = {"HF_TOKEN": "hf_abc", "OPENAI_API_KEY": "sk-1", "DB_PASSWORD": "p", "OMP_NUM_THREADS": "2"}
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    cfg = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"env": env})})
    text = Path(write_record(cfg)).read_text()
    assert "hf_abc" not in text and "sk-1" not in text
    written = yaml.safe_load(text)["resources"]["env"]
    assert written == {
        "HF_TOKEN": "<redacted>", "OPENAI_API_KEY": "<redacted>", "DB_PASSWORD": "<redacted>",
        "OMP_NUM_THREADS": "2",
    }
    assert yaml.safe_load(dump_config(cfg, redact_secrets=False))["resources"]["env"] == env


def test_workers_get_hub_and_teacher_keys_from_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    from distray.ray_utils import worker_env

    monkeypatch.setenv("HF_TOKEN", "hf_abc")
    monkeypatch.setenv("MY_API_KEY", "sk-1")
    cfg = config_from_dict({
        "teacher": {"kind": "openai", "model": "m", "api_key_env": "MY_API_KEY"},
        "resources": {"env": {"OMP_NUM_THREADS": "2"}},
    })
    env = worker_env(cfg)
    assert env["HF_TOKEN"] == "hf_abc" and env["MY_API_KEY"] == "sk-1"
    assert env["OMP_NUM_THREADS"] == "2"


def test_every_problem_is_reported_at_once() -> None:
    msg = _error({}, ["train.lr_rate=1", "serve.prot=80"])
    assert "train.lr_rate" in msg and "serve.prot" in msg


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config(None)


def _models_in(annotation: Any, seen: set[type[BaseModel]]) -> None:
    """Every BaseModel class inside an annotation (unions, Annotated, lists), recursively."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in seen:
            seen.add(annotation)
            for field in annotation.model_fields.values():
                _models_in(field.annotation, seen)
        return
    for arg in getattr(annotation, "__args__", ()) or ():
        _models_in(arg, seen)
    for meta in getattr(annotation, "__metadata__", ()) or ():
        _models_in(meta, seen)


def test_every_setting_has_a_description() -> None:
    from distray.config import HFTeacher, OpenAITeacher, VLLMTeacher

    seen: set[type[BaseModel]] = set()
    _models_in(DistrayConfig, seen)
    assert {VLLMTeacher, OpenAITeacher, HFTeacher} <= seen  # every union member was walked
    missing = [
        f"{m.__name__}.{name}"
        for m in seen
        for name, f in m.model_fields.items()
        if name != "kind" and not (f.description or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../up", "a\\b", " padded "])
def test_run_name_must_be_one_folder(name: str) -> None:
    with pytest.raises(ConfigError, match=r"`run.name`: must be one folder name, got"):
        config_from_dict({"run": {"name": name}})


def test_redaction_covers_urls_bodies_and_engine_kwargs(tmp_path: Path) -> None:
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path)},
        "teacher": {"kind": "openai", "model": "m", "base_url": "https://me:pw123@api.example/v1",
                    "extra_body": {"api_key": "sk-inline", "max_tokens": 7}},
        "resources": {"env": {"TOKENIZERS_PARALLELISM": "false", "MY_AUTH_HEADER": "Bearer x"}},
    })
    text = Path(write_record(cfg)).read_text()
    for secret in ("pw123", "sk-inline", "Bearer x"):
        assert secret not in text
    data = yaml.safe_load(text)
    assert data["teacher"]["base_url"] == "https://<redacted>@api.example/v1"
    assert data["teacher"]["extra_body"] == {"api_key": "<redacted>", "max_tokens": 7}
    assert data["resources"]["env"]["TOKENIZERS_PARALLELISM"] == "false"  # not a secret
