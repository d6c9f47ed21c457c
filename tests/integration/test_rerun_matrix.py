"""The rerun matrix on real stages: what a second command does to what the first one made.

    pytest tests/integration/test_rerun_matrix.py -m integration

One run folder goes through every stage for real (hf teacher and evaluate engines on the tiny
models, DeepSpeed training, Ray Serve + the load generator for bench) on the session's local
Ray; then each kind of change is made, as a user would, and the outcome checked against the
README's table ("What distray guarantees: reruns"):

| change                               | generate | train  | evaluate | bench  |
|--------------------------------------|----------|--------|----------|--------|
| none (`distray generate`, then run)  | skip     | skip   | skip     | skip   |
| speed-only setting                   | skip     | skip   | skip     | skip   |
| answer-changing setting of a stage   | refuse   | refuse | rerun    | rerun  |
| input edited (data.test, same size)  | skip     | skip   | rerun    | rerun  |
| input row removed (data.train)       | resume   | rerun  | rerun    | rerun  |

"refuse" deletes nothing and names the ways out that keep the outputs; the student's bytes are
compared with a hash, and rows are counted from the Parquet files with pyarrow.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import free_port  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ["generate", "train", "evaluate", "bench"]


def _config(tmp: Path, teacher: str, student: str, **changes: Any) -> Any:
    from distray.config import BenchConfig, config_from_dict

    bench: dict[str, Any] = {"concurrency": [1], "num_prompts": 3, "max_tokens": 4}
    if "rounds" in BenchConfig.model_fields:
        bench["rounds"] = 1
    data: dict[str, Any] = {
        "run": {"name": "matrix", "output_dir": str(tmp / "runs")},
        "data": {"train": str(tmp / "train.jsonl"), "test": str(tmp / "test.jsonl")},
        "teacher": {"kind": "hf", "name": "t", "model": teacher, "batch_size": 8, "dtype": "float32"},
        "generate": {"splits": ["train"], "logprobs": 3, "sampling": {"max_tokens": 6},
                     "filters": {"truncated": "keep", "drop_empty": False}, "rows_per_shard": 8},
        "student": {"model": student},
        "train": {"loss": "kd", "max_steps": 2, "micro_batch_size": 4, "num_workers": 1,
                  "zero_stage": 2, "max_seq_len": 48, "log_every_steps": 1, "report_every_steps": 2},
        "evaluate": {"backend": "hf", "models": ["student"], "scorers": ["exact_match"],
                     "max_tokens": 4, "latency_samples": 1},
        "serve": {"backend": "hf", "port": free_port(), "serve_teacher": False},
        "bench": bench,
    }
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return config_from_dict(data)


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _rows(folder: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(Path(folder).rglob("*.parquet")):
        out.extend(pq.read_table(f).to_pylist())
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_model: str, tiny_model: str) -> Any:
    """The first, complete run; returns a factory for configs with changes."""
    import conftest

    conftest.start_local_ray()
    tmp = tmp_path_factory.mktemp("matrix")
    (tmp / "train.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": f"say {i} twice"}) + "\n" for i in range(10)))
    (tmp / "test.jsonl").write_text("".join(
        json.dumps({"id": f"t{i}", "prompt": f"say {i}", "reference": str(i)}) + "\n" for i in range(3)))

    def cfg(**changes: Any) -> Any:
        return _config(tmp, tiny_teacher_model, tiny_model, **changes)

    from distray import pipeline

    first = pipeline.run(cfg(), stages=STAGES)
    assert first.stages_run == STAGES
    cfg.tmp = tmp  # type: ignore[attr-defined]
    return cfg


def _student(cfg: Any) -> str:
    from distray.paths import RunPaths

    return _sha(Path(RunPaths(cfg.run_dir).student, "model.safetensors"))


def test_a_generate_with_nothing_to_do_then_run_skips_everything(run: Any) -> None:
    from distray import pipeline
    from distray.paths import RunPaths

    cfg = run()
    before, shards = _student(cfg), sorted(Path(RunPaths(cfg.run_dir).generate_data).rglob("*.parquet"))
    res = pipeline.run_stage(cfg, "generate")  # `distray generate --config ...`: nothing to do
    assert res.accepted == 0 and res.skipped_done == 10
    again = pipeline.run(run(), stages=STAGES)
    assert again.stages_skipped == STAGES and again.stages_run == []
    assert _student(cfg) == before
    assert sorted(Path(RunPaths(cfg.run_dir).generate_data).rglob("*.parquet")) == shards


def test_speed_only_changes_skip_every_stage(run: Any) -> None:
    from distray import pipeline

    before = _student(run())
    changed = run(teacher__batch_size=3, generate__rows_per_shard=4, train__log_every_steps=2,
                  train__max_failures=5, train__keep_checkpoints=3, serve__access_log=False)
    res = pipeline.run(changed, stages=STAGES)
    assert res.stages_skipped == STAGES
    assert _student(changed) == before


@pytest.mark.parametrize(("stage", "change"), [
    ("generate", {"generate__sampling": {"max_tokens": 5}}),
    ("train", {"train__lr": 1e-3}),
])
def test_an_answer_changing_setting_of_a_resumable_stage_is_refused_without_loss(
    run: Any, stage: str, change: dict[str, Any]
) -> None:
    from distray import pipeline
    from distray.errors import ConfigError
    from distray.paths import RunPaths

    cfg = run()
    before, rows = _student(cfg), len(_rows(RunPaths(cfg.run_dir).generate_data))
    with pytest.raises(ConfigError) as e:
        pipeline.run(run(**change), stages=STAGES)
    msg = str(e.value)
    assert f"stage {stage}:" in msg and "run.name=matrix-2" in msg and "would DELETE" in msg
    assert _student(cfg) == before and len(_rows(RunPaths(cfg.run_dir).generate_data)) == rows
    with pytest.raises(ConfigError):  # the single-stage command refuses the same way
        pipeline.run_stage(run(**change), stage)
    assert _student(cfg) == before


def test_an_answer_changing_setting_of_evaluate_or_bench_reruns_only_it(run: Any) -> None:
    from distray import pipeline

    res = pipeline.run(run(evaluate__max_tokens=3), stages=STAGES)
    assert res.stages_run == ["evaluate"] and res.stages_skipped == ["generate", "train", "bench"]
    res = pipeline.run(run(evaluate__max_tokens=3, bench__num_prompts=2), stages=STAGES)
    assert res.stages_run == ["bench"]


def test_an_edited_test_file_reruns_evaluate_and_bench(run: Any) -> None:
    from distray import pipeline

    test = run.tmp / "test.jsonl"
    text = test.read_text()
    test.write_text(text.replace("say 2", "say 7"))  # same size: only the content tells
    res = pipeline.run(run(evaluate__max_tokens=3, bench__num_prompts=2), stages=STAGES)
    assert res.stages_run == ["evaluate", "bench"] and res.stages_skipped == ["generate", "train"]


def test_a_removed_prompt_leaves_the_teacher_data_and_the_student_is_retrained(run: Any) -> None:
    from distray import pipeline
    from distray.paths import RunPaths

    cfg = run(evaluate__max_tokens=3, bench__num_prompts=2)
    before = _student(cfg)
    train = run.tmp / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(line for line in lines if '"p3"' not in line))
    res = pipeline.run(cfg, stages=STAGES)
    assert res.stages_run == STAGES  # generate resumes (nothing to ask), the rest redo
    p = RunPaths(cfg.run_dir)
    kept = _rows(p.generate_data)
    assert sorted(r["input_id"] for r in kept) == sorted(f"p{i}" for i in range(10) if i != 3)
    moved = _rows(f"{p.generate}/removed")
    assert [r["input_id"] for r in moved] == ["p3"]
    assert _student(cfg) != before  # trained on 9 prompts' rows
