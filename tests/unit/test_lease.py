"""The run folder lease: one run at a time, taken over when its holder died."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

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
