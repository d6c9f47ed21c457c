"""The openai teacher through `distray generate` on the local Ray: a key revoked mid-run stops
the run with no final rejects, and the key reaches the actor only as an environment variable.

    .venv/bin/python -m pytest tests/integration/test_api_teacher.py -q
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

KEY_ENV = "DISTRAY_TEST_API_TEACHER_KEY"
KEY = "sk-live-9c2e"


class KeyedServer:
    """/v1 on 127.0.0.1 that wants `Bearer KEY` (401 otherwise) and stops accepting it after
    `revoke_after` answers, as a provider does when a key is revoked."""

    def __init__(self, revoke_after: int | None) -> None:
        self.revoke_after = revoke_after
        self.lock = threading.Lock()
        self.answered: list[str] = []
        self.refused = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _allowed(self) -> bool:
                with server.lock:
                    revoked = server.revoke_after is not None and len(server.answered) >= server.revoke_after
                    ok = self.headers.get("Authorization") == f"Bearer {KEY}" and not revoked
                    server.refused += not ok
                return ok

            def do_GET(self) -> None:
                ok = self.headers.get("Authorization") == f"Bearer {KEY}"
                self._json(200 if ok else 401, {"object": "list", "data": [{"id": "m"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._allowed():
                    return self._json(401, {"error": {"message": "invalid api key"}})
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.answered.append(prompt)
                self._json(200, {
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {prompt}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 2, "completion_tokens": 3},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keyed() -> Iterator[Any]:
    servers: list[KeyedServer] = []

    def start(revoke_after: int | None) -> KeyedServer:
        servers.append(KeyedServer(revoke_after))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def rows_of(folder: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted(Path(folder).rglob("*.parquet")):
        out.extend(pq.read_table(f).to_pylist())
    for f in sorted(Path(folder).rglob("*.jsonl")):
        out.extend(json.loads(line) for line in f.read_text().splitlines() if line.strip())
    return out


def test_revoked_key_stops_the_run_and_a_rerun_finishes(ray_cluster, tmp_path, keyed, monkeypatch) -> None:
    from distray.config import config_from_dict
    from distray.errors import StageError
    from distray.paths import RunPaths
    from distray.teacher import run

    # Set after the session's Ray started: the actor can only see it through distray's env.
    monkeypatch.setenv(KEY_ENV, KEY)
    server = keyed(revoke_after=8)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(40)))
    cfg = config_from_dict({
        "run": {"name": "api", "output_dir": str(tmp_path / "runs")},
        "data": {"train": str(data)},
        "teacher": {"kind": "openai", "model": "m", "base_url": server.base_url,
                    "api_key_env": KEY_ENV, "max_in_flight": 4, "max_retries": 2,
                    "backoff_base_s": 0.01, "backoff_max_s": 0.02},
        "generate": {"splits": ["train"], "rows_per_shard": 4, "filters": {"verifier": "none"}},
    })
    with pytest.raises(StageError, match=rf"HTTP 401.*\${KEY_ENV}"):
        run(cfg)
    paths = RunPaths(cfg.run_dir)
    assert rows_of(paths.generate_rejects) == []  # no row was rejected for the revoked key
    first = rows_of(paths.generate_data)
    # Stopped within a few requests. Rows answered before the stop are written when their
    # batch reached the sink first, which depends on scheduling (none on a busy machine):
    # what is written was answered, and the rerun sends the rest.
    assert len(first) <= 8 and server.refused <= 4 + 4
    assert {r["prompt"] for r in first} <= set(server.answered[:8])
    server.revoke_after = None  # a new key
    res = run(cfg)
    answered = rows_of(paths.generate_data)
    assert sorted(r["input_id"] for r in answered) == sorted(f"q{i}" for i in range(40))
    assert res.accepted == 40 - len(first) and rows_of(paths.generate_rejects) == []
