"""distray serve for real: Ray Serve LLM + vLLM (CPU) on a tiny model, hit with the openai client.

    .venv/bin/python -m pytest tests/integration/test_serve.py -x -q

One deployment (`served`, for this module) on 127.0.0.1 and a free port, with an API key, an
output cap of 64 tokens and a prompt cap of 200 tokens; `distray bench` is tested against it at
the end of this file, so the model is deployed once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from typing import Any

import httpx
import pytest

from distray import bench
from distray.config import EndpointConfig
from distray.errors import StageError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY_ENV = "DISTRAY_TEST_SERVE_KEY"
KEY = "test-key-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(_ray_session, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny student behind distray's vLLM backend: {cfg, endpoint, url, headers}.

    Module-scoped: Serve's replicas hold logical CPUs, and a deployment left up for the
    session would starve later tests (Ray Train waits for CPUs).
    The session's local Ray is started here (`ray_cluster` is per test).
    """
    from conftest import start_local_ray

    from distray import serve
    from distray.config import config_from_dict

    start_local_ray()

    os.environ[KEY_ENV] = KEY
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path_factory.mktemp("serve-run")), "name": "t"},
        # The key also sits in resources.env, as a user might put it: the record must hide it.
        "resources": {"num_cpus": 4, "env": {KEY_ENV: KEY}},
        "serve": {
            "model": tiny_model, "port": free_port(), "api_key_env": KEY_ENV,
            "max_tokens_cap": 64, "max_prompt_tokens": 200, "max_request_bytes": 65536,
            "engine_kwargs": {"max_model_len": 512},
        },
    })
    (ep,) = serve.deploy(cfg, ready_timeout_s=600)
    yield {"cfg": cfg, "endpoint": ep, "url": serve.endpoint_url(cfg),
           "headers": {"Authorization": f"Bearer {KEY}"}}
    serve.shutdown()


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["endpoint"].base_url, api_key=KEY, max_retries=0, timeout=60)


def test_binds_loopback_and_prints_nothing_secret(served) -> None:
    """The key is in no file a user or an operator reads: the run record and the Ray logs
    (driver, Serve controller, proxy, replicas), after requests that carried it."""
    import ray

    from distray.prepare import write_record

    assert served["url"].startswith("http://127.0.0.1:")
    assert httpx.get(served["endpoint"].base_url + "/models", headers=served["headers"],
                     timeout=30).status_code == 200
    httpx.get(served["endpoint"].base_url + "/models", timeout=30,
              headers={"Authorization": f"Bearer {KEY}-wrong"})
    record = write_record(served["cfg"])
    with open(record) as f:
        text = f.read()
    assert KEY_ENV in text and KEY not in text
    logs = ray._private.worker._global_node.get_logs_dir_path()
    leaked = []
    for root, _, files in os.walk(logs):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if KEY.encode() in f.read():
                        leaked.append(path)
            except OSError:
                pass
    assert os.listdir(logs) and not leaked


def test_openai_client_models_chat_and_completions(client) -> None:
    assert [m.id for m in client.models.list().data] == ["student"]

    chat = client.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        temperature=0,
    )
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage is not None and 1 <= chat.usage.completion_tokens <= 8

    chunks = list(client.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        stream=True, stream_options={"include_usage": True},
    ))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content, "a streamed chat answer has content chunks"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    ask = {"model": "student", "prompt": "Once upon", "max_tokens": 6, "temperature": 0}
    comp = client.completions.create(**ask)
    assert comp.choices[0].text and comp.usage.completion_tokens >= 1
    # Greedy: the stream adds up to the plain answer.
    streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == comp.choices[0].text


