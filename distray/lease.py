"""One run at a time per run folder: a fenced lease that names its holder and its generation.

    with hold(cfg.run_dir) as fence:   # what `distray run` and the stage commands do
        ...
        fence.check("shard publish")   # every writer, just before it publishes

Two runs writing one folder would both write every row, and one run's cleanup would delete the
other's files. The lease is `<run>/.lease.json`:

    {"holder": "3f9c...", "generation": 2, "host": "node-1", "pid": 4242, "started": 1764490000.0,
     "renewed": 1764490020.0, "ray_job_id": "02000000", "ray_submission_id": null}

A live holder renews it every `RENEW_S`. A lease not renewed for `EXPIRE_S`, or held by a process
that no longer exists on this host, is taken over (its holder died: a kill -9, a lost node), and
the taker writes `generation + 1`. An empty or unreadable lease names nobody: it counts as held
until `EXPIRE_S` after its file was last written, never as dead.

Fencing. A dead driver's Ray workers can outlive it for a while and still hold rows to write.
Every writer therefore carries a `Fence` (run folder, holder, generation; small and picklable, so
it travels into Ray tasks and actors with the rest of their arguments) and calls `Fence.check`
right before it publishes: when the lease names another holder or a newer generation, the check
raises StageError and nothing is published. A renewal that finds another holder marks this
process's fence lost (every later check raises), logs an error, and leaving `hold` raises. What
is left is the moment between a check and the publish (an fsync and a rename, or a copy), which
no file or object store can close; a run taking over reads the folder seconds later.

The lease records the holder's Ray job (`ray_job_id`, and `ray_submission_id` under `ray job
submit`). A takeover stops a submitted job it replaces (`JobSubmissionClient.stop_job`, best
effort); a plain driver's workers end when Ray sees their driver gone. No distray actor is named
per run, so there is nothing else to look up and kill; until they end, the fence holds them.

Atomic steps, by storage:
- local (and NFS) folders: every read-decide-write runs under `flock` on `<run>/.lease.lock`.
- s3:// with boto3 installed: conditional PutObject (`If-None-Match: *` to create, `If-Match:
  <etag>` to renew, take over and delete), so two takeovers racing leave one holder.
- other object stores (gs://, s3:// without boto3): pyarrow has no conditional put, so a write is
  read back after `SETTLE_S` and counts only if it still names this holder. Two takeovers within
  that pause can both believe they won; fencing still stops the older generation's writers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from distray import storage
from distray.errors import LeaseLostError, StageError

__all__ = ["EXPIRE_S", "RENEW_S", "STOP_JOB_TIMEOUT_S", "Fence", "check_fence", "current", "hold", "read_lease"]

logger = logging.getLogger(__name__)

RENEW_S = 20.0
EXPIRE_S = 90.0
#: Read-back pause of object stores without conditional writes.
SETTLE_S = 1.0

# Leases this process holds: run folder → [count, fence], so a stage inside `distray run` (or the
# API inside a job) re-entering the same folder does not lock itself out.
_held: dict[str, list[Any]] = {}
# Holders whose renewal found another holder: holder → why. Every check of their fence raises.
_lost: dict[str, str] = {}
_lock = threading.Lock()


def _key(run_dir: str) -> str:
    if "://" in run_dir:
        return run_dir.rstrip("/")
    return os.path.realpath(os.path.expanduser(run_dir)).rstrip("/")


def _path(run_dir: str) -> str:
    return f"{_key(run_dir)}/.lease.json"


# ---- what a reader sees -------------------------------------------------------------------


@dataclass(frozen=True)
class _Seen:
    """The lease file as read: `record` is None when it is empty or unreadable."""

    exists: bool
    record: dict[str, Any] | None = None
    mtime: float | None = None
    etag: str | None = None


def _parse(text: str | bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:  # bad JSON or bad UTF-8
        return None
    return data if isinstance(data, dict) and data.get("holder") else None


def _generation(seen: _Seen) -> int:
    try:
        return int((seen.record or {}).get("generation", 0))
    except (TypeError, ValueError):
        return 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # not a process id (os.kill would signal a whole group): cannot tell
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _expired(seen: _Seen, now: float) -> bool:
    """True when the holder the lease names (or would name) is dead."""
    lease = seen.record
    if lease is None:
        # Empty or unreadable: a holder may be writing it right now. Held until its file is old.
        return seen.mtime is not None and now - seen.mtime > EXPIRE_S
    if lease.get("host") == socket.gethostname():
        try:
            if not _pid_alive(int(lease.get("pid", -1))):
                return True
        except (TypeError, ValueError):
            pass
    try:
        renewed = float(lease.get("renewed", 0))
    except (TypeError, ValueError):
        renewed = 0.0
    return now - renewed > EXPIRE_S


def _names(seen: _Seen, holder: str, generation: int) -> bool:
    return seen.record is not None and seen.record.get("holder") == holder and _generation(seen) == generation


def _who(seen: _Seen) -> str:
    if not seen.exists:
        return "the lease is gone (the run that held the folder has ended)"
    if seen.record is None:
        return "the lease file is empty or unreadable"
    r = seen.record
    return f"the lease names generation {_generation(seen)}, pid {r.get('pid')} on {r.get('host')}"


def _ray_info() -> dict[str, Any]:
    """This process's Ray job: what a person, or a run taking over, needs to stop it.

    The submission id (under `ray job submit`) is in the driver's environment from its start;
    the job id once Ray is up here (renewals add it).
    """
    info: dict[str, Any] = {}
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
        if meta.get("job_submission_id"):
            info["ray_submission_id"] = meta["job_submission_id"]
    ray: Any = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            info["ray_job_id"] = ray.get_runtime_context().get_job_id()
    return info


#: How long a takeover waits for `ray job stop` of the holder it replaced.
STOP_JOB_TIMEOUT_S = 15.0


def _stop_job(record: dict[str, Any]) -> None:
    """Best effort: stop the Ray job of a holder that was taken over, so its writers end.

    Only a job started with `ray job submit` can be stopped from outside (by its submission
    id); a plain driver's workers end when Ray sees their driver gone. Either way the fence
    keeps them from publishing meanwhile.
    """
    sid = record.get("ray_submission_id")
    if not sid:
        return

    def stop() -> None:
        try:
            from ray.job_submission import JobSubmissionClient

            JobSubmissionClient().stop_job(sid)
            logger.warning("stopped Ray job %s, which held the run folder before", sid)
        except Exception as e:  # noqa: BLE001 - a courtesy: the fence already stops its writes
            logger.warning("could not stop Ray job %s (%s); `ray job stop %s` does", sid, e, sid)

    thread = threading.Thread(target=stop, name="distray-lease-stop-job", daemon=True)
    thread.start()
    thread.join(STOP_JOB_TIMEOUT_S)


def _record(holder: str, generation: int, started: float) -> str:
    return json.dumps({
        "holder": holder, "generation": generation, "host": socket.gethostname(), "pid": os.getpid(),
        "started": started, "renewed": time.time(), **_ray_info(),
    })


# ---- stores: the atomic steps each storage offers -------------------------------------------


class _Store(Protocol):
    def exclusive(self) -> contextlib.AbstractContextManager[None]: ...
    def read(self) -> _Seen: ...
    def create(self, text: str) -> bool: ...
    def replace(self, text: str, seen: _Seen) -> bool: ...
    def delete(self, seen: _Seen) -> None: ...


class _LocalStore:
    """A local or mounted folder: every read-decide-write under flock on a lock file beside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = os.path.join(os.path.dirname(path), ".lease.lock")

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> _Seen:
        try:
            mtime = os.stat(self.path).st_mtime
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return _Seen(exists=False)
        return _Seen(exists=True, record=_parse(text), mtime=mtime)

    def create(self, text: str) -> bool:
        storage.write_text(self.path, text)  # under `exclusive()`: an atomic write is a CAS
        return True

    def replace(self, text: str, seen: _Seen) -> bool:
        return self.create(text)

    def delete(self, seen: _Seen) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class _S3Store:
    """s3:// through boto3's conditional PutObject / DeleteObject (If-None-Match, If-Match)."""

    #: What S3 answers when a condition fails: 412, or 409 for a conditional write racing another.
    _LOST = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409", "412"})
    #: What a store that lacks conditional requests answers (then: write and read back).
    _UNSUPPORTED = frozenset({"NotImplemented", "501"})

    def __init__(self, path: str, client: Any) -> None:
        parts = urlsplit(path)
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")
        self.client = client
        self.fallback: _ReadBackStore | None = None

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def _code(self, e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def read(self) -> _Seen:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._code(e) in ("NoSuchKey", "404"):
                return _Seen(exists=False)
            raise OSError(f"cannot read s3://{self.bucket}/{self.key}: {e}") from e
        text = got["Body"].read().decode("utf-8", "replace")
        return _Seen(True, _parse(text), got["LastModified"].timestamp(), got["ETag"])

    def _put(self, text: str, seen: _Seen | None, **condition: str) -> bool:
        from botocore.exceptions import ClientError

        if self.fallback is not None:
            return self.fallback.create(text) if seen is None else self.fallback.replace(text, seen)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=text.encode(), **condition)
        except ClientError as e:
            code = self._code(e)
            if code in self._LOST:
                return False
            if code in self._UNSUPPORTED:
                logger.warning("s3://%s has no conditional writes (%s): the lease falls back to "
                               "reading its writes back", self.bucket, code)
                self.fallback = _ReadBackStore(f"s3://{self.bucket}/{self.key}")
                return self._put(text, seen)
            raise OSError(f"cannot write s3://{self.bucket}/{self.key}: {e}") from e
        return True

    def create(self, text: str) -> bool:
        return self._put(text, None, IfNoneMatch="*")

    def replace(self, text: str, seen: _Seen) -> bool:
        return self._put(text, seen, IfMatch=seen.etag or "*")

    def delete(self, seen: _Seen) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=seen.etag or "*")
        except ClientError as e:
            if self._code(e) in self._LOST:
                return  # changed since it was read: another holder's now, not ours
            if self._code(e) not in self._UNSUPPORTED:
                raise OSError(f"cannot delete s3://{self.bucket}/{self.key}: {e}") from e
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _ReadBackStore:
    """Object stores without conditional writes (pyarrow): write, wait, read back."""

    def __init__(self, path: str) -> None:
        self.path = path

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def read(self) -> _Seen:
        import pyarrow.fs as pafs

        fs, inner = storage.filesystem_for(self.path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            return _Seen(exists=False)
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        with fs.open_input_stream(inner) as f:
            return _Seen(True, _parse(f.read()), mtime)

    def _write_and_confirm(self, text: str) -> bool:
        storage.write_text(self.path, text)
        time.sleep(SETTLE_S)
        holder = json.loads(text)["holder"]
        now = self.read()
        return now.record is not None and now.record.get("holder") == holder

    def create(self, text: str) -> bool:
        return not self.read().exists and self._write_and_confirm(text)

    def replace(self, text: str, seen: _Seen) -> bool:
        return self.read().record == seen.record and self._write_and_confirm(text)

    def delete(self, seen: _Seen) -> None:
        fs, inner = storage.filesystem_for(self.path)
        with contextlib.suppress(OSError):
            fs.delete_file(inner)


_clients: dict[str, Any] = {}


def _store(path: str) -> _Store:
    if "://" not in path:
        return _LocalStore(path)
    parts = urlsplit(path)
    if parts.scheme == "s3" and not parts.query:
        try:
            import boto3
        except ImportError:
            return _ReadBackStore(path)
        # Same environment as pyarrow's S3 (AWS_ENDPOINT_URL, keys, region); one client per
        # endpoint, since a process may meet more than one (tests start their own servers).
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        with _lock:
            if endpoint not in _clients:
                _clients[endpoint] = boto3.client("s3")
            return _S3Store(path, _clients[endpoint])
    return _ReadBackStore(path)


def read_lease(run_dir: str) -> dict[str, Any] | None:
    """The lease record of a run folder, or None when there is none (or it cannot be read)."""
    return _store(_path(run_dir)).read().record


# ---- fencing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """A writer's proof that it writes for the run holding the folder: pass it where the writer
    runs (a Ray task's argument), and `check` it right before publishing."""

    run_dir: str
    holder: str
    generation: int

    def check(self, what: str = "publish") -> None:
        """Return when the lease still names this holder and generation.

        Raises:
            StageError: another run took the folder over, this run's renewal lost it, or the
                lease cannot be read; the writer must stop without publishing.
        """
        why = _lost.get(self.holder)
        if why is None:
            seen = _read_retrying(_store(_path(self.run_dir)), what)
            if _names(seen, self.holder, self.generation):
                return
            why = _who(seen)
        raise LeaseLostError(
            f"{what} into {self.run_dir} stopped, nothing published: this writer holds lease "
            f"generation {self.generation}, but {why}. Another run took the folder over (or this "
            "run's driver died), and only the newest generation writes; the run holding "
            f"{_path(self.run_dir)} finishes the work"
        )


def _read_retrying(store: _Store, what: str) -> _Seen:
    for attempt in range(3):
        try:
            return store.read()
        except OSError as e:
            if attempt == 2:
                raise StageError(f"{what}: cannot read the run folder lease to check it: {e}") from e
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def current(run_dir: str) -> Fence | None:
    """The fence of the lease this process holds on `run_dir`, or None when it holds none."""
    with _lock:
        entry = _held.get(_key(run_dir))
    return entry[1] if entry else None


def check_fence(run_dir: str, what: str = "publish") -> None:
    """Check this process's fence on `run_dir` (see `Fence.check`); no-op when it holds none."""
    fence = current(run_dir)
    if fence is not None:
        fence.check(what)


# ---- acquire, renew, release ----------------------------------------------------------------


def _refuse(run_dir: str, seen: _Seen) -> StageError:
    lease = seen.record
    if lease is None:
        until = time.strftime("%H:%M:%S", time.localtime((seen.mtime or time.time()) + EXPIRE_S))
        return StageError(
            f"run folder {run_dir} is in use by a run whose lease {_path(run_dir)} is empty or "
            f"unreadable; it counts as held until {until} ({EXPIRE_S:.0f} s after it was written). "
            "Wait, set another run.name, or delete that file if no run uses the folder"
        )
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
    return StageError(
        f"run folder {run_dir} is in use by pid {lease.get('pid')} on {lease.get('host')} "
        f"(since {since}); wait for that run to end, stop it, or set another run.name. A lease "
        f"whose holder died expires after {EXPIRE_S:.0f} s"
    )


def _acquire(store: _Store, run_dir: str, holder: str, started: float) -> Fence:
    """Create or take over the lease; raise when a live holder has it."""
    for _ in range(3):
        with store.exclusive():
            seen = store.read()
            if not seen.exists:
                if store.create(_record(holder, 1, started)):
                    return Fence(run_dir, holder, 1)
                continue  # another run created it meanwhile: look again
            if not _expired(seen, time.time()):
                raise _refuse(run_dir, seen)
            generation = _generation(seen) + 1
            if store.replace(_record(holder, generation, started), seen):
                _log_takeover(run_dir, seen, generation)
                _stop_job(seen.record or {})
                return Fence(run_dir, holder, generation)
    seen = store.read()  # lost every race: someone else holds it now
    if not seen.exists:
        raise StageError(
            f"run folder {run_dir}: other runs took and released its lease while this one tried "
            "three times; start this run again once they have ended, or set another run.name"
        )
    raise _refuse(run_dir, seen)


def _log_takeover(run_dir: str, seen: _Seen, generation: int) -> None:
    r = seen.record or {}
    job = r.get("ray_submission_id") or r.get("ray_job_id")
    logger.warning(
        "run folder %s: taking over the lease from a holder that died (pid %s on %s, generation "
        "%s%s); now generation %d, so its writers that still run cannot publish%s",
        run_dir, r.get("pid"), r.get("host"), _generation(seen),
        f", Ray job {job}" if job else "", generation,
        " (stopping that job)" if r.get("ray_submission_id") else "",
    )


def _renew(store: _Store, fence: Fence, started: float) -> str | None:
    """Renew the lease if it still names this holder; else say who it names."""
    with store.exclusive():
        seen = store.read()
        if not _names(seen, fence.holder, fence.generation):
            return _who(seen)
        if store.replace(_record(fence.holder, fence.generation, started), seen):
            return None
        return _who(store.read())


def _release(store: _Store, fence: Fence) -> None:
    with store.exclusive():
        seen = store.read()
        if _names(seen, fence.holder, fence.generation):
            store.delete(seen)


def _renew_until(stop: threading.Event, store: _Store, fence: Fence, started: float) -> None:
    while not stop.wait(RENEW_S):
        try:
            why = _renew(store, fence, started)
        except OSError as e:  # storage hiccup: try again; a takeover would show at the next try
            logger.warning("could not renew the run folder lease %s: %s", _path(fence.run_dir), e)
            continue
        if why is not None:
            with _lock:
                _lost[fence.holder] = why
            logger.error(
                "run folder %s: this run lost its lease (generation %d): %s. It publishes "
                "nothing more; every writer stops at its next publish",
                fence.run_dir, fence.generation, why,
            )
            return


@contextlib.contextmanager
def hold(run_dir: str) -> Iterator[Fence]:
    """Hold the run folder's lease for the duration of the block.

    Yields:
        The fence writers check before publishing (the same one when this process re-enters).

    Raises:
        StageError: another live run holds it (naming its pid, host and start time), or its
            lease is empty or unreadable and not yet expired; or, on leaving, another run took
            the folder over while the block ran (its last outputs may be missing).
    """
    key = _key(run_dir)
    with _lock:
        entry = _held.get(key)
        if entry:
            entry[0] += 1
    if entry:
        try:
            yield entry[1]
        finally:
            with _lock:
                entry[0] -= 1
        return
    store = _store(_path(key))
    started = time.time()
    fence = _acquire(store, key, uuid.uuid4().hex, started)
    with _lock:
        _held[key] = [1, fence]
    stop = threading.Event()
    thread = threading.Thread(
        target=_renew_until, args=(stop, store, fence, started), name="distray-lease", daemon=True
    )
    thread.start()
    try:
        yield fence
    finally:
        stop.set()
        thread.join(timeout=5)
        with _lock:
            _held.pop(key, None)
            lost = _lost.pop(fence.holder, None)
        with contextlib.suppress(OSError):
            _release(store, fence)
    if lost is not None:  # the block finished, but not all of its outputs may have been written
        raise StageError(
            f"run folder {key}: this run lost its lease during the run ({lost}), so it stopped "
            "publishing; another run holds the folder now. Check that run's outputs, or rerun "
            "once it has ended"
        )
