"""Each benchmark in benchmarks/ runs to the end at its smallest size, so none can rot.

These check that the scripts work and write what their docstrings promise (side-by-side
ratios, JSON), not the speed: figures at this size mean nothing and are never asserted
beyond being real, positive numbers.

    .venv/bin/python -m pytest tests/integration/test_benchmarks.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _cores_free():
    """Each benchmark starts its own Ray and engines: the session's local Ray gives the cores back."""
    from conftest import release_local_ray

    release_local_ray()


def run_bench(name: str, out: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"json": json.loads(out.read_text()), "stdout": proc.stdout}


def positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_generate_benchmark_compares_distray_with_bare_vllm_and_hf(tmp_path: Path) -> None:
    r = run_bench(
        "generate", tmp_path / "gen.json", "--prompts", "16", "--max-tokens", "8", "--layers", "2",
        "--hidden", "64", "--heads", "2", "--batch-size", "8", "--hf-sample", "2", "--hf-batch", "8",
        "--hf-batched-prompts", "8", "--rounds", "1", "--work-dir", str(tmp_path / "work"),
    )
    rep = r["json"]
    assert rep["prompts"] == 16 and rep["rounds"] == 1
    assert set(rep["ratios"]) == {f"a/{x}_{m}" for x in "bcd" for m in ("excl", "incl")}
    assert all(positive(v) for v in rep["ratios"].values()), rep["ratios"]
    assert all(positive(v) for side in rep["output_tokens_per_s"].values() for v in side.values())
    assert "a/b:" in r["stdout"]


def test_train_benchmark_compares_distray_with_a_plain_loop(tmp_path: Path) -> None:
    r = run_bench(
        "train", tmp_path / "train.json", "--steps", "6", "--rows", "64", "--layers", "1",
        "--hidden", "64", "--heads", "2", "--answer-chars", "16", "--log-every", "2",
        "--micro-batch", "4", "--global-batch", "8", "--work-dir", str(tmp_path / "work"),
    )
    rep = r["json"]
    assert rep["steps"] == 6 and rep["workers"] == 2
    assert positive(rep["ratio_distray_over_plain"]) and positive(rep["ratio_distray_over_plain_p90"])
    assert "ratio distray / plain" in r["stdout"]


def test_serve_benchmark_compares_distray_with_bare_vllm(tmp_path: Path) -> None:
    r = run_bench(
        "serve", tmp_path / "serve.json", "--concurrency", "2", "--num-prompts", "4",
        "--max-tokens", "4", "--rounds", "1", "--max-model-len", "256",
    )
    rep = r["json"]
    assert rep["errors"] == {"vllm": 0, "distray": 0}, rep["errors"]
    assert all(positive(v) for v in rep["ratios_distray_over_vllm"].values()), rep["ratios_distray_over_vllm"]
    assert all(positive(rep["medians"][n]["request_throughput"]) for n in ("vllm", "distray"))
