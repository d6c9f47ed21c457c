"""Serve the distilled student (and optionally the teacher) behind an OpenAI-compatible HTTP API.

    distray serve --config run.yaml                       # foreground; Ctrl-C shuts down
    distray serve --config run.yaml serve.detached=true   # deploy and return (ray job submit)

Routes: `POST /v1/chat/completions` (plain and SSE streaming), `POST /v1/completions`,
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (with the API key, or when none is
configured: 200 when every model's engine answers; without the key: the ingress process's
liveness only, so an open probe costs the engines nothing).

Two backends (`serve.backend`) share one hardened front (`front.py`, `guards.py`):
`vllm` (`vllm_app.py`: Ray Serve LLM, one autoscaled vLLM deployment per model) and `hf`
(`hf_app.py`: transformers in a plain Serve deployment, for machines without vLLM).

Python: `deploy(cfg, models) -> [EndpointConfig]` and `shutdown()` for the pipeline (deploy, then
`bench.bench_endpoints`, then shut down); `run(cfg) -> ServeResult` for `distray serve`.

Safety (both backends): binds `serve.host` (127.0.0.1 by default; another address without
`serve.api_key_env` logs a warning); with `serve.api_key_env` set, every route but `/health`
needs `Authorization: Bearer <key>` (401 otherwise); `/health` answers its status only; a body
above `serve.max_request_bytes` gets 413, one not received within `serve.body_read_timeout_s`
408; more than 4 `stop` sequences get 400; `max_tokens` × `n` × prompts above
`serve.max_tokens_cap` and prompts above `serve.max_prompt_tokens` (in all, tools included) get
400; malformed requests (bad JSON, NaN, lone surrogates, a seed out of range, wrong types,
unknown model, unknown route) get a 4xx with an OpenAI-style `{"error": {...}}` body, never a
500, and are refused before a stream starts.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from distray.config import DistrayConfig, EndpointConfig
from distray.errors import ConfigError, StageError
from distray.serve.endpoints import api_key_digest, endpoint_url, resolve_models, served_endpoints
from distray.serve.guards import (
    Limits,
    RequestRejected,
    check_bearer,
    key_digest,
    openai_error,
    output_budget,
)

__all__ = [
    "APP_NAME",
    "Limits",
    "RequestRejected",
    "ServeResult",
    "check_bearer",
    "deploy",
    "endpoint_url",
    "is_loopback",
    "key_digest",
    "openai_error",
    "output_budget",
    "resolve_models",
    "run",
    "served_endpoints",
    "shutdown",
    "warn_if_open",
]

logger = logging.getLogger(__name__)

APP_NAME = "distray"


@dataclass
class ServeResult:
    """What `run` deployed: where it listens and which models it serves."""

    url: str
    base_url: str
    app_name: str
    backend: str
    models: dict[str, str]
    endpoints: list[EndpointConfig] = field(default_factory=list)
    startup_s: float = 0.0


@dataclass
class _Deployments:
    """What this process deployed, so `shutdown` removes only that.

    `started_serve`: this process started Serve's proxy, so it may stop it once no app is
    left (a Serve someone else started keeps running). `apps`: the apps `deploy` created.
    """

    started_serve: bool = False
    apps: set[str] = field(default_factory=set)


_deployed = _Deployments()


def _build(cfg: DistrayConfig, models: dict[str, str]) -> Any:
    """The Serve application of the configured backend."""
    s = cfg.serve
    limits = Limits(s.max_tokens_cap, s.max_prompt_tokens, s.max_request_bytes, s.body_read_timeout_s)
    digest = api_key_digest(cfg)
    if cfg.serve.backend == "hf":
        from distray.serve import hf_app

        return hf_app.build(cfg, models, limits, digest)
    from distray.serve import vllm_app

    return vllm_app.build(cfg, models, limits, digest)


def deploy(
    cfg: DistrayConfig,
    models: dict[str, str] | None = None,
    *,
    ready_timeout_s: float = 900.0,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
) -> list[EndpointConfig]:
    """Deploy the Serve app and wait until `/health` answers 200.

    Args:
        cfg: the run config (`serve` section, `resources` for Ray).
        models: model id → folder; default `resolve_models(cfg)`.
        ready_timeout_s: how long to wait for engines to load.
        app_name: Serve application name (several apps can share one Serve instance).
        route_prefix: where the app is mounted; endpoints become `<url><prefix>/v1`.

    Returns:
        One `EndpointConfig` per served model, ready for `bench.bench_endpoints`.

    Raises:
        ConfigError: missing model folder, missing API key, vLLM missing for backend vllm.
        StageError: the deployment failed or did not become healthy in time.
    """
    from ray import serve

    from distray.ray_utils import init_ray

    models = models or resolve_models(cfg)
    warn_if_open(cfg)
    # Ray first: building the LLM deployments reads the job's runtime_env (env vars such as
    # VLLM_CPU_KVCACHE_SPACE), and would otherwise auto-start a bare Ray without them.
    init_ray(cfg)
    if any("://" in m for m in models.values()):
        from distray.cluster import localize_model

        # vLLM and transformers load from a local folder: a student exported to s3:// is
        # copied to each node's local cache first.
        models = {name: localize_model(path) for name, path in models.items()}
    app = _build(cfg, models)
    try:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        _deployed.started_serve = True
    except Exception as e:
        raise StageError(
            f"could not start Serve's HTTP proxy on {cfg.serve.host}:{cfg.serve.port}: {e}; "
            "pick a free port with serve.port=..."
        ) from e
    _check_proxy_address(cfg)
    try:
        serve.run(
            app, name=app_name, route_prefix=route_prefix, blocking=False,
            logging_config={"enable_access_log": cfg.serve.access_log},
        )
        _deployed.apps.add(app_name)
    except Exception as e:
        raise StageError(
            f"Serve app `{app_name}` failed to deploy {sorted(models)}: {e}; check the model "
            "folders and serve.engine_kwargs (the replica logs are in /tmp/ray/session_latest/logs/serve)"
        ) from e
    key = os.environ.get(cfg.serve.api_key_env) if cfg.serve.api_key_env else None
    _wait_healthy(endpoint_url(cfg) + route_prefix.rstrip("/"), ready_timeout_s, key)
    return served_endpoints(cfg, models, route_prefix=route_prefix)


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_open(cfg: DistrayConfig) -> bool:
    """Log a warning when the server binds an address others can reach and needs no key.

    Returns:
        True when it warned.
    """
    s = cfg.serve
    if is_loopback(s.host) or s.api_key_env:
        return False
    logger.warning(
        "serve.host is %s and serve.api_key_env is not set: anyone who can reach this machine "
        "on port %d can use the models without a key; set serve.api_key_env (and export the "
        "key), or bind serve.host=127.0.0.1", s.host, s.port,
    )
    return True


def _check_proxy_address(cfg: DistrayConfig) -> None:
    """Fail when Serve already runs on this cluster with another host/port than the config's.

    `serve.start` silently keeps the running proxy's settings; the URL distray prints and bench
    measures would then be wrong.
    """
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None
        host, port = client.http_config.host, client.http_config.port
    except Exception:  # an internal API: when it moves, skip the check rather than fail
        return
    if (host, port) != (cfg.serve.host, cfg.serve.port):
        raise ConfigError(
            f"Serve already runs on this Ray cluster at {host}:{port}, not at `serve.host`:"
            f"`serve.port` ({cfg.serve.host}:{cfg.serve.port}); set serve.host={host} "
            f"serve.port={port}, or stop the running Serve first (`serve shutdown`)"
        )


def _wait_healthy(url: str, timeout_s: float, key: str | None = None) -> None:
    """Wait until `/health` answers 200. With the key, `/health` asks every engine; without
    one (or with no key configured) it answers for the ingress process alone."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/health", timeout=15, headers=headers)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(1.0)
    raise StageError(f"{url}/health did not answer 200 within {timeout_s:.0f} s (last: {last})")


