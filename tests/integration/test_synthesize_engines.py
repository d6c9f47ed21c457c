"""`distray data synthesize` through the real generation path (Ray Data × the openai engine) on a
local OpenAI-compatible stand-in whose answers are scripted, so dedupe and every filter fire.

    .venv/bin/python -m pytest tests/integration/test_synthesize_engines.py -q -p no:xdist
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

SEEDS = [
    "Give three tips for staying healthy.",
    "Translate the sentence into French.\n\nThe cat sleeps on the mat.",
    "Is the following number prime? 91",
    "Write a haiku about autumn leaves.",
    "List the planets of the solar system in order from the sun.",
]

#: What the stand-in writes, in turn: request order varies with concurrency, so which copy of
#: the river task comes first (and is kept) does too.
ANSWERS = [
    "Task 4: Name two rivers in Asia and say which one is longer.",
    "Task 4: Give three tips for staying healthy.",  # a seed again
    "Task 4: Name two rivers in Asia and say which is longer.",  # near the first
    "Task 4: ok",
    "Task 4: Explain why the sky looks blue at noon.\nTask 5: Spell cat.",
    "Task 4: Plot the monthly rainfall of Paris as a bar chart.",
    "Task 4: Describe how a bicycle gear changes the effort of pedaling.",
    "Task 4: Convert 5 miles into kilometers and show the steps.",
    "Task 4: Suggest a name for a bakery that sells only bread.",
    "Task 4: Write a short apology email for a late delivery.",
]


class Scripted:
    """/v1/chat/completions on 127.0.0.1 answering from ANSWERS; counts requests."""

    def __init__(self) -> None:
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._json({"object": "list", "data": [{"id": "m"}]})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    pick = server.requests % len(ANSWERS)
                    server.requests += 1
                self._json({
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": ANSWERS[pick]}}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 12},
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
def scripted() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.close()


def test_synthesize_dedupes_filters_and_reruns_idempotently(ray_cluster, tmp_path: Path, scripted: Scripted) -> None:
    from distray.config import config_from_dict
    from distray.inputs import check_input
    from distray.synthesize import run

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(
        json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": t}]}) + "\n"
        for i, t in enumerate(SEEDS)
    ))
    cfg = config_from_dict({
        "run": {"name": "synth", "output_dir": str(tmp_path / "runs")},
        "teacher": {"kind": "openai", "model": "m", "base_url": scripted.base_url, "api_key_env": None,
                    "max_in_flight": 4},
    })
    out, rejects = tmp_path / "new.jsonl", tmp_path / "new.rejects.jsonl"

    res = run(cfg, str(seeds), str(out), 6)

    kept = [json.loads(x) for x in out.read_text().splitlines()]
    refused = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert res.kept == len(kept) == 6  # the six distinct good tasks, each once
    texts = {r["messages"][0]["content"] for r in kept}
    rivers = {t for t in texts if t.startswith("Name two rivers")}
    assert len(rivers) == 1 and texts - rivers == {
        "Explain why the sky looks blue at noon.",
        "Describe how a bicycle gear changes the effort of pedaling.",
        "Convert 5 miles into kilometers and show the steps.",
        "Suggest a name for a bakery that sells only bread.",
        "Write a short apology email for a late delivery.",
    }
    # The copies, the junk and the plot were refused, each for its reason.
    assert {"exact_duplicate", "near_duplicate", "too_short", "needs_media"} <= set(res.reasons)
    assert len(kept) + len(refused) == res.requests <= scripted.requests
    check = check_input(str(out))
    assert (check.valid, check.rejected) == (6, 0)

    sent, before = scripted.requests, (out.read_bytes(), rejects.read_bytes())
    again = run(cfg, str(seeds), str(out), 6)
    assert again.new_requests == 0 and scripted.requests == sent
    assert (out.read_bytes(), rejects.read_bytes()) == before


def test_synthesize_on_the_tiny_hf_teacher_repeats_itself(ray_cluster, tmp_path: Path, tiny_teacher_model: str) -> None:
    """A random tiny model writes no usable task: every request is refused with a reason, and a
    rerun from scratch writes the same files (the hf engine samples under the seed)."""
    from distray.config import config_from_dict
    from distray.synthesize import run

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "prompt": t}) + "\n" for i, t in enumerate(SEEDS[:3])))
    cfg = config_from_dict({
        "run": {"name": "synth", "output_dir": str(tmp_path / "runs")},
        "teacher": {"kind": "hf", "model": tiny_teacher_model},
    })
    out, rejects = tmp_path / "new.jsonl", tmp_path / "new.rejects.jsonl"
    kwargs: dict[str, Any] = {"examples_per_prompt": 2, "max_tokens": 24, "max_requests": 4, "temperature": 1.0}

    res = run(cfg, str(seeds), str(out), 2, **kwargs)

    kept = out.read_text().splitlines()
    refused = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert res.requests == len(kept) + len(refused) == 4  # each request in one file, once
    known = {"truncated", "empty", "too_short", "too_long", "needs_media", "exact_duplicate",
             "near_duplicate", "prompt_too_long", "meta_task", "missing_input"}
    assert set(res.reasons) <= known and sum(res.reasons.values()) == len(refused)
    before = (out.read_bytes(), rejects.read_bytes())
    assert run(cfg, str(seeds), str(out), 2, **kwargs).new_requests == 0  # max_requests spent
    out.unlink()
    rejects.unlink()
    again = run(cfg, str(seeds), str(out), 2, **kwargs)
    assert again.new_requests == 4 and (out.read_bytes(), rejects.read_bytes()) == before
