"""distray serve for real: Ray Serve LLM + vLLM (CPU) on a tiny model, hit with the openai client.

    .venv/bin/python -m pytest tests/integration/test_serve.py -x -q

One deployment (`served`, session-scoped, shared with test_bench.py) on 127.0.0.1 and a free
port, with an API key, an output cap of 64 tokens and a prompt cap of 200 tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY_ENV = "DISTRAY_TEST_SERVE_KEY"
KEY = "test-key-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny student behind distray's vLLM backend: {cfg, endpoint, url, headers}.

    Module-scoped (test_bench.py imports it too): Serve's replicas hold logical CPUs, and a
    deployment left up for the session would starve later tests (Ray Train waits for CPUs).
    """
    from distray import serve
    from distray.config import config_from_dict

    os.environ[KEY_ENV] = KEY
    cfg = config_from_dict({
        "run": {"output_dir": str(tmp_path_factory.mktemp("serve-run")), "name": "t"},
        "resources": {"num_cpus": 4},
        "serve": {
            "model": tiny_model, "port": free_port(), "api_key_env": KEY_ENV,
            "max_tokens_cap": 64, "max_prompt_tokens": 200,
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
    assert served["url"].startswith("http://127.0.0.1:")
    assert KEY not in json.dumps(served["endpoint"].model_dump())


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

    comp = client.completions.create(model="student", prompt="Once upon", max_tokens=6)
    assert isinstance(comp.choices[0].text, str) and comp.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="student", prompt="Once upon", max_tokens=6, stream=True) if c.choices)
    assert isinstance(streamed, str)


def test_health_is_open_and_checks_the_engine(served) -> None:
    r = httpx.get(served["url"] + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["models"] == ["student"]


def test_api_key_is_required(served) -> None:
    from openai import AuthenticationError, OpenAI

    url = served["endpoint"].base_url
    assert httpx.get(url + "/models", timeout=30).status_code == 401
    r = httpx.post(url + "/chat/completions", headers={"Authorization": "Bearer wrong"},
                   content=b"{not json", timeout=30)
    assert r.status_code == 401  # the key is checked before the body is parsed
    assert r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


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
]


@pytest.mark.parametrize("what,route,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_malformed_requests_get_openai_style_4xx(served, what, route, body, status) -> None:
    r = httpx.post(f"{served['endpoint'].base_url}/{route}", content=body,
                   headers={**served["headers"], "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and isinstance(err["message"], str)


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
        if len(full.strip()) >= 6:
            stop = full.strip()[3:6]
            cut = c.completions.create(**ask, stop=[stop]).choices[0]
            parts = list(c.completions.create(**ask, stop=[stop], stream=True))
            assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
            assert "".join(p.choices[0].text for p in parts) == cut.text
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
