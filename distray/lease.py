"""One run at a time per run folder: a lease file that names its holder and expires when it dies.

    with hold(cfg.run_dir):   # what `distray run` and the stage commands do
        ...

Two runs writing one folder would both write every row, and one run's cleanup would delete the
other's temp files. The lease is `<run>/.lease.json`:

    {"holder": "3f9c...", "host": "node-1", "pid": 4242, "started": 1764490000.0, "renewed": ...}

- Locally it is created with O_CREAT|O_EXCL, so exactly one process wins.
- On object stores (s3://, gs://) pyarrow has no conditional put: the lease is written, then read
  back after a short pause, and the run proceeds only if it still names this holder. That closes
  the race except for two starts within the pause.
- A live holder renews it every `RENEW_S`; a lease not renewed for `EXPIRE_S`, or held by a
  process that no longer exists on this host, is taken over (the holder died: a kill -9, a lost
  node).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from distray.errors import StageError
from distray.storage import exists, filesystem_for, read_text, write_text

__all__ = ["EXPIRE_S", "RENEW_S", "hold"]

logger = logging.getLogger(__name__)

RENEW_S = 20.0
EXPIRE_S = 90.0
_CLOUD_SETTLE_S = 1.0

# Leases this process holds: run folder → count, so a stage inside `distray run` (or the API
# inside a job) re-entering the same folder does not lock itself out.
_held: dict[str, int] = {}
_lock = threading.Lock()


def _path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/.lease.json"


def _read(path: str) -> dict[str, Any] | None:
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _expired(lease: dict[str, Any] | None) -> bool:
    if lease is None:
        return True  # unreadable: a holder that died while writing it
    if lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1))):
        return True
    return time.time() - float(lease.get("renewed", 0)) > EXPIRE_S


def _record(holder: str, started: float) -> str:
    return json.dumps({
        "holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
        "started": started, "renewed": time.time(),
    })


def _refuse(run_dir: str, lease: dict[str, Any]) -> StageError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    return StageError(
        f"run folder {run_dir} is in use by pid {lease.get('pid')} on {lease.get('host')} "
        f"(since {since}); wait for that run to end, stop it, or set another run.name. A lease "
        f"whose holder died expires after {EXPIRE_S:.0f} s"
    )


def _acquire_local(path: str, holder: str, started: float) -> dict[str, Any] | None:
    """Create the lease exclusively; return the other holder's lease when it is live."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read(path)
            if not _expired(other):
                return other
            logger.warning("run folder lease %s: taking over from a holder that died (%s)", path, other)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_record(holder, started))
        return None
    return _read(path)


def _acquire_cloud(path: str, holder: str, started: float) -> dict[str, Any] | None:
    other = _read(path) if exists(path) else None
    if other is not None and not _expired(other):
        return other
    write_text(path, _record(holder, started))
    time.sleep(_CLOUD_SETTLE_S)
    now = _read(path)
    return None if now is not None and now.get("holder") == holder else now


@contextlib.contextmanager
def hold(run_dir: str) -> Iterator[None]:
    """Hold the run folder's lease for the duration of the block.

    Raises:
        StageError: another live run holds it (naming its pid, host and start time).
    """
    with _lock:
        if _held.get(run_dir):
            _held[run_dir] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _lock:
                _held[run_dir] -= 1
        return
    path = _path(run_dir)
    holder, started = uuid.uuid4().hex, time.time()
    acquire = _acquire_cloud if "://" in path else _acquire_local
    other = acquire(path, holder, started)
    if other is not None:
        raise _refuse(run_dir, other)
    with _lock:
        _held[run_dir] = 1
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_S):
            try:
                write_text(path, _record(holder, started))
            except OSError as e:  # a renewal lost is not worth failing the run for
                logger.warning("could not renew the run folder lease %s: %s", path, e)

    thread = threading.Thread(target=renew, name="distray-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with _lock:
            _held.pop(run_dir, None)
        current = _read(path)
        if current is not None and current.get("holder") == holder:
            fs, inner = filesystem_for(path)
            with contextlib.suppress(OSError):
                fs.delete_file(inner)
