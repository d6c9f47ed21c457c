"""The run folder lease: one run at a time, taken over when its holder died."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distray import lease
from distray.errors import StageError


def _hold_then_wait(run_dir: str, ready: multiprocessing.Event, done: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    with lease.hold(run_dir):
        ready.set()  # type: ignore[attr-defined]
        done.wait(30)  # type: ignore[attr-defined]


def test_a_second_run_is_refused_naming_the_holder(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_then_wait, args=(str(tmp_path / "run"), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(StageError, match=rf"in use by pid {holder.pid} on {socket.gethostname()}"):
            with lease.hold(str(tmp_path / "run")):
                pass
    finally:
        done.set()
        holder.join(30)
    # Released on exit: the folder is free again, and the lease file is gone.
    with lease.hold(str(tmp_path / "run")):
        pass
    assert not (tmp_path / "run" / ".lease.json").exists()


def test_a_lease_whose_holder_died_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    (run / ".lease.json").write_text(json.dumps({
        "holder": "x", "host": socket.gethostname(), "pid": dead.pid, "started": time.time(),
        "renewed": time.time(),
    }))
    with lease.hold(str(run)):  # killed -9 holder: not refused
        assert json.loads((run / ".lease.json").read_text())["pid"] == os.getpid()


def test_a_stale_lease_from_another_host_expires(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    old = time.time() - lease.EXPIRE_S - 1
    (run / ".lease.json").write_text(json.dumps({
        "holder": "x", "host": "another-node", "pid": 1, "started": old, "renewed": old,
    }))
    with lease.hold(str(run)):
        pass
    (run / ".lease.json").write_text(json.dumps({
        "holder": "x", "host": "another-node", "pid": 1, "started": time.time(), "renewed": time.time(),
    }))
    with pytest.raises(StageError, match="another-node"):
        with lease.hold(str(run)):
            pass


def test_the_same_process_may_reenter(tmp_path: Path) -> None:
    with lease.hold(str(tmp_path)), lease.hold(str(tmp_path)):
        pass
    assert not (tmp_path / ".lease.json").exists()


# ---- the fenced lease: generations, renewal, unreadable leases, races, orphan writers -------


def _hold_and_report(run_dir: str, out: Any, done: Any) -> None:
    with lease.hold(run_dir) as fence:
        out.put((fence.holder, fence.generation))
        done.wait(30)


def _race(run_dir: str, start: Any, out: Any, done: Any) -> None:
    start.wait(10)
    try:
        with lease.hold(run_dir) as fence:
            out.put(("held", fence.generation))
            done.wait(10)  # keep it while the others try
    except StageError as e:
        out.put(("refused", str(e)))


def _dead_pid() -> int:
    dead = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    assert dead.pid is not None
    return dead.pid


def _write_lease(run: Path, **fields: Any) -> None:
    record = {"holder": "other", "generation": 1, "host": socket.gethostname(), "pid": os.getpid(),
              "started": time.time(), "renewed": time.time(), **fields}
    (run / ".lease.json").write_text(json.dumps(record))


def test_a_renewal_that_finds_another_holder_stops_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    run = tmp_path / "run"
    with pytest.raises(StageError, match="lost its lease"), lease.hold(str(run)) as fence:
        assert fence.generation == 1
        fence.check()
        # Another run takes the folder over (this one looked dead to it: a long pause, a lost node).
        _write_lease(run, holder="other", generation=2)
        deadline = time.time() + 5
        while time.time() < deadline and not any(r.levelname == "ERROR" for r in caplog.records):
            time.sleep(0.02)
        # The renewal did not write over the other holder's lease, and said so as an error.
        assert json.loads((run / ".lease.json").read_text())["holder"] == "other"
        assert any("lost its lease" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        with pytest.raises(StageError, match="generation 2"):
            fence.check("evaluate outputs")
        with pytest.raises(StageError, match="nothing published"):
            lease.check_fence(str(run))
    # Leaving says so (the run's outputs may be incomplete), and leaves the other run's lease.
    assert json.loads((run / ".lease.json").read_text())["holder"] == "other"


def test_an_empty_lease_counts_as_held_until_it_expires(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lease.json").write_text("")  # created, not yet written (or damaged)
    with pytest.raises(StageError, match="empty or unreadable"):
        with lease.hold(str(run)):
            pass
    assert (run / ".lease.json").exists()
    old = time.time() - lease.EXPIRE_S - 1
    os.utime(run / ".lease.json", (old, old))
    with lease.hold(str(run)) as fence:
        assert json.loads((run / ".lease.json").read_text())["holder"] == fence.holder


def test_a_takeover_raises_the_generation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    _write_lease(run, holder="dead", generation=4, pid=_dead_pid())
    with lease.hold(str(run)) as fence:
        assert fence.generation == 5
        assert json.loads((run / ".lease.json").read_text())["generation"] == 5
        assert lease.current(str(run)) == fence


def test_two_takeovers_racing_leave_one_holder(tmp_path: Path) -> None:
    # Six runs start at once on a folder whose holder died; a few rounds, since a race that
    # goes wrong does so in most rounds, not all.
    ctx = multiprocessing.get_context("fork")
    for round_ in range(3):
        run = tmp_path / f"run{round_}"
        run.mkdir()
        _write_lease(run, holder="dead", generation=1, pid=_dead_pid())
        start, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
        racers = [ctx.Process(target=_race, args=(str(run), start, out, done)) for _ in range(6)]
        for p in racers:
            p.start()
        start.set()
        try:
            results = [out.get(timeout=20) for _ in racers]
        finally:
            done.set()
            for p in racers:
                p.join(20)
        held = [r for r in results if r[0] == "held"]
        assert len(held) == 1, results
        assert held[0][1] == 2
        assert all("in use by pid" in r[1] for r in results if r[0] == "refused")


def test_an_orphan_writer_with_an_old_generation_cannot_publish(tmp_path: Path) -> None:
    from distray import formats as F
    from distray.teacher import writer

    run = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    out, done = ctx.Queue(), ctx.Event()
    driver = ctx.Process(target=_hold_and_report, args=(str(run), out, done))
    driver.start()
    holder, generation = out.get(timeout=30)
    os.kill(driver.pid, signal.SIGKILL)  # the driver dies; its Ray workers would live on
    driver.join(10)
    orphan = lease.Fence(str(run), holder, generation)  # what its workers were handed
    rows = [{F.ID: "a" * 32, F.RESPONSE: "hello"}]
    data, tmp = run / "generate" / "data" / "train", run / "generate" / ".tmp"
    with lease.hold(str(run)) as fence:  # the rerun, at once: no waiting for the orphans
        assert fence.generation == generation + 1
        with pytest.raises(StageError, match=f"holds lease generation {generation}"):
            writer.write_shard(rows, str(data), str(tmp), schema=F.TEACHER_DATA_SCHEMA, fence=orphan)
        assert list(data.iterdir()) == [] and list(tmp.iterdir()) == []
        # The rerun's own writers publish.
        path = writer.write_shard(rows, str(data), str(tmp), schema=F.TEACHER_DATA_SCHEMA, fence=fence)
        assert path is not None and [p.name for p in data.iterdir()] == [os.path.basename(path)]


def test_a_takeover_stops_the_ray_job_of_the_holder_it_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    stopped: list[str] = []

    class Client:
        def stop_job(self, submission_id: str) -> bool:
            stopped.append(submission_id)
            return True

    fake_ray = types.ModuleType("ray")
    fake_jobs = types.ModuleType("ray.job_submission")
    fake_jobs.JobSubmissionClient = Client  # type: ignore[attr-defined]
    fake_ray.job_submission = fake_jobs  # type: ignore[attr-defined]
    fake_ray.is_initialized = lambda: False  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.setitem(sys.modules, "ray.job_submission", fake_jobs)
    # This run was started by `ray job submit` too: its lease names its own submission.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_new"}}))
    run = tmp_path / "run"
    run.mkdir()
    _write_lease(run, holder="dead", pid=_dead_pid(), ray_submission_id="raysubmit_old")
    with lease.hold(str(run)):
        assert stopped == ["raysubmit_old"]
        assert json.loads((run / ".lease.json").read_text())["ray_submission_id"] == "raysubmit_new"
