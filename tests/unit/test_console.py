"""The console: distray's lines on the terminal, everything else in <run>/logs/driver.log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from distray.console import error_tail, is_distray_line

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from distray.console import capture, LOG_FORMAT

    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    h._distray = True
    lg = logging.getLogger("distray")
    lg.addHandler(h); lg.setLevel(logging.INFO); lg.propagate = False
    with capture(sys.argv[1]) as cap:
        print("INFO streaming_executor.py:215 -- Starting execution of Dataset")
        os.write(2, b"<jemalloc>: libtcmalloc hint from C\\n")
        logging.getLogger("distray.teacher.generate").info("generate | 16 rows in")
        os.write(1, b"(TrainWorker pid=42) 12:00:00 I distray.train.loop | step 3 | loss 2.1\\n")
        print("result line", file=cap.out, flush=True)
    print("after the capture")
    """
)


def test_only_distray_lines_reach_the_console_and_everything_reaches_the_log(tmp_path: Path) -> None:
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(run)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["result line", "after the capture"]
    err = p.stderr.splitlines()
    assert err[0].startswith(f"logs: {run}/logs/driver.log")
    assert any(ln.endswith("I distray.teacher.generate | generate | 16 rows in") for ln in err)
    assert any("distray.train.loop | step 3" in ln for ln in err)  # forwarded from a worker
    assert not any("libtcmalloc" in ln or "streaming_executor" in ln for ln in err)
    log = (run / "logs" / "driver.log").read_text()
    for text in ("streaming_executor", "libtcmalloc", "generate | 16 rows in", "step 3 | loss 2.1"):
        assert text in log


FAILING = textwrap.dedent(
    """
    import dataclasses, os, sys, types
    from distray import cli, pipeline

    mod = types.ModuleType("failing_stage")
    def run(cfg):
        os.write(2, b"INFO some library chatter\\n")
        raise OSError("engine process died: out of memory")
    mod.run = run
    sys.modules["failing_stage"] = mod
    pipeline.REGISTRY["serve"] = dataclasses.replace(pipeline.REGISTRY["serve"], module="failing_stage")
    sys.exit(cli.main(["serve", "--config", sys.argv[1]]))
    """
)


def test_a_failed_command_says_what_failed_and_names_its_log(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: r, output_dir: {tmp_path}}}\nstudent: {{model: {tmp_path}}}\n")
    p = subprocess.run([sys.executable, "-c", FAILING, str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert "distray: error: OSError: engine process died: out of memory" in p.stderr
    assert f"full log: {tmp_path}/r/logs/driver.log" in p.stderr
    assert "Traceback" not in p.stderr and "library chatter" not in p.stderr
    log = (tmp_path / "r" / "logs" / "driver.log").read_text()
    assert "Traceback" in log and "library chatter" in log


def test_distray_lines_are_told_from_library_lines() -> None:
    assert is_distray_line("09:01:37 I distray.teacher.generate | generate | 16 rows")
    assert is_distray_line("\x1b[36m(MapWorker pid=1)\x1b[0m 09:01:37 W distray.x | warn")
    assert not is_distray_line("2026-11-30 09:01:06,196\tINFO streaming_executor.py:215 -- Starting")
    assert not is_distray_line("INFO 11-30 vllm distray.x | not ours")


def test_error_tail_picks_exception_lines(tmp_path: Path) -> None:
    log = tmp_path / "driver.log"
    log.write_text("ok\nTraceback (most recent call last):\n  File x\n    raise X\nValueError: bad row\n"
                   "(MapWorker pid=9) KeyError: '/psm_5d720120'\n"
                   "(EngineActor pid=3) RuntimeError: engine died\nfine again\n")
    assert error_tail(str(log)) == ["ValueError: bad row", "(EngineActor pid=3) RuntimeError: engine died"]


def test_generate_progress_rises_with_answered_rows_before_any_shard(tmp_path) -> None:
    """The progress line counts rows as the engines answer them (their counters), not only rows
    in published shards, and its rate starts with the first answers."""
    import pyarrow as pa

    from distray.stage_facts import generate_progress
    from distray.teacher.progress import PROGRESS_DIR, count_answered

    run_dir = str(tmp_path)
    (tmp_path / "generate").mkdir()
    (tmp_path / "generate" / "lineage.json").write_text("{}")
    state: dict = {}
    assert "waiting for the teacher's first answers" in generate_progress(None, run_dir, state)
    folder = f"{run_dir}/generate/{PROGRESS_DIR}"
    seen = []
    for _ in range(3):
        count_answered(pa.table({"id": ["a"] * 16}), folder)  # one engine batch answered
        line = generate_progress(None, run_dir, state)
        seen.append(int(line.split()[1]))
    assert seen == [16, 32, 48] and "rows/s" in line
    (tmp_path / "generate" / "stats.json").write_text("{}")  # the stage ended: no line
    assert generate_progress(None, run_dir, state) is None


def test_generate_progress_reads_each_published_shard_once(tmp_path, monkeypatch) -> None:
    """Polled every few seconds, the progress line reads only shards published since its last
    poll (a shard never changes once published)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distray.stage_facts import generate_progress

    data = tmp_path / "generate" / "data" / "train"
    data.mkdir(parents=True)
    (tmp_path / "generate" / "lineage.json").write_text("{}")
    pq.write_table(pa.table({"id": ["a", "b"]}), data / "part-1.parquet")
    opened: list[str] = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda f, *a, **k: opened.append("x") or real(f, *a, **k))
    state: dict = {}
    generate_progress(None, str(tmp_path), state)
    pq.write_table(pa.table({"id": ["c"]}), data / "part-2.parquet")
    line = generate_progress(None, str(tmp_path), state)
    assert line.startswith("generate: 3 rows") and len(opened) == 2
