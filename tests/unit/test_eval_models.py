"""`distray evaluate --model NAME=PATH`: any model folder, evaluated under its own name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distray import pipeline
from distray.cli import EXIT_OK, EXIT_USAGE, main


def _config(tmp_path: Path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"run: {{name: r, output_dir: {tmp_path}/runs}}\n"
        "teacher: {kind: hf, model: /t}\nstudent: {model: /s}\n"
    )
    return str(path)


def _evaluated(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    monkeypatch.setattr(pipeline, "run_stage", lambda cfg, name, **kw: seen.append((name, cfg)) or "ok")
    return seen


def test_each_model_flag_becomes_a_named_model_and_leaves_the_run_student_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _evaluated(monkeypatch)
    (tmp_path / "kd").mkdir()
    monkeypatch.chdir(tmp_path)
    rc = main(["evaluate", "--config", _config(tmp_path), "--model", "kd=kd", "--model",
               "sft=/m/sft", "data.test=/d/test.jsonl"])
    assert rc == EXIT_OK
    name, cfg = seen[0]
    assert name == "evaluate"
    assert cfg.evaluate.extra_models == {"kd": str(tmp_path / "kd"), "sft": "/m/sft"}  # made absolute
    assert cfg.evaluate.models == ["teacher"]  # no trained run needed
    assert cfg.data.test == "/d/test.jsonl"


def test_an_override_brings_the_run_student_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _evaluated(monkeypatch)
    main(["evaluate", "-c", _config(tmp_path), "--model", "kd=/m/kd", "evaluate.models=[teacher,student]"])
    assert seen[0][1].evaluate.models == ["teacher", "student"]


@pytest.mark.parametrize("bad", ["kd", "=/m", "kd=", "a.b=/m", "student=/m"])
def test_a_malformed_or_reserved_name_exits_2(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _evaluated(monkeypatch)
    assert main(["evaluate", "-c", _config(tmp_path), "--model", bad]) == EXIT_USAGE
    assert not seen
    err = capsys.readouterr().err
    assert "NAME=PATH" in err or "evaluate.extra_models" in err, err
