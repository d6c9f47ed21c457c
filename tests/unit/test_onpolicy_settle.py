"""On-policy rounds keep failed rows: recorded, retried on the next call, no marker before.

    .venv/bin/python -m pytest tests/unit/test_onpolicy_settle.py -q

The student's engine and the teacher's scorer are fakes that fail chosen rows with engine
errors; Ray Data is a list of pyarrow blocks. Everything else is the real round: the rollout
and score sinks, the done sets, the phase markers and the retry shards.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import distray.teacher
from distray import formats as F
from distray.config import DistrayConfig
from distray.errors import StageError
from distray.onpolicy import rounds
from distray.onpolicy.rollouts import student_engine
from distray.onpolicy.rounds import OnPolicyRun
from distray.teacher.writer import load_done_ids


class Blocks:
    """Enough of a Ray Dataset for a round: pyarrow blocks, run eagerly."""

    def __init__(self, blocks: list[pa.Table]) -> None:
        self.blocks = [b for b in blocks if b.num_rows]

    def map_batches(self, fn: Any, fn_kwargs: dict[str, Any] | None = None, **_: Any) -> Blocks:
        return Blocks([fn(b, **(fn_kwargs or {})) for b in self.blocks])

    def union(self, *others: Blocks) -> Blocks:
        return Blocks(self.blocks + [b for o in others for b in o.blocks])

    def iter_batches(self, **_: Any) -> Any:
        return iter(self.blocks)


class Engines:
    """The fake student (answers) and teacher (scores); prompts in `fail` get an engine error."""

    def __init__(self) -> None:
        self.fail: set[str] = set()
        self.asked: list[str] = []
        self.scored: list[str] = []

    def answer(self, ds: Blocks, student: Any, cfg: Any, **_: Any) -> Blocks:
        def one(r: dict[str, Any]) -> dict[str, Any]:
            self.asked.append(r[F.ID])
            out = {F.INPUT_ID: r[F.ID], F.MESSAGES: r[F.MESSAGES], F.TEACHER: student.label}
            if r[F.MESSAGES][0]["content"] in self.fail:
                return {**out, "error": "engine_error: replica died"}
            return {**out, F.RESPONSE: "ok", F.RESPONSE_TOKEN_IDS: [1, 2], F.FINISH_REASON: "stop", "error": None}

        return Blocks([pa.Table.from_pylist([one(r) for r in b.to_pylist()]) for b in ds.blocks])

    def score(self, ds: Blocks, scorer: Any, cfg: Any, k: int) -> Blocks:
        def one(r: dict[str, Any]) -> dict[str, Any]:
            self.scored.append(r[F.INPUT_ID])
            if r[F.MESSAGES][0]["content"] in self.fail:
                return {"_row": json.dumps(r), "error": "engine_error: scorer died", "_scores": None}
            return {"_row": json.dumps(r), "error": None, "_scores": json.dumps([[[1], [2]], [[-0.1], [-0.2]], [-0.1, -0.2]])}

        return Blocks([pa.Table.from_pylist([one(r) for r in b.to_pylist()]) for b in ds.blocks])


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> Engines:
    import ray.data

    e = Engines()
    monkeypatch.setattr(distray.teacher, "generate_dataset", e.answer)
    monkeypatch.setattr(rounds, "score_dataset", e.score)
    monkeypatch.setattr(ray.data, "from_items", lambda rows: Blocks([pa.Table.from_pylist(rows)]))

    def read_parquet(files: list[str], filesystem: Any = None) -> Blocks:
        return Blocks([pq.read_table(f) for f in files])

    monkeypatch.setattr(ray.data, "read_parquet", read_parquet)
    return e


def _job(tmp_path: Any) -> OnPolicyRun:
    cfg = DistrayConfig.model_validate(
        {
            "run": {"name": "op", "output_dir": str(tmp_path)},
            "teacher": {"kind": "vllm", "model": str(tmp_path / "teacher")},
            "student": {"model": str(tmp_path / "student")},
            "generate": {"logprobs": 1},
            "train": {"mode": "on_policy", "loss": "kd", "on_policy": {"schedule": "turns"}},
        }
    )
    return OnPolicyRun(cfg)


def _prompts(n: int) -> list[dict[str, Any]]:
    return [
        {F.ID: f"in-{i}", F.MESSAGES: [{"role": "user", "content": f"q{i}"}], F.PROMPT: None, F.REFERENCE: None}
        for i in range(n)
    ]


def _retry_ids(folder: str) -> dict[str, list[str]]:
    """{retry shard stage: ids} of the retry shards in rejects/."""
    out: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.startswith("retry-"):
            stage = name.split("-")[1]
            with open(os.path.join(folder, name)) as f:
                out.setdefault(stage, []).extend(json.loads(line)["input_id"] for line in f)
    return out


def test_failed_rows_are_retried_on_the_next_call_and_no_marker_is_written_before(tmp_path, engines) -> None:
    job = _job(tmp_path)
    rp = job.paths.round(0)
    student = student_engine(job.cfg, str(tmp_path / "student"), "student-round-000")
    train_rows = _prompts(4)

    # 1: the student's engine fails one rollout. It is recorded with its reason, the phase
    # stays unfinished, and scoring does not start on three of four prompts.
    engines.fail = {"q1"}
    with pytest.raises(StageError, match=r"1 row\(s\) of the rollouts phase.*rerun"):
        job.answer_and_score(rp, student, train_rows, [])
    assert not os.path.exists(rp.done("rollouts")) and not os.path.exists(rp.done("scoring"))
    assert _retry_ids(rp.rejects) == {"rollout": ["in-1"]}
    assert len(load_done_ids([rp.rollouts, rp.rejects])) == 3  # the failed row is not done
    assert engines.scored == []

    # 2: only the failed rollout is asked again; now the scorer fails one row.
    engines.asked.clear()
    engines.fail = {"q2"}
    with pytest.raises(StageError, match="scoring phase"):
        job.answer_and_score(rp, student, train_rows, [])
    assert len(engines.asked) == 1 and os.path.exists(rp.done("rollouts"))
    assert json.loads(open(rp.done("rollouts")).read())["rollout_rows"] == 1
    assert not os.path.exists(rp.done("scoring"))
    assert _retry_ids(rp.rejects) == {"teacher": ["in-2"]}  # the rollout's record is settled

    # 3: the scorer is back; only the failed score is asked again, and the phase finishes.
    engines.scored.clear()
    engines.fail = set()
    figures = job.answer_and_score(rp, student, train_rows, [])
    assert engines.scored == ["in-2"] and figures["scored_rows"] == 1
    assert os.path.exists(rp.done("scoring")) and _retry_ids(rp.rejects) == {}
    scored = pq.read_table(rp.scored).column(F.INPUT_ID).to_pylist()
    assert sorted(scored) == [f"in-{i}" for i in range(4)]  # every prompt of the round, once


def test_a_final_failure_settles_its_row(tmp_path, engines, monkeypatch) -> None:
    job = _job(tmp_path)
    rp = job.paths.round(0)
    student = student_engine(job.cfg, str(tmp_path / "student"), "student-round-000")

    def refuse(ds: Blocks, student: Any, cfg: Any, **_: Any) -> Blocks:
        rows = [r for b in ds.blocks for r in b.to_pylist()]
        return Blocks([pa.Table.from_pylist(
            [{F.INPUT_ID: r[F.ID], F.MESSAGES: r[F.MESSAGES], "error": "prompt_too_long: 900 tokens"} for r in rows]
        )])

    monkeypatch.setattr(distray.teacher, "generate_dataset", refuse)
    figures = job.answer_and_score(rp, student, _prompts(2), [])
    assert figures["rollout_rows"] == 0 and os.path.exists(rp.done("rollouts"))
    assert _retry_ids(rp.rejects) == {}
