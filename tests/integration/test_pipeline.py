"""The whole chain as users run it: `ray start --head`, `ray job submit jobs/pipeline.py`,
`DistillationJob.submit`, and a rerun of `distray run` that skips finished stages.

    pytest tests/integration/test_pipeline.py -m integration
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import free_port  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"max_model_len": 128, "enforce_eager": True, "dtype": "float32"}


def tiny_pipeline_config(tmp: Path, name: str) -> dict:
    """Every stage for real, sized to finish in a few minutes on 2 CPU cores."""
    return {
        "run": {"name": name, "output_dir": str(tmp / "runs")},
        "data": {"builtin": {"name": "reverse", "n_train": 96, "n_validation": 16, "n_test": 16}},
        "teacher": {
            "kind": "vllm",
            "name": "tiny-teacher",
            "model": str(tmp / "cache" / "teacher"),
            "engine_kwargs": ENGINE,
            "batch_size": 64,
        },
        # A teacher trained for 6 steps answers badly; keep every answer so the chain has data.
        "generate": {
            "sampling": {"max_tokens": 12},
            "logprobs": 3,
            "filters": {"drop_empty": False, "truncated": "keep"},
        },
        "student": {"model": str(tmp / "cache" / "student")},
        "train": {
            "loss": "kd",
            "lr": 3e-3,
            "max_steps": 6,
            "micro_batch_size": 8,
            "num_workers": 2,
            "zero_stage": 2,
            "max_seq_len": 48,
            "log_every_steps": 2,
            "report_every_steps": 3,
        },
        "evaluate": {
            "scorers": ["exact_match", "teacher_agreement"],
            "max_tokens": 12,
            "latency_samples": 3,
            "engine_kwargs": ENGINE,
        },
        "serve": {"port": free_port(), "serve_teacher": True, "engine_kwargs": ENGINE},
        "bench": {"concurrency": [2], "num_prompts": 6, "max_tokens": 8, "rounds": 1},
        "resources": {"num_cpus": 4},
        "demo": {
            "train_teacher": True,
            "teacher_layers": 1,
            "teacher_hidden": 128,
            "teacher_heads": 4,
            "teacher_train_rows": 96,
            "teacher_steps": 6,
            "baseline_labels": 16,
            "baseline_epochs": 1,
        },
    }


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """A `ray start --head --block` on 127.0.0.1 with its own ports (cluster_fixtures.LocalCluster),
    stopped by signalling it (a global `ray stop` would also kill the session's other Ray). The
    worker's local Ray is shut down first: one Ray per test process at a time."""
    from cluster_fixtures import LocalCluster
    from conftest import release_local_ray

    release_local_ray()
    head = LocalCluster(tmp_path_factory.mktemp("ray-head"), dict(os.environ))
    try:
        head.start_head(4, {})
        yield head
    finally:
        head.stop()


def test_distillation_job_submit_then_ray_job_submit_skips(ray_head, tmp_path):
    from distray.api import DistillationJob
    from distray.paths import RunPaths

    cfg_dict = tiny_pipeline_config(tmp_path, "tiny")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict))

    # 1. The Python API, through Ray's job submission client.
    job = DistillationJob.from_config(cfg_path)
    job.submit(ray_head.address)
    assert job.status() in ("PENDING", "RUNNING", "SUCCEEDED")
    assert job.wait(timeout_s=1500) == "SUCCEEDED"

    paths = RunPaths(job.config.run_dir)
    assert (Path(paths.run_dir) / "config.resolved.yaml").is_file()
    assert any(Path(paths.generate_data).rglob("*.parquet"))
    assert Path(paths.generate_stats).is_file()
    assert Path(paths.student, "model.safetensors").is_file()
    assert Path(paths.student, "tokenizer.json").is_file()
    metrics = json.loads(Path(paths.eval_metrics).read_text())
    models = metrics["models"]
    assert set(models) == {"teacher", "student", "baseline"} and metrics["test_rows"] == 16
    # Every figure the demo must reach, as ranges: a 1-layer teacher distilled into a student of
    # the same size class, on 16 test rows.
    for role, fig in models.items():
        assert fig["answered_rows"] == 16, role
        assert 0 < fig["parameters"] < 5_000_000 and 0 < fig["weights_mb"] < 50, role
        assert 0 < fig["latency_ms"] < 30_000 and fig["throughput_rows_per_s"] > 0, role
        assert 0 <= fig["scores"]["exact_match"] <= 100, role
    assert 0 <= models["student"]["scores"]["teacher_agreement"] <= 100
    bench = json.loads(Path(paths.bench_results).read_text())
    (point, *_) = bench["points"]
    assert point["completed"] > 0 and point["errors"] == 0 and point["median_ttft_ms"] > 0
    # The job's own log, read back through Ray's job client.
    logs = job.logs()
    assert "stage report: finished" in logs and "run tiny: ran" in logs
    report = Path(paths.report).read_text()
    # The tiny teacher scores 0%, so no retention % is defined; the comparison table must be there.
    assert "## Teacher vs student vs baseline" in report
    assert list(Path(paths.run_dir).rglob("*.png"))

    # 2. The `ray job submit` entrypoint on the same config: every stage is found done.
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"), "job", "submit",
            f"--address={ray_head.address}", "--working-dir", str(ROOT), "--",
            "python", "jobs/pipeline.py", "--config", str(cfg_path), "evaluate.latency_samples=3",
        ],
        env=ray_head.env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # `ray job submit` tails the job's logs and ends with "Job 'raysubmit_…' succeeded".
    assert "succeeded" in out, out[-4000:]
    for stage in ("generate", "train", "evaluate", "bench"):
        assert f"stage {stage}: done already" in out, out[-4000:]
