"""Connecting to Ray: a cluster when one is named, else an embedded local Ray.

Every stage calls `init_ray(cfg)` first. On a laptop it starts a local Ray with enough logical
CPUs for engines plus Serve; under `ray job submit` it joins the job's cluster (RAY_ADDRESS).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from distray.config import DistrayConfig

__all__ = ["default_env", "init_ray", "cluster_has_gpu", "cpu_placement", "engine_gpus", "worker_env"]

logger = logging.getLogger(__name__)


def default_env() -> dict[str, str]:
    """Environment every distray process should see, unless the user set it already.

    - TORCH_EXTENSIONS_DIR: DeepSpeed compiles an op with g++ on first use; a fixed cache folder
      makes that a one-time cost.
    - VLLM_CPU_KVCACHE_SPACE: vLLM's CPU backend otherwise reserves a large KV cache.
    """
    env = {
        "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/distray/torch_extensions"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    return {k: os.environ.get(k, v) for k, v in env.items()}


#: Driver env vars every worker gets as they are (hub settings and tokens, CPU binding, and
#: object-store settings: a run folder on s3:// or gs:// is written by every node, so the
#: endpoint and credentials the driver uses must reach the workers).
_PASSTHROUGH_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "VLLM_CPU_OMP_THREADS_BIND",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


def worker_env(cfg: DistrayConfig | None = None) -> dict[str, str]:
    """Env vars for Ray workers: defaults, pass-through from the driver, then `resources.env`.

    Secrets pass through from the driver's environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN and
    each teacher's `api_key_env`), so they need not be written into the config, whose
    resolved copy shows `resources.env` secrets as `<redacted>` (`config.dump_config`).
    """
    env = default_env()
    names = list(_PASSTHROUGH_ENV)
    if cfg is not None:
        keys = [getattr(t, "api_key_env", None) for t in cfg.all_teachers]  # HTTP teachers
        names += [k for k in keys if k]
    for k in names:
        if k in os.environ:
            env[k] = os.environ[k]
    if cfg is not None:
        env.update(cfg.resources.env)
    return env


def init_ray(cfg: DistrayConfig | None = None, *, address: str | None = None, **kwargs: Any) -> None:
    """Join the configured Ray cluster, or start a local one; a no-op when Ray is up.

    Args:
        cfg: the run config (resources.ray_address, resources.num_cpus, resources.env).
        address: the cluster to join; wins over `resources.ray_address` and RAY_ADDRESS.
            `"local"` starts a new embedded Ray even when one runs on this machine.
        **kwargs: extra `ray.init` arguments (`num_cpus` wins over `resources.num_cpus`).
    """
    import ray

    env = worker_env(cfg)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    if address is None:
        address = (cfg.resources.ray_address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address == "local":
        address = None
    runtime_env = {"env_vars": _not_set_by_job(env)}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **kwargs)
        logger.info("joined Ray cluster at %s", address)
        return
    num_cpus = kwargs.pop("num_cpus", None) or (cfg.resources.num_cpus if cfg else None) or max(
        4, os.cpu_count() or 1
    )
    # Logical CPUs above the physical count on purpose: Serve's proxy and controller and the
    # engine actors each hold a CPU slot while mostly idle.
    # address="local": a new embedded Ray, even when `ray start` left a cluster on this machine
    # (plain ray.init() would join that one instead, which is what ray_address is for).
    ray.init(**{
        "address": "local", "num_cpus": num_cpus, "include_dashboard": False,
        "runtime_env": runtime_env, **kwargs,
    })
    logger.info("started a local Ray (%d logical CPUs)", num_cpus)


def _not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """`env` less the variables the submitted job's runtime_env sets already.

    Under `ray job submit --runtime-env-json '{"env_vars": ...}'` Ray refuses a `ray.init`
    whose runtime_env names any of the same variables (even with the same value); the job's
    own value is what the user asked for, and it reaches every worker of the job anyway.
    """
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return env
    return {k: v for k, v in env.items() if k not in job_env}


def cluster_has_gpu() -> bool:
    """True when the Ray cluster (or, without Ray, this machine) has a GPU."""
    try:
        import ray

        if ray.is_initialized():
            return float(ray.cluster_resources().get("GPU", 0)) > 0
    except ImportError:
        pass
    import torch

    return bool(torch.cuda.is_available())


def cpu_placement() -> dict[str, Any]:
    """The placement group one CPU engine replica needs (ray.data.llm / ray.serve.llm on CPU)."""
    return {"bundles": [{"CPU": 1}]}


def engine_gpus(engine_kwargs: dict[str, Any]) -> int:
    """GPUs one vLLM engine uses: tensor_parallel_size × pipeline_parallel_size (vLLM's rule)."""
    return int(engine_kwargs.get("tensor_parallel_size", 1)) * int(
        engine_kwargs.get("pipeline_parallel_size", 1)
    )
