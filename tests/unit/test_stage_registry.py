"""Adding a stage touches `distray.stages.REGISTRY` and the stage's own module only: a toy stage
registered here is run, recorded, skipped, redone and cleared by the pipeline unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distray import lineage, pipeline
from distray.config import config_from_dict
from distray.stages import REGISTRY, Stage

RUNS: list[str] = []


def run(cfg: Any, **kwargs: Any) -> str:
    """The toy stage: counts the test prompts into `<run>/tally/tally.json`."""
    out = Path(cfg.run_dir, "tally")
    out.mkdir(parents=True, exist_ok=True)
    n = sum(1 for line in Path(cfg.data.test).read_text().splitlines() if line.strip())
    (out / "tally.json").write_text(json.dumps({"rows": n, "prompt": cfg.task.system_prompt}))
    RUNS.append(cfg.task.system_prompt or "")
    return str(out / "tally.json")


def test_a_toy_stage_needs_only_its_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "tally", Stage(
        "tally", __name__, "run", "count the test prompts", demo=False, models=(),
        folder="tally", marker="tally/tally.json", content=("tally.json",),
        covers=("task.system_prompt",), input_files=("data.test",)))
    monkeypatch.setattr("distray.ray_utils.init_ray", lambda cfg: None)
    test = tmp_path / "test.jsonl"
    test.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')

    def cfg(**task: Any) -> Any:
        return config_from_dict({
            "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
            "data": {"train": str(test), "test": str(test)},
            "teacher": {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"},
            "student": {"model": str(tmp_path / "student")},
            "task": task,
        })

    RUNS.clear()
    first = pipeline.run(cfg(system_prompt="x"), stages=["tally"])
    assert first.stages_run == ["tally"] and RUNS == ["x"]
    assert lineage.read(cfg(), "tally")["settings"] == {"task.system_prompt": "x"}
    assert pipeline.run(cfg(system_prompt="x"), stages=["tally"]).stages_skipped == ["tally"]
    test.write_text('{"prompt": "a"}\n{"prompt": "c"}\n')  # same size, new content: redone
    assert pipeline.run(cfg(system_prompt="x"), stages=["tally"]).stages_run == ["tally"]
    # Its setting changed: a stage that starts over just runs again.
    assert pipeline.run(cfg(system_prompt="y"), stages=["tally"]).stages_run == ["tally"]
    assert RUNS == ["x", "x", "y"]
    pipeline.clear_stage(cfg(), "tally")
    assert not Path(tmp_path, "runs", "r", "tally").exists()


def test_generate_needs_no_student_folder(tmp_path: Path) -> None:
    """generate labels prompts before the student exists: only the models a stage reads
    (`Stage.models`) must be there."""
    from distray import prepare
    from distray.errors import ConfigError

    (tmp_path / "teacher").mkdir()
    cfg = config_from_dict({
        "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
        "data": {"train": str(tmp_path / "p.jsonl")},
        "teacher": {"kind": "vllm", "model": str(tmp_path / "teacher")},
        "student": {"model": str(tmp_path / "student-not-yet")},
    })
    prepare.prepare(cfg, models=REGISTRY["generate"].models)  # no error
    with pytest.raises(ConfigError, match="student.model"):
        prepare.prepare(cfg, models=REGISTRY["train"].models)
