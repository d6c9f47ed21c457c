"""Experiment tracking with the real packages: MLflow's local store and TensorBoard event files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from distray.config import config_from_dict
from distray.paths import RunPaths
from distray.tracking import log_run


def _run_folder(tmp_path: Path, **tracking: object):
    cfg = config_from_dict({
        "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
        "student": {"model": "s"},
        "tracking": tracking,
        "resources": {"env": {"HF_TOKEN": "hf_secret"}},
    })
    p = RunPaths(cfg.run_dir)
    Path(p.train).mkdir(parents=True)
    Path(p.train_metrics).write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3}) + "\n" for s in (1, 2, 3))
        + json.dumps({"final": True, "step": 3, "train_loss": 2.7}) + "\n"
    )
    Path(p.evaluate).mkdir(parents=True)
    Path(p.eval_metrics).write_text(json.dumps({
        "models": {"student": {"latency_ms": 12.5, "scores": {"exact_match": 81.0}},
                   "teacher": {"latency_ms": 40.0, "scores": {"exact_match": 90.0}}},
        "headline": {"accuracy_retention_pct": 90.0},
    }))
    Path(p.report).write_text("# report\n")
    return cfg


def test_mlflow_gets_params_curves_the_table_and_the_report(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = _run_folder(tmp_path, mlflow={})
    assert log_run(cfg) == {"train": 6, "evaluate": 5}
    client = MlflowClient("file:" + str(tmp_path / "runs" / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("distray").experiment_id])
    assert run.info.run_name == "t" and run.data.params["train.lr"] == "2e-05"
    assert run.data.params["resources.env.HF_TOKEN"] == "<redacted>"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 2)) for m in losses] == [(1, 2.9), (2, 2.8), (3, 2.7)]
    assert run.data.metrics["evaluate/student/exact_match"] == 81.0
    assert run.data.metrics["evaluate/headline/accuracy_retention_pct"] == 90.0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.md", "config.resolved.yaml"}
    # A rerun with nothing new logs nothing twice, into the same MLflow run.
    assert log_run(cfg) == {}
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 3


def _events(folder: Path) -> list[tuple[str, float, int]]:
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for f in folder.glob("events.out.tfevents.*"):
        data = f.read_bytes()
        i = 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.append((v.tag, round(v.simple_value, 4), ev.step))
    return out


def test_tensorboard_event_files_hold_the_curves(tmp_path: Path) -> None:
    cfg = _run_folder(tmp_path, tensorboard=True)
    log_run(cfg)
    events = _events(Path(cfg.run_dir) / "logs" / "tensorboard")
    assert ("train/loss", 2.9, 1) in events and ("evaluate/teacher/latency_ms", 40.0, 0) in events


def test_tracking_off_logs_nothing(tmp_path: Path) -> None:
    assert log_run(_run_folder(tmp_path)) == {}
    assert not (tmp_path / "runs" / "mlruns").exists()


@pytest.mark.parametrize("bad", [{"mlflow": {"tracking_uri": 3}}, {"wandb": {}}])
def test_tracking_config_errors_name_the_field(bad: dict) -> None:
    from distray.errors import ConfigError

    with pytest.raises(ConfigError, match="tracking"):
        config_from_dict({"tracking": bad})
