"""The records a training run leaves for people: deepspeed.json, distray_export.json, and a
metrics.jsonl that grows by appending.

    .venv/bin/python -m pytest tests/unit/test_train_records.py -q
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from distray import storage
from distray.config import DistrayConfig
from distray.train.loop import TrainWorker
from distray.train.plan import build_deepspeed_config
from distray.train.records import export_record, write_deepspeed_config
from distray.train.state import TrainState


def _cfg(tmp_path: Path) -> DistrayConfig:
    return DistrayConfig.model_validate({
        "run": {"name": "t", "output_dir": str(tmp_path)},
        "student": {"model": str(tmp_path / "student")},
        "teacher": {"kind": "hf", "model": str(tmp_path / "teacher"), "name": "big"},
        "train": {"loss": "kd", "alpha": 0.3, "micro_batch_size": 2, "num_workers": 2, "zero_stage": 3},
        "generate": {"logprobs": 5},
    })


def _plan(tmp_path: Path, cfg: DistrayConfig) -> Any:
    return SimpleNamespace(
        out_dir=str(tmp_path / "train"), model=str(tmp_path / "student"), tokenizer=str(tmp_path / "student"),
        ds_config=build_deepspeed_config(cfg.train, cfg.train.num_workers, use_gpu=False),
        metrics_path=str(tmp_path / "train" / "metrics.jsonl"),
    )


def test_deepspeed_json_is_the_config_the_workers_get(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    plan = _plan(tmp_path, cfg)
    path = write_deepspeed_config(plan)
    assert path == f"{plan.out_dir}/deepspeed.json"
    written = json.loads(Path(path).read_text())
    assert written == json.loads(json.dumps(plan.ds_config))
    assert written["zero_optimization"]["stage"] == 3 and written["train_micro_batch_size_per_gpu"] == 2


def test_export_record_says_how_the_student_was_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    data = tmp_path / "generate" / "data" / "train"
    data.mkdir(parents=True)
    (data / "part-a.parquet").write_bytes(b"rows")
    monkeypatch.setattr("sys.argv", ["distray", "train", "--config", "c.yaml"])
    rec = export_record(
        cfg, _plan(tmp_path, cfg), data=str(data), validation_data=None, answers="teacher",
        metrics={"step": 40, "epoch": 2, "train_loss": 1.5}, checkpoint="ckpt/checkpoint_00000040",
    )
    assert rec["base_model"] == str(tmp_path / "student")
    assert rec["teachers"] == [{"label": "big", "kind": "hf", "model": str(tmp_path / "teacher")}]
    assert rec["train"]["loss"] == "kd" and rec["train"]["alpha"] == 0.3 and rec["steps"] == 40
    assert rec["command"] == ["distray", "train", "--config", "c.yaml"]
    assert rec["data"]["train"] == str(data) and rec["data"]["digest"]
    json.dumps(rec)  # the record is plain JSON
    # The digest follows the data's content.
    (data / "part-a.parquet").write_bytes(b"other rows")
    again = export_record(
        cfg, _plan(tmp_path, cfg), data=str(data), validation_data=None, answers="reference",
        metrics={}, checkpoint="c",
    )
    assert again["data"]["digest"] != rec["data"]["digest"] and again["teachers"] == []


def _worker(plan: Any, history: list[dict[str, Any]]) -> TrainWorker:
    """A rank-0 worker with `history` as its state, as after setup (no Ray, no DeepSpeed)."""
    w = TrainWorker.__new__(TrainWorker)
    w.rank, w.plan, w.metrics_written = 0, plan, None
    w.state = TrainState(history=list(history))
    return w


def _lines(path: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_metrics_jsonl_grows_by_appending_and_a_resume_drops_steps_it_trains_again(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _cfg(tmp_path))
    w = _worker(plan, [{"step": 2, "loss": 3.0}])
    w.write_metrics()
    w.state.history.append({"step": 4, "loss": 2.5})
    # Mark the first line: an append leaves it alone, a rewrite would restore it.
    Path(plan.metrics_path).write_text('{"step": 2, "loss": 3.0, "seen": true}\n')
    w.write_metrics()
    assert _lines(plan.metrics_path) == [{"step": 2, "loss": 3.0, "seen": True}, {"step": 4, "loss": 2.5}]
    w.write_metrics()  # nothing new: nothing written
    assert len(_lines(plan.metrics_path)) == 2
    # A resumed worker restores the history of its checkpoint (step 2) and trains step 4 again.
    resumed = _worker(plan, [{"step": 2, "loss": 3.0}])
    resumed.state.history.append({"step": 4, "loss": 2.4})
    resumed.write_metrics()
    assert [r["step"] for r in _lines(plan.metrics_path)] == [2, 4]
    assert _lines(plan.metrics_path)[-1]["loss"] == 2.4


def test_metrics_on_an_object_store_wait_for_a_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(tmp_path, _cfg(tmp_path))
    monkeypatch.setattr(storage, "can_append", lambda path: False)
    w = _worker(plan, [{"step": 2, "loss": 3.0}])
    w.write_metrics()
    assert not Path(plan.metrics_path).exists()
    w.write_metrics(flush=True)
    assert _lines(plan.metrics_path) == [{"step": 2, "loss": 3.0}]


def test_append_text_refuses_an_object_store() -> None:
    assert storage.can_append("/tmp/x.jsonl")
    with pytest.raises(ValueError, match="no append"):
        storage.append_text("s3://bucket/run/train/metrics.jsonl", "{}\n")
