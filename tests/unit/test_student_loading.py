"""The student's tokenizer and config load with `student.trust_remote_code`, and a training
crash caused by the data says so instead of advising a rerun (no Ray started).

    .venv/bin/python -m pytest tests/unit/test_student_loading.py -q
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers

from distray import formats as F
from distray.config import DistrayConfig
from distray.errors import DataError


class Loads:
    """Records every AutoTokenizer / AutoConfig load: [(what, path, trust_remote_code)]."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        vocab = {chr(97 + i): i for i in range(8)}

        def tokenizer(path: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(("tokenizer", str(path), kwargs.get("trust_remote_code")))
            return types.SimpleNamespace(get_vocab=lambda: dict(vocab), decode=lambda ids, **_: "")

        def config(path: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(("config", str(path), kwargs.get("trust_remote_code")))
            return types.SimpleNamespace(vocab_size=len(vocab))

        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
        monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)

    def of(self, path: Path) -> list[tuple[str, Any]]:
        return [(what, trust) for what, p, trust in self.calls if p == str(path)]


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    student, teacher = tmp_path / "student", tmp_path / "teacher"
    for d in (student, teacher):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "tokenizer.json").write_text("{}")
    return student, teacher


def _cfg(tmp_path: Path, student: Path, teacher: Path, **train: Any) -> DistrayConfig:
    return DistrayConfig.model_validate(
        {
            "run": {"name": "t", "output_dir": str(tmp_path / "runs")},
            "teacher": {"kind": "vllm", "model": str(teacher)},
            "student": {"model": str(student), "trust_remote_code": True},
            "generate": {"logprobs": 2},
            "train": {"loss": "kd", **train},
        }
    )


def test_prepare_loads_the_student_with_its_trust_remote_code(tmp_path, monkeypatch) -> None:
    from distray.prepare import check_vocabularies

    loads = Loads(monkeypatch)
    student, teacher = _folders(tmp_path)
    check_vocabularies(_cfg(tmp_path, student, teacher))
    assert loads.of(student) == [("tokenizer", True), ("config", True)]
    assert loads.of(teacher) == [("tokenizer", False)]  # the teacher's own setting


def test_train_loads_the_student_with_its_trust_remote_code(tmp_path, monkeypatch) -> None:
    import ray.data

    from distray.train.datasets import build_datasets

    loads = Loads(monkeypatch)
    # Ray Data's reader is not needed to check the vocabulary; a stand-in keeps Ray unstarted.
    monkeypatch.setattr(ray.data, "read_parquet", lambda *a, **k: types.SimpleNamespace(context=types.SimpleNamespace()))
    student, teacher = _folders(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    row = {F.ID: "a" * 32, F.INPUT_ID: "x", F.MESSAGES: [{"role": "user", "content": "q"}], F.RESPONSE: "ab",
           F.RESPONSE_TOKEN_IDS: [0, 1], F.TOPK_TOKEN_IDS: [[0], [1]], F.TOPK_LOGPROBS: [[-0.1], [-0.2]]}
    pq.write_table(pa.Table.from_pylist([row], schema=F.TEACHER_DATA_SCHEMA), data / "part-0.parquet")
    cfg = _cfg(tmp_path, student, teacher, validation_fraction=0.0)
    build_datasets(cfg, str(data), None, answers="teacher", model=str(student), tokenizer_dir=str(student))
    assert loads.of(student) == [("tokenizer", True), ("config", True)]


def test_on_policy_loads_the_student_with_its_trust_remote_code(tmp_path, monkeypatch) -> None:
    import distray.ray_utils
    from distray.onpolicy.rounds import OnPolicyRun

    loads = Loads(monkeypatch)
    monkeypatch.setattr(distray.ray_utils, "init_ray", lambda cfg: None)
    student, teacher = _folders(tmp_path)
    cfg = _cfg(tmp_path, student, teacher, mode="on_policy", on_policy={"schedule": "turns", "eval_prompts": 0})
    OnPolicyRun(cfg).setup()
    assert loads.of(student) == [("tokenizer", True), ("config", True)]


def test_a_data_error_in_a_worker_is_not_called_resumable() -> None:
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from distray.train.trainer import deterministic_cause

    changed = DataError("the checkpoint at step 4 was trained on other rows")
    failed = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(changed, "Traceback ...")})
    assert deterministic_cause(failed) is changed
    try:
        raise RuntimeError("fit failed") from failed
    except RuntimeError as e:
        assert deterministic_cause(e) is changed
    lost = WorkerGroupError("rank 1 failed", {1: UserExceptionWithTraceback(OSError("node lost"), "")})
    assert deterministic_cause(lost) is None  # may pass on a rerun: resuming is the advice


def test_a_lost_lease_in_a_worker_is_final_not_resumable(tmp_path) -> None:
    """A worker whose fence check fails (another run took the folder over) is not told to
    rerun to resume: every restart would fail the same way."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from distray.errors import LeaseLostError
    from distray.lease import Fence
    from distray.train.trainer import deterministic_cause

    try:
        Fence(str(tmp_path), "someone-else", 1).check("checkpoint")  # no lease names it
    except LeaseLostError as e:
        lost = e
    failed = WorkerGroupError("rank 0 failed", {0: UserExceptionWithTraceback(lost, "")})
    assert deterministic_cause(failed) is lost