def test_health_is_open_and_checks_the_engine(served) -> None:
    r = httpx.get(served["url"] + "/health", timeout=30)
    # Status only: the open route names no model and no error.
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.get(served["url"] + "/health", headers=served["headers"], timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_health_asks_the_engines_only_for_a_caller_with_the_key() -> None:
    """The ingress's `/health` handler: without the key, liveness only (no RPC to any engine,
    whatever the rate of open probes); with it, every engine is asked."""
    from types import SimpleNamespace

    from distray.serve.front import AUTHENTICATED
    from distray.serve.vllm_app import ingress_cls

    calls: list[str] = []

    class Handle:
        def __init__(self, name: str, ok: bool) -> None:
            self.check_health = SimpleNamespace(remote=lambda: self._check(name, ok))

        async def _check(self, name: str, ok: bool) -> None:
            calls.append(name)
            if not ok:
                raise RuntimeError("engine down")

    fake = SimpleNamespace(_default_serve_handles={"a": Handle("a", True), "b": Handle("b", False)})
    health = ingress_cls().health

    def ask(authenticated: bool) -> Any:
        return asyncio.run(health(fake, SimpleNamespace(scope={AUTHENTICATED: authenticated})))

    for _ in range(50):
        assert ask(False).status_code == 200
    assert calls == []
    r = ask(True)
    assert sorted(calls) == ["a", "b"] and r.status_code == 503


def _node_metrics_url() -> str:
    import ray

    node = ray._private.worker.global_worker.node
    return f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"


def _counter(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name + "{") and all(w in ln for w in want))


def _scrape_when(url: str, done: Any, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=30).text
        if done(text):
            return text
        time.sleep(2)
    raise AssertionError(f"the metrics export did not catch up in {timeout_s:.0f} s")


def _series(text: str) -> set[str]:
    return {ln.rsplit(" ", 1)[0] for ln in text.splitlines() if ln and ln[0] != "#"}


def _request_series_bytes(text: str) -> int:
    """Bytes of the series a request can add: distray's and Ray Serve's request metrics."""
    return sum(len(ln) + 1 for ln in text.splitlines() if ln.startswith(("ray_distray_serve_", "ray_serve_")))


def test_3000_unknown_paths_without_a_key_leave_the_metrics_size_flat(served) -> None:
    """Every path a client invents is counted under `route="other"`: after 3,000 of them the
    node's metrics export names none, its request series (distray's and Ray Serve's) are the
    same within 5 % of their bytes, and the whole export has not grown by a line per path."""
    from distray.serve.front import ROUTE_LABELS

    metrics_url = _node_metrics_url()
    name = "ray_distray_serve_requests_total"

    def probe(paths: range) -> None:
        async def go() -> list[int]:
            sem = asyncio.Semaphore(32)
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as c:
                async def one(i: int) -> int:
                    async with sem:
                        return (await c.get(f"{served['url']}/probe-{i}")).status_code
                return await asyncio.gather(*(one(i) for i in paths))
        assert set(asyncio.run(go())) == {401}

    def settled(at_least: float) -> str:
        # Ray exports each process's metrics on its own period: wait until the count is in
        # and two scrapes 3 s apart list the same series, so late series of earlier tests
        # are not taken for growth.
        last = _scrape_when(metrics_url, lambda t: _counter(t, name, route="other", status="401") >= at_least)
        for _ in range(20):
            time.sleep(3)
            text = httpx.get(metrics_url, timeout=30).text
            if _series(text) == _series(last):
                return text
            last = text
        return last

    base = _counter(httpx.get(metrics_url, timeout=30).text, name, route="other", status="401")
    probe(range(20))  # the `other` series exist from here on
    before = settled(base + 20)
    t0 = time.perf_counter()
    probe(range(20, 3020))
    sent_s = time.perf_counter() - t0
    after = settled(base + 3020)
    routes = {ln.split('route="', 1)[1].split('"', 1)[0] for ln in after.splitlines()
              if ln.startswith("ray_distray_serve_") and 'route="' in ln}
    ours0, ours1 = _request_series_bytes(before), _request_series_bytes(after)
    new = sorted(_series(after) - _series(before))
    print(f"\n3,000 unknown paths in {sent_s:.1f} s; metrics export {len(before)} -> {len(after)} bytes, "
          f"{len(before.splitlines())} -> {len(after.splitlines())} lines; request series {ours0} -> "
          f"{ours1} bytes; routes {sorted(routes)}")
    assert routes <= set(ROUTE_LABELS) and "other" in routes
    assert "probe-" not in after
    assert abs(ours1 - ours0) <= 0.05 * ours0, new[:10]
    assert len(after.splitlines()) - len(before.splitlines()) < 300, new[:10]

