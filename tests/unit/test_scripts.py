"""Scripts nothing else runs cannot rot: the example's job, the `ray job submit` entrypoints'
argument handling, and the KubeRay RayJob manifest."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted(p for p in (ROOT / "jobs").glob("*.py") if not p.name.startswith("_"))


def _load(path: Path):  # noqa: ANN202 - a module object
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_seed_example_builds_a_valid_job() -> None:
    job = _load(ROOT / "examples" / "seed_azure_example.py").build_job()
    cfg = job.config
    assert cfg.teacher.kind == "vllm" and cfg.train.loss == "kd" and cfg.generate.logprobs == 5
    assert cfg.train.lr == pytest.approx(3e-3) and cfg.run.name == "seed-example"
    assert cfg.data.builtin is not None and cfg.data.builtin.name == "reverse"


@pytest.mark.parametrize("script", JOBS, ids=[p.name for p in JOBS])
def test_each_job_entrypoint_handles_its_arguments(script: Path) -> None:
    command = "run" if script.stem == "pipeline" else script.stem
    ok = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                        timeout=60, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert f"usage: distray {command}" in ok.stdout
    bad = subprocess.run([sys.executable, str(script), "--config"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "--config" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, str(script), "--config", "no/such.yaml"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert missing.returncode == 2 and "no/such.yaml" in missing.stderr and "does not exist" in missing.stderr


def test_kuberay_rayjob_has_the_fields_distray_relies_on() -> None:
    doc = yaml.safe_load((ROOT / "jobs" / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/pipeline.py"] and "--config" in entry
    config = ROOT / entry[entry.index("--config") + 1]
    assert config.is_file(), f"the RayJob runs {config}, which is not in the repo"
    from distray.config import load_config

    overrides = [a for a in entry[entry.index("--config") + 2:] if "=" in a]
    cfg = load_config(config, overrides)
    assert cfg.run.output_dir.startswith("s3://")  # a multi-node cluster needs shared storage
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" in runtime_env
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["name"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]
