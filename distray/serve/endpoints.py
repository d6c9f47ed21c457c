"""What `distray serve` deploys and where clients reach it, read from the config (no Ray).

    models = resolve_models(cfg)            # {"student": "runs/x/train/student", ...}
    endpoints = served_endpoints(cfg)       # what `bench` measures by default
"""

from __future__ import annotations

import os

from distray.config import DistrayConfig, EndpointConfig, HFTeacher, VLLMTeacher
from distray.errors import ConfigError
from distray.paths import RunPaths, is_hub_id
from distray.serve.guards import key_digest

__all__ = ["api_key_digest", "endpoint_url", "resolve_models", "served_endpoints", "trusts_remote_code"]


def endpoint_url(cfg: DistrayConfig) -> str:
    """The server's root URL as a client reaches it (0.0.0.0 and :: map to 127.0.0.1)."""
    host = cfg.serve.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.serve.port}"


def resolve_models(cfg: DistrayConfig) -> dict[str, str]:
    """Model id → folder for what `serve` deploys: the student, and the teacher if asked.

    Raises:
        ConfigError: the student folder is missing, or `serve.serve_teacher` names a teacher
            that is not a local model.
    """
    student = cfg.serve.model or RunPaths(cfg.run_dir).student
    if "://" not in student and not os.path.isfile(os.path.join(student, "config.json")):
        where = "`serve.model`" if cfg.serve.model else "the exported student (default)"
        raise ConfigError(
            f"{where} `{student}` is not a model folder (no config.json); run `distray train` "
            "first, or set serve.model to a Hugging Face folder"
        )
    models = {cfg.serve.model_name: student}
    if cfg.serve.serve_teacher:
        teachers = cfg.all_teachers
        if not teachers:
            raise ConfigError("`serve.serve_teacher` is true but no `teacher` is configured")
        t = teachers[0]
        if not isinstance(t, (VLLMTeacher, HFTeacher)):
            raise ConfigError(
                f"`serve.serve_teacher` needs a local teacher (kind vllm or hf), got kind "
                f"`{t.kind}`; benchmark the API teacher by listing it in bench.endpoints instead"
            )
        if "teacher" == cfg.serve.model_name:
            raise ConfigError("`serve.model_name` is `teacher`, which the teacher uses; rename it")
        local = "://" not in t.model and not is_hub_id(t.model)
        if local and not os.path.isfile(os.path.join(t.model, "config.json")):
            raise ConfigError(
                f"`teacher.model` `{t.model}` is not a model folder (no config.json), and "
                "`serve.serve_teacher` deploys it; fix the path (with the demo teacher: run "
                "`distray generate` or `distray run` first, which build it), or set "
                "serve.serve_teacher=false"
            )
        models["teacher"] = t.model
    return models


def served_endpoints(
    cfg: DistrayConfig, models: dict[str, str] | None = None, *, route_prefix: str = "/"
) -> list[EndpointConfig]:
    """The endpoints `serve` deploys for this config (what `bench` measures by default)."""
    names = list(models) if models is not None else [cfg.serve.model_name] + (
        ["teacher"] if cfg.serve.serve_teacher else []
    )
    base = endpoint_url(cfg) + route_prefix.rstrip("/") + "/v1"
    return [
        EndpointConfig(name=n, base_url=base, model=n, api_key_env=cfg.serve.api_key_env)
        for n in names
    ]


def api_key_digest(cfg: DistrayConfig) -> str | None:
    """The digest of the key in `$serve.api_key_env`; None when no key is configured.

    Raises:
        ConfigError: `serve.api_key_env` is set but the variable is empty.
    """
    env = cfg.serve.api_key_env
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise ConfigError(
            f"`serve.api_key_env` is `{env}` but ${env} is empty; export {env}=<key> or unset "
            "serve.api_key_env to serve without a key"
        )
    return key_digest(key)


def trusts_remote_code(cfg: DistrayConfig, name: str) -> bool:
    """Whether the served model `name` may run code from its folder: the teacher's or the
    student's `trust_remote_code` (off by default)."""
    if name == "teacher" and cfg.all_teachers:
        return bool(getattr(cfg.all_teachers[0], "trust_remote_code", False))
    return bool(cfg.student and cfg.student.trust_remote_code)
