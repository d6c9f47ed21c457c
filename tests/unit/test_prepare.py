"""Run preparation: offline model aliases and the student made from the teacher (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distray import prepare
from distray.config import config_from_dict
from distray.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    from distray.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("teacher"), layers=4, hidden=64, heads=2, seed=0)


def _cfg(tmp_path: Path, teacher: str, **student: object):
    return config_from_dict({
        "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
        "teacher": {"kind": "hf", "model": teacher},
        "student": student,
        "data": {"train": str(tmp_path / "train.jsonl")},
    })


def test_aliases_become_the_fetched_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_teacher: str) -> None:
    import distray.models.aliases as aliases

    fetched: list[str] = []
    monkeypatch.setattr(aliases, "resolve_model", lambda v: fetched.append(v) or tiny_teacher)
    cfg = prepare.prepare(_cfg(tmp_path, "smollm2-135m-instruct", model="smollm2-135m-instruct"))
    assert cfg.teacher.model == tiny_teacher and cfg.student.model == tiny_teacher
    assert fetched == ["smollm2-135m-instruct", "smollm2-135m-instruct"]


def test_student_from_teacher_is_pruned_once_and_rebuilt_when_asked_differently(
    tmp_path: Path, tiny_teacher: str
) -> None:
    cfg = prepare.prepare(_cfg(tmp_path, tiny_teacher, from_teacher={"layers": 2}))
    out = Path(cfg.run_dir) / "student-init"
    assert cfg.student.model == str(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    info = json.loads((out / "distray_student.json").read_text())
    assert info["kept_layers"] == [0, 3] and info["teacher"] == str(Path(tiny_teacher).resolve())
    built = (out / "model.safetensors").stat().st_mtime_ns
    prepare.prepare(_cfg(tmp_path, tiny_teacher, from_teacher={"layers": 2}))
    assert (out / "model.safetensors").stat().st_mtime_ns == built  # reused
    prepare.prepare(_cfg(tmp_path, tiny_teacher, from_teacher={"layers": 3}))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_from_teacher_needs_a_local_teacher(tmp_path: Path) -> None:
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path)},
        "teacher": {"kind": "openai", "model": "gpt-4o"},
        "student": {"from_teacher": {"layers": 2}},
    })
    with pytest.raises(ConfigError, match=r"student.from_teacher.*gpt-4o.*not a local model folder"):
        prepare.prepare(cfg)
