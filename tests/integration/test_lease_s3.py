"""The run folder lease on an S3 bucket (moto's server): conditional writes, fencing.

    .venv/bin/python -m pytest tests/integration/test_lease_s3.py -q -p no:xdist

The same guarantees as tests/unit/test_lease.py on local disk: a renewal that finds another
holder fails, two takeovers racing leave one holder (one of them slowed down by a proxy, the
race a plain write-then-read-back loses), a dead driver's writer cannot publish.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import BUCKET, S3Server  # noqa: E402

from distray import lease  # noqa: E402
from distray.errors import StageError  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def run_dir(s3: S3Server) -> str:
    return f"s3://{BUCKET}/runs/lease-{uuid.uuid4().hex[:8]}"


def _client(s3: S3Server) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint)


def _key(run_dir: str) -> str:
    return run_dir.split(f"{BUCKET}/", 1)[1] + "/.lease.json"


def _lease(s3: S3Server, run_dir: str) -> dict[str, Any] | None:
    try:
        body = _client(s3).get_object(Bucket=BUCKET, Key=_key(run_dir))["Body"].read()
    except Exception:  # noqa: BLE001 - NoSuchKey
        return None
    return dict(json.loads(body)) if body else {}


def _put_lease(s3: S3Server, run_dir: str, body: str) -> None:
    _client(s3).put_object(Bucket=BUCKET, Key=_key(run_dir), Body=body.encode())


def _keys(s3: S3Server, prefix: str) -> list[str]:
    got = _client(s3).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in got.get("Contents", [])]


class _SlowProxy:
    """An HTTP proxy to the S3 server that answers each GET `delay_s` after it read it: a client
    whose reads arrive late (a long GC pause, a slow network)."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue` (pyarrow's uploads)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""  # passed on as it came, chunk framing and trailers included
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    raw += self.rfile.read(size + 2)
                while True:
                    line = self.rfile.readline()
                    raw += line
                    if line in (b"\r\n", b"\n", b""):
                        return raw

            def _forward(self) -> None:
                body = self._body()
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                skip = ("connection", "expect", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                if "Transfer-Encoding" not in self.headers:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.command == "GET":
                    time.sleep(proxy.delay_s)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.delay_s = delay_s
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _race(run_dir: str, endpoint: str, start: Any, out: Any, done: Any) -> None:
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    start.wait(60)
    try:
        with lease.hold(run_dir) as fence:
            out.put(("held", endpoint, fence.generation))
            done.wait(30)
    except StageError as e:
        out.put(("refused", endpoint, str(e)))


def _hold_and_report(run_dir: str, out: Any, done: Any) -> None:
    with lease.hold(run_dir) as fence:
        out.put((fence.holder, fence.generation))
        done.wait(60)


def test_s3_a_renewal_by_a_non_holder_fails(
    s3: S3Server, run_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lease, "RENEW_S", 0.1)
    with pytest.raises(StageError, match="lost its lease"), lease.hold(run_dir) as fence:
        assert _lease(s3, run_dir)["holder"] == fence.holder  # type: ignore[index]
        other = {"holder": "other", "generation": fence.generation + 1, "host": "node-2", "pid": 7,
                 "started": time.time(), "renewed": time.time()}
        _put_lease(s3, run_dir, json.dumps(other))
        deadline = time.time() + 10
        while time.time() < deadline and not any(r.levelname == "ERROR" for r in caplog.records):
            time.sleep(0.05)
        assert _lease(s3, run_dir)["holder"] == "other"  # type: ignore[index]
        assert any("lost its lease" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        with pytest.raises(StageError, match="pid 7 on node-2"):
            fence.check("evaluate outputs")
    assert _lease(s3, run_dir)["holder"] == "other"  # type: ignore[index]


def test_s3_two_takeovers_racing_leave_one_holder(s3: S3Server, run_dir: str) -> None:
    old = time.time() - lease.EXPIRE_S - 5
    _put_lease(s3, run_dir, json.dumps({"holder": "dead", "generation": 1, "host": "lost-node",
                                        "pid": 1, "started": old, "renewed": old}))
    # One racer's reads arrive 1.5 s late: it decides on a lease the other has replaced by then.
    proxy = _SlowProxy(s3.port, delay_s=1.5)
    ctx = multiprocessing.get_context("spawn")
    start, done, out = ctx.Event(), ctx.Event(), ctx.Queue()
    racers = [ctx.Process(target=_race, args=(run_dir, e, start, out, done))
              for e in (s3.endpoint, proxy.endpoint, s3.endpoint)]
    for p in racers:
        p.start()
    try:
        start.set()
        results = [out.get(timeout=60) for _ in racers]
    finally:
        done.set()
        for p in racers:
            p.join(30)
        proxy.stop()
    held = [r for r in results if r[0] == "held"]
    assert len(held) == 1, results
    assert held[0][2] == 2
    assert not _keys(s3, run_dir.split(f"{BUCKET}/", 1)[1] + "/")  # released by the one holder


def test_s3_an_orphan_writer_with_an_old_generation_cannot_publish(s3: S3Server, run_dir: str) -> None:
    from distray import formats as F
    from distray.teacher import writer

    ctx = multiprocessing.get_context("spawn")
    out, done = ctx.Queue(), ctx.Event()
    driver = ctx.Process(target=_hold_and_report, args=(run_dir, out, done))
    driver.start()
    holder, generation = out.get(timeout=60)
    assert driver.pid is not None
    os.kill(driver.pid, signal.SIGKILL)
    driver.join(10)
    orphan = lease.Fence(run_dir, holder, generation)
    rows = [{F.ID: "b" * 32, F.RESPONSE: "hello"}]
    data, tmp = f"{run_dir}/generate/data/train", f"{run_dir}/generate/.tmp"
    prefix = run_dir.split(f"{BUCKET}/", 1)[1] + "/generate/"
    with lease.hold(run_dir) as fence:  # the rerun, at once: the dead driver was on this host
        assert fence.generation == generation + 1
        with pytest.raises(StageError, match=f"holds lease generation {generation}"):
            writer.write_shard(rows, data, tmp, schema=F.TEACHER_DATA_SCHEMA, fence=orphan)
        assert [k for k in _keys(s3, prefix) if not k.endswith("/")] == []  # folder markers only
        path = writer.write_shard(rows, data, tmp, schema=F.TEACHER_DATA_SCHEMA, fence=fence)
        published = [k for k in _keys(s3, prefix + "data/train/") if not k.endswith("/")]
        assert path is not None and published == [path.split(f"{BUCKET}/", 1)[1]]


def test_s3_an_empty_lease_counts_as_held_until_it_expires(
    s3: S3Server, run_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _put_lease(s3, run_dir, "")
    with pytest.raises(StageError, match="empty or unreadable"):
        with lease.hold(run_dir):
            pass
    assert _lease(s3, run_dir) == {}
    monkeypatch.setattr(lease, "EXPIRE_S", 1.0)
    time.sleep(2.1)  # the object's Last-Modified has whole seconds
    with lease.hold(run_dir) as fence:
        assert _lease(s3, run_dir)["holder"] == fence.holder  # type: ignore[index]
        assert socket.gethostname() == _lease(s3, run_dir)["host"]  # type: ignore[index]
    assert _lease(s3, run_dir) is None


def test_s3_without_conditional_writes_still_fences(
    s3: S3Server, run_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distray import formats as F
    from distray.teacher import writer

    client = _client(s3)
    monkeypatch.setitem(sys.modules, "boto3", None)  # no boto3: pyarrow's writes, read back
    monkeypatch.setattr(lease, "SETTLE_S", 0.2)
    with lease.hold(run_dir) as fence:
        body = client.get_object(Bucket=BUCKET, Key=_key(run_dir))["Body"].read()
        assert json.loads(body)["holder"] == fence.holder
        other = {"holder": "other", "generation": fence.generation + 1, "host": "node-2", "pid": 7,
                 "started": time.time(), "renewed": time.time()}
        client.put_object(Bucket=BUCKET, Key=_key(run_dir), Body=json.dumps(other).encode())
        rows = [{F.ID: "c" * 32, F.RESPONSE: "hello"}]
        data, tmp = f"{run_dir}/generate/data/train", f"{run_dir}/generate/.tmp"
        with pytest.raises(StageError, match="pid 7 on node-2"):
            writer.write_shard(rows, data, tmp, schema=F.TEACHER_DATA_SCHEMA, fence=fence)
        prefix = run_dir.split(f"{BUCKET}/", 1)[1] + "/generate/"
        got = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        assert [o["Key"] for o in got if not o["Key"].endswith("/")] == []
    # The other run's lease is left alone.
    body = client.get_object(Bucket=BUCKET, Key=_key(run_dir))["Body"].read()
    assert json.loads(body)["holder"] == "other"