BAD_REQUESTS = [
    ("bad json", "chat/completions", b'{"model": "student", "messages": [', 400),
    ("not an object", "chat/completions", b"[]", 400),
    ("unknown model", "chat/completions",
     json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404),
    ("messages not a list", "chat/completions",
     json.dumps({"model": "student", "messages": "hi"}).encode(), 400),
    ("max_tokens a string", "completions",
     json.dumps({"model": "student", "prompt": "hi", "max_tokens": "five"}).encode(), 400),
    ("max_tokens over the cap", "completions",
     json.dumps({"model": "student", "prompt": "hi", "max_tokens": 100000}).encode(), 400),
    ("n times max_tokens over the cap", "chat/completions",
     json.dumps({"model": "student", "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 40, "n": 2}).encode(), 400),
    ("prompt over the cap", "completions",
     json.dumps({"model": "student", "prompt": "ab " * 300, "max_tokens": 4}).encode(), 400),
    ("empty messages", "chat/completions",
     json.dumps({"model": "student", "messages": [], "max_tokens": 4}).encode(), 400),
    ("token id out of vocabulary", "completions",
     json.dumps({"model": "student", "prompt": [10**9], "max_tokens": 4}).encode(), 400),
    ("a batch of prompts over the output cap", "completions",
     json.dumps({"model": "student", "prompt": ["hi"] * 8, "max_tokens": 16}).encode(), 400),
    ("a batch of prompts over the prompt cap in all", "completions",
     json.dumps({"model": "student", "prompt": ["ab " * 60] * 4, "max_tokens": 2}).encode(), 400),
    ("tools over the prompt cap", "chat/completions",
     json.dumps({"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                 "tools": [{"type": "function", "function": {"name": "f", "description": "ab " * 300}}]}).encode(),
     400),
    ("seed above 2^64", "completions",
     json.dumps({"model": "student", "prompt": "hi", "max_tokens": 4, "seed": 2**64}).encode(), 400),
    ("a lone surrogate", "chat/completions",
     b'{"model": "student", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}', 400),
    ("a lone surrogate, streamed", "completions",
     b'{"model": "student", "prompt": "\\ud800", "max_tokens": 4, "stream": true}', 400),
    ("seed above 2^64, streamed", "chat/completions",
     json.dumps({"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                 "seed": 2**64, "stream": True}).encode(), 400),
    ("NaN temperature", "completions",
     b'{"model": "student", "prompt": "hi", "max_tokens": 4, "temperature": NaN}', 400),
    ("five stop sequences", "chat/completions",
     json.dumps({"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                 "stop": ["a", "b", "c", "d", "e"]}).encode(), 400),
    ("five stop sequences, streamed", "completions",
     json.dumps({"model": "student", "prompt": "hi", "max_tokens": 4, "stream": True,
                 "stop": ["a", "b", "c", "d", "e"]}).encode(), 400),
    ("a body over serve.max_request_bytes", "completions",
     json.dumps({"model": "student", "prompt": "x" * 70_000, "max_tokens": 4}).encode(), 413),
]


@pytest.mark.parametrize("what,route,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_malformed_requests_get_openai_style_4xx(served, what, route, body, status) -> None:
    r = httpx.post(f"{served['endpoint'].base_url}/{route}", content=body,
                   headers={**served["headers"], "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and isinstance(err["message"], str)


EXTREME = [("temperature 1e-40", {"temperature": 1e-40}), ("top_p 1e-300", {"top_p": 1e-300})]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("what,extra", EXTREME, ids=[e[0] for e in EXTREME])
def test_extreme_valid_sampling_answers_in_full(served, what, extra, stream) -> None:
    """Valid OpenAI values at the edge of float range: an answer, never a 5xx or a cut stream."""
    body = {"model": "student", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": stream, **extra}
    r = httpx.post(served["endpoint"].base_url + "/chat/completions", json=body,
                   headers=served["headers"], timeout=120)
    assert r.status_code == 200, r.text
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_wrong_content_type_route_and_method_are_4xx(served) -> None:
    base, h = served["endpoint"].base_url, served["headers"]
    r = httpx.post(base + "/completions", content=b"hello",
                   headers={**h, "Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()  # Ray's own ingress answers 500 here
    assert httpx.get(base + "/completions", headers=h, timeout=30).status_code == 405
    r = httpx.get(base + "/nothing-here", headers=h, timeout=30)
    assert r.status_code == 404 and "error" in r.json()


def test_200_requests_at_concurrency_32_no_5xx_and_still_answers(served, client) -> None:
    url = served["endpoint"].base_url + "/chat/completions"
    sem = asyncio.Semaphore(32)

    async def one(i: int, c: httpx.AsyncClient) -> int:
        body = {"model": "student", "messages": [{"role": "user", "content": f"request {i}"}],
                "max_tokens": 4, "stream": i % 2 == 0}
        async with sem:
            r = await c.post(url, json=body, headers=served["headers"])
            return r.status_code

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=32)) as c:
            return await asyncio.gather(*(one(i, c) for i in range(200)))

    codes = asyncio.run(load())
    assert not [c for c in codes if c >= 500]
    assert codes.count(200) == 200
    assert httpx.get(served["url"] + "/health", timeout=30).status_code == 200
    after = client.chat.completions.create(
        model="student", messages=[{"role": "user", "content": "still there?"}], max_tokens=4)
    assert after.choices[0].finish_reason in ("length", "stop")


def test_hf_backend_serves_the_same_routes(served, tiny_model) -> None:
    """The transformers fallback, mounted beside the vLLM app on the same Serve instance."""
    from openai import OpenAI

    from distray import serve

    cfg = served["cfg"].model_copy(deep=True)
    cfg.serve.backend = "hf"
    # A cap above the tiny model's 512-token context: a request without max_tokens must
    # still be answered, with what fits.
    cfg.serve.max_tokens_cap = 1024
    (ep,) = serve.deploy(cfg, app_name="distray-hf", route_prefix="/hf", ready_timeout_s=300)
    try:
        assert ep.base_url.endswith("/hf/v1")
        c = OpenAI(base_url=ep.base_url, api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["student"]
        out = c.chat.completions.create(model="student", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=5, temperature=0)
        assert out.usage.completion_tokens <= 5
        chunks = list(c.completions.create(model="student", prompt="hi", max_tokens=5, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
        # Greedy: the stream adds up to the plain answer, and a stop string is cut out of both.
        ask = {"model": "student", "prompt": "the answer", "max_tokens": 24, "temperature": 0}
        full = c.completions.create(**ask).choices[0].text
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(**ask, stream=True))
        assert streamed == full
        # A stop string from the middle of the real answer: its first occurrence leaves text
        # before it, so the cut answer is neither empty nor the whole.
        at = next((i for i in range(2, len(full) - 3) if full.index(full[i:i + 3]) == i
                   and full[i:i + 3].strip()), None)
        assert at is not None, f"the greedy answer is too short or repetitive: {full!r}"
        stop = full[at:at + 3]
        cut = c.completions.create(**ask, stop=[stop]).choices[0]
        parts = list(c.completions.create(**ask, stop=[stop], stream=True))
        assert cut.text == full[:at] and cut.text and cut.finish_reason == "stop"
        assert "".join(p.choices[0].text for p in parts) == cut.text
        # No max_tokens on a 512-token model with a 1024 cap: answered within the context.
        r = httpx.post(ep.base_url + "/chat/completions", headers=served["headers"], timeout=300,
                       json={"model": "student", "messages": [{"role": "user", "content": "hi"}],
                             "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] <= 512
        for extra in ({"temperature": 1e-40}, {"top_p": 1e-300}, {"seed": 2**64 - 1}):
            r = httpx.post(ep.base_url + "/completions", headers=served["headers"], timeout=120,
                           json={"model": "student", "prompt": "hi", "max_tokens": 3, "stream": True, **extra})
            if "seed" in extra:
                assert r.status_code == 400
            else:
                assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
                assert '"error"' not in r.text
        assert httpx.get(ep.base_url.removesuffix("/v1") + "/health", timeout=30).json() == {"status": "ok"}
        r = httpx.post(ep.base_url + "/chat/completions", content=b"{bad", timeout=30,
                       headers={**served["headers"], "Content-Type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        assert httpx.get(ep.base_url + "/models", timeout=30).status_code == 401
        assert httpx.get(ep.base_url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
    finally:
        serve.shutdown("distray-hf")


def test_foreground_run_prints_the_url_and_ctrl_c_shuts_down(tiny_model, tmp_path) -> None:
    """`distray serve` in the foreground (hf backend, its own Ray): URL printed, SIGINT exits 0."""
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    cfg = {"run": {"output_dir": str(tmp_path)}, "resources": {"num_cpus": 2},
           "serve": {"model": tiny_model, "port": port, "backend": "hf"}}
    code = (
        "import json, sys\n"
        "from distray.config import config_from_dict\n"
        "from distray import serve\n"
        "serve.run(config_from_dict(json.loads(sys.argv[1])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 300
        line = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline and "ready at" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert f"ready at http://127.0.0.1:{port}/v1" in line
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert "shutting down" in rest
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- distray bench against the served model, and the metric math vs vLLM's ------------------


def test_bench_20_requests_every_metric_positive_no_errors(served, tmp_path) -> None:
    prompts = bench.generated_prompts(20, seed=1)
    r = bench.bench_endpoints([served["endpoint"]], prompts, concurrency=[4], max_tokens=8,
                              timeout_s=120, out_dir=str(tmp_path), rounds=1)
    (p,) = r.points
    assert p.completed == 20 and p.errors == 0, p.error_samples
    assert p.total_output_tokens == 20 * 8  # ignore_eos: exactly max_tokens each
    for stat in ("mean", "median", "p90", "p99"):
        for m in bench.METRICS:
            assert getattr(p, f"{stat}_{m}_ms") > 0, f"{stat}_{m}_ms"
    assert p.request_throughput > 0 and p.output_throughput > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["points"][0]["median_ttft_ms"] == pytest.approx(p.median_ttft_ms)
    assert len(saved["points"][0]["ttfts_ms"]) == 20
    for png in ("latency_vs_throughput.png", "ttft_distribution.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert "| student | c=4 |" in (tmp_path / "summary.md").read_text()


def test_bench_stage_writes_the_run_outputs(served) -> None:
    from distray.paths import RunPaths

    cfg = served["cfg"].model_copy(deep=True)
    cfg.bench.endpoints = [served["endpoint"]]
    cfg.bench.num_prompts = 8
    cfg.bench.max_tokens = 4
    cfg.bench.concurrency = [2]
    cfg.bench.request_rates = [20.0]
    r = bench.run(cfg)
    paths = RunPaths(cfg.run_dir)
    assert r.results_json == paths.bench_results and os.path.exists(paths.bench_results)
    assert r.summary_md == paths.bench_summary
    summary = open(paths.bench_summary).read()
    assert "| student | c=2 |" in summary and "| student | r=20/s |" in summary
    assert "3 rounds per load level" in summary  # bench.rounds' default: medians with min–max
    assert [p.rounds for p in r.points] == [3, 3] and [p.num_requests for p in r.points] == [24, 24]
    assert "](latency_vs_throughput.png)" in summary  # relative to bench/ (report.md rebases them)
    assert [p.errors for p in r.points] == [0, 0]


def test_warm_up_fails_fast_and_says_what_to_check(served) -> None:
    ep = served["endpoint"]
    msgs = [{"role": "user", "content": "hi"}]
    t0 = time.perf_counter()
    with pytest.raises(StageError, match="cannot connect.*distray serve"):
        bench.warm_up(ep.model_copy(update={"base_url": "http://127.0.0.1:9/v1"}), msgs,
                      timeout_s=60, ignore_eos=True)
    assert time.perf_counter() - t0 < 15
    with pytest.raises(StageError, match=r"404.*serves \['student'\]"):
        bench.warm_up(ep.model_copy(update={"model": "nope"}), msgs, timeout_s=60, ignore_eos=True)
    with pytest.raises(StageError, match="401.*api_key_env"):
        bench.warm_up(ep.model_copy(update={"api_key_env": None}), msgs, timeout_s=60,
                      ignore_eos=True)


def test_compute_metrics_matches_vllm_calculate_metrics() -> None:
    """distray's metric math against vLLM's own, on the same synthetic outcomes."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    rng = random.Random(0)
    outs = []
    for i in range(40):
        n = rng.randint(1, 12)
        itl = [rng.uniform(0.001, 0.05) for _ in range(n - 1)]
        ttft = rng.uniform(0.01, 0.3)
        outs.append(RequestFuncOutput(
            success=i % 9 != 0, latency=ttft + sum(itl), ttft=ttft, itl=itl,
            output_tokens=n if i % 7 else 0, prompt_len=rng.randint(3, 50), start_time=i * 0.01,
        ))
    theirs, _ = calculate_metrics(input_requests=[], outputs=outs, dur_s=3.0, tokenizer=None,
                                  selected_percentiles=[90.0, 99.0], goodput_config_dict={})
    ours = bench.compute_metrics(outs, 3.0)
    assert ours["completed"] == theirs.completed and ours["errors"] == theirs.failed
    assert ours["total_output_tokens"] == theirs.total_output
    assert ours["total_input_tokens"] == theirs.total_input
    for k in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert ours[k] == pytest.approx(getattr(theirs, k))
    for m in bench.METRICS:
        assert ours[f"mean_{m}_ms"] == pytest.approx(getattr(theirs, f"mean_{m}_ms"))
        assert ours[f"median_{m}_ms"] == pytest.approx(getattr(theirs, f"median_{m}_ms"))
        pct = dict(getattr(theirs, f"percentiles_{m}_ms"))
        assert ours[f"p90_{m}_ms"] == pytest.approx(pct[90.0])
        assert ours[f"p99_{m}_ms"] == pytest.approx(pct[99.0])


def test_unreachable_endpoint_in_config_is_a_stage_error(tmp_path) -> None:
    from distray.config import config_from_dict

    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path)},
        "bench": {"endpoints": [EndpointConfig(name="x", base_url="http://127.0.0.1:9/v1",
                                               model="m").model_dump()],
                  "num_prompts": 2},
    })
    with pytest.raises(StageError, match="cannot connect"):
        bench.run(cfg)


def test_prometheus_metrics_count_requests_and_show_the_engine(served, client) -> None:
    """After a few requests (one refused), Ray's metrics export (what Prometheus scrapes) has
    distray's request counts by status and reason, and vLLM's engine metrics."""
    import ray

    client.completions.create(model="student", prompt="hi", max_tokens=2)
    bad = httpx.post(served["url"] + "/v1/completions", json={"model": "student", "prompt": "hi"},
                     headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert bad.status_code == 401
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    deadline = time.monotonic() + 120
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        if 'reason="invalid_api_key"' in text and "ray_vllm" in text:
            break
        time.sleep(5)
    ok = [ln for ln in text.splitlines() if ln.startswith("ray_distray_serve_requests_total") and 'status="200"' in ln]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1, text[-3000:]
    assert any(ln.startswith("ray_distray_serve_rejected_total") and 'reason="invalid_api_key"' in ln
               for ln in text.splitlines())
    assert "ray_distray_serve_ttft_seconds_bucket" in text
    assert "ray_vllm" in text  # the engine's own metrics, next to ours
