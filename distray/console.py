"""What a person sees: distray's own lines and progress on the console, everything else in a log.

    distray run jobs/configs/quickstart.yaml        # quiet console, full log in <run>/logs/
    distray run jobs/configs/quickstart.yaml -v     # everything on the console, as before

Ray, vLLM, DeepSpeed and the libraries under them print hundreds of lines a run (hints, progress
tables, per-batch timings, shutdown noise from engine processes). Only the CLI and jobs/ call
`capture`: it points this process's stdout and stderr (file descriptors 1 and 2, so C-level
prints and Ray's forwarded worker output are caught too) at `<run>/logs/driver.log`, and a
reader thread copies to the console only the lines distray itself logs (`HH:MM:SS L distray.x |`,
from the driver or forwarded from a Ray worker), plus a live progress line per stage. When the
run folder is on a bucket the log is written locally first and copied into `<run>/logs/` at the
end. A failed command prints its message, the last error lines of the log and the log's path.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["Capture", "LOG_FORMAT", "capture", "console_stream", "error_tail", "is_distray_line"]

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s | %(message)s"

# distray's log format, possibly behind Ray's worker prefix `(TrainWorker pid=123) `.
_ANSI = r"(\x1b\[[0-9;]*m)*"
_OURS = re.compile(rf"^{_ANSI}(\([^)]*\){_ANSI} )?\d\d:\d\d:\d\d [DIWEC] distray[.\w]* \| ")
# An exception's summary line (`ValueError: ...`, possibly behind Ray's worker prefix), or a
# log record at ERROR level.
_ERRORISH = re.compile(
    r"^(\x1b\[[0-9;]*m)*(\([^)]*\) )?([\w.]+(Error|Exception|Exit|Interrupt)\b:?|.*\b(ERROR|CRITICAL)\b)"
)

#: The console stream while a capture runs (the real terminal), else sys.stderr.
_console: IO[str] | None = None


def console_stream() -> IO[str]:
    """Where distray's console lines go: the terminal during a capture, else stderr."""
    return _console or sys.stderr


def is_distray_line(line: str) -> bool:
    """True for a line distray logged (on the driver, or forwarded from a Ray worker)."""
    return bool(_OURS.match(line))


# Known noise at a clean shutdown, which must not pass for the cause of a failure: Python's
# multiprocessing resource tracker of a vLLM engine process forgetting its shared memory, and
# vLLM's output handler seeing its engine core end while the actor is torn down.
_SHUTDOWN_NOISE = re.compile(r"KeyError: '/(psm_|mp-)|EngineDeadError: EngineCore encountered an issue")