def shutdown(app_name: str | None = None) -> None:
    """Delete distray's Serve app(s); stop Serve too when no other app is left on it.

    Args:
        app_name: the app to delete; None deletes every app `deploy` started in this process.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    names = [app_name] if app_name else sorted(_deployed.apps or {APP_NAME})
    try:
        for name in names:
            serve.delete(name, _blocking=True)
            _deployed.apps.discard(name)
        if _deployed.started_serve and not serve.status().applications:
            serve.shutdown()
            _deployed.started_serve = False
    except Exception as e:  # shutting down must not mask the error that led here
        logger.warning("Serve shutdown was not clean: %s", e)


def run(cfg: DistrayConfig) -> ServeResult:
    """Deploy the student (and the teacher with `serve.serve_teacher`) and serve until Ctrl-C.

    With `serve.detached`, return once healthy: the app keeps running on the Ray cluster
    (under `ray job submit`, after the job ends); `serve.delete("distray")` or
    `serve shutdown` stops it.

    Raises:
        ConfigError: see `deploy`.
        StageError: see `deploy`.
    """
    models = resolve_models(cfg)
    t0 = time.perf_counter()
    try:
        endpoints = deploy(cfg, models)
    except BaseException:  # Ctrl-C or a failure mid-deploy: don't leave half an app behind
        shutdown()
        raise
    url = endpoint_url(cfg)
    result = ServeResult(
        url=url,
        base_url=url + "/v1",
        app_name=APP_NAME,
        backend=cfg.serve.backend,
        models=models,
        endpoints=endpoints,
        startup_s=time.perf_counter() - t0,
    )
    auth = f" (API key from ${cfg.serve.api_key_env})" if cfg.serve.api_key_env else ""
    # The URL is this stage's product: print it where the user is looking, not only to the log.
    print(f"distray serve: {', '.join(models)} ready at {result.base_url}{auth}", flush=True)
    logger.info(
        "serve: %s on %s backend at %s in %.0f s", sorted(models), cfg.serve.backend,
        result.base_url, result.startup_s,
    )
    if cfg.serve.detached:
        if not (cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")):
            logger.warning(
                "serve.detached with a Ray started by this process: the app stops when the "
                "process exits; start a cluster (`ray start --head`) and set RAY_ADDRESS, or "
                "run in the foreground"
            )
        return result
    _serve_until_stopped()
    return result


def _serve_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM, then shut distray's apps down."""
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("distray serve: shutting down", flush=True)
        shutdown()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