def error_tail(log_path: str, n: int = 8) -> list[str]:
    """The last `n` lines of a log that look like errors (tracebacks' last lines, `...Error:`)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()[-4000:]
    except OSError:
        return []
    picked: list[str] = []
    for ln in lines:
        ln = ln.rstrip()
        if _ERRORISH.match(ln) and not _SHUTDOWN_NOISE.search(ln) and (not picked or picked[-1] != ln):
            picked.append(ln[:300])
    return picked[-n:]


@dataclass
class Capture:
    """A running capture: the log file, the console it filters onto (the terminal's stderr), and
    `out`, the terminal's stdout, for a command's result line."""

    log_path: str
    upload_to: str | None
    console: IO[str]
    out: IO[str]
    saved_fds: tuple[int, int]
    reader: threading.Thread
    pipe_w: int
    log_file: IO[bytes]
    progress: Progress | None = None
    lines: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def finish(self) -> None:
        """Restore stdout/stderr, drain the reader, close the log (and copy it to the bucket)."""
        global _console
        if self.progress is not None:
            self.progress.stop()
        # Ray forwards its workers' output to this process until it disconnects, and engine
        # replicas still shutting down (Serve's, after bench) would print past the capture,
        # onto the console: disconnect first, so their lines land in the log.
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved_fds[0], 1)
        os.dup2(self.saved_fds[1], 2)
        os.close(self.pipe_w)
        self.reader.join(timeout=10)
        self.log_file.close()
        sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb", buffering=0), write_through=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb", buffering=0), write_through=True)
        _console = None
        if self.upload_to:
            from distray.storage import write_bytes

            with contextlib.suppress(OSError):
                with open(self.log_path, "rb") as f:
                    write_bytes(self.upload_to, [f.read()])


def _reader(read_fd: int, log_file: IO[bytes], console: IO[str], cap: list[Capture]) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        buf = b""
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            log_file.write(chunk)
            log_file.flush()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if is_distray_line(line):
                    progress = cap[0].progress if cap else None
                    if progress is not None:
                        progress.clear()
                    console.write(line + "\n")
                    console.flush()
                    if cap:
                        cap[0].lines += 1


def _local_log_path(run_dir: str) -> tuple[str, str | None]:
    name = "driver.log"
    if "://" in run_dir:
        local = os.path.join(os.path.expanduser("~/.cache/distray/logs"), run_dir.rstrip("/").rsplit("/", 1)[-1])
        return os.path.join(local, name), f"{run_dir.rstrip('/')}/logs/{name}"
    return os.path.join(run_dir, "logs", name), None


@contextlib.contextmanager
def capture(run_dir: str, *, verbose: bool = False, cfg: Any = None) -> Iterator[Capture | None]:
    """Send this process's output to `<run>/logs/driver.log`, keeping distray's lines on the console.

    With `verbose` nothing is captured (everything stays on the console). The log is appended
    to, so reruns of one run folder keep their history.

    Args:
        run_dir: the run folder.
        verbose: leave the console alone.
        cfg: the config, for the progress line (generate's row count).

    Yields:
        The capture (None when verbose).
    """
    global _console
    if verbose:
        yield None
        return
    log_path, upload_to = _local_log_path(run_dir)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    console = io.TextIOWrapper(os.fdopen(os.dup(saved[1]), "wb", buffering=0), write_through=True)
    _console = console
    log_file = open(log_path, "ab")  # noqa: SIM115 - closed by Capture.finish
    log_file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n".encode())
    read_fd, write_fd = os.pipe()
    holder: list[Capture] = []
    reader = threading.Thread(target=_reader, args=(read_fd, log_file, console, holder),
                              name="distray-console", daemon=True)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(os.dup(1), "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(2), "wb", buffering=0), write_through=True)
    out = io.TextIOWrapper(os.fdopen(os.dup(saved[0]), "wb", buffering=0), write_through=True)
    cap = Capture(log_path, upload_to, console, out, saved, reader, write_fd, log_file)
    holder.append(cap)
    reader.start()
    shown = upload_to or log_path
    console.write(f"logs: {shown} (-v shows everything on the console)\n")
    cap.progress = Progress(run_dir, console, cfg)
    cap.progress.start()
    try:
        yield cap
    except BaseException:
        import traceback

        # The whole traceback goes to the log; the console gets the message and the log's path.
        sys.stderr.flush()
        cap.log_file.write(traceback.format_exc().encode("utf-8", "replace"))
        cap.log_file.flush()
        raise
    finally:
        cap.finish()
        for fd in saved:
            os.close(fd)


class Progress:
    """One live line per running stage, from the stage's own progress source (`Stage.progress`).

    Generate is followed by the rows its engines answered and its shards (rows, rejects,
    rows/s, ETA); train, evaluate
    and bench log their own dense lines, which the console shows as they come. On a terminal
    the line is redrawn in place; elsewhere (CI, `ray job submit` logs) a plain line is printed
    every `PLAIN_EVERY_S`.
    """

    PLAIN_EVERY_S = 30.0
    PLAIN_MIN_S = 5.0
    TTY_EVERY_S = 2.0

    def __init__(self, run_dir: str, console: IO[str], cfg: Any = None) -> None:
        self.run_dir = run_dir
        self.console = console
        self.cfg = cfg
        self.tty = bool(getattr(console, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="distray-progress", daemon=True)
        self._shown = False
        self._lock = threading.Lock()
        self._state: dict[str, dict[str, Any]] = {}  # each stage's progress source keeps its own

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.clear()

    def clear(self) -> None:
        with self._lock:
            if self.tty and self._shown:
                self.console.write("\r\x1b[2K")
                self.console.flush()
                self._shown = False

    def _loop(self) -> None:
        # Polled every TTY_EVERY_S either way; a plain console gets a line when the count moved
        # (at most every PLAIN_MIN_S) or every PLAIN_EVERY_S, so a log shows progress as it
        # happens without a line every 2 s.
        last_t, last_head = 0.0, ""
        while not self._stop.wait(self.TTY_EVERY_S):
            try:
                line = self.line()
            except Exception:  # noqa: BLE001 - progress must never break a run
                line = None
            if not line:
                continue
            now, head = time.monotonic(), line.split("|", 1)[0]
            if not self.tty and not (now - last_t >= self.PLAIN_EVERY_S
                                     or (head != last_head and now - last_t >= self.PLAIN_MIN_S)):
                continue
            last_t, last_head = now, head
            with self._lock:
                if self.tty:
                    self.console.write("\r\x1b[2K" + line)
                    self._shown = True
                else:
                    self.console.write(line + "\n")
                self.console.flush()

    def line(self) -> str | None:
        """The progress line of the stage running now (its `Stage.progress`), or None."""
        from distray.stages import REGISTRY

        for stage in REGISTRY.values():
            line = stage.progress_line(self.cfg, self.run_dir, self._state.setdefault(stage.name, {}))
            if line:
                return str(line)
        return None
