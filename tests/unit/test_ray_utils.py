"""`init_ray`'s contract with its callers: which cluster it joins and what reaches `ray.init`."""

from __future__ import annotations

from typing import Any

import pytest

from distray.config import config_from_dict
from distray.ray_utils import engine_gpus, init_ray


@pytest.fixture
def ray_init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_local_start_uses_the_configured_cpus_and_env(ray_init_calls: list[dict[str, Any]]) -> None:
    cfg = config_from_dict({"resources": {"num_cpus": 7, "env": {"DISTRAY_X": "1"}}})
    init_ray(cfg)
    (call,) = ray_init_calls
    assert call["address"] == "local" and call["num_cpus"] == 7
    assert call["runtime_env"]["env_vars"]["DISTRAY_X"] == "1"


def test_caller_arguments_win_and_never_collide(ray_init_calls: list[dict[str, Any]]) -> None:
    # benchmarks pass address= and num_cpus= themselves: no "got multiple values" TypeError.
    cfg = config_from_dict({"resources": {"num_cpus": 7, "ray_address": "10.0.0.1:6379"}})
    init_ray(cfg, address="local", num_cpus=3, include_dashboard=True)
    (call,) = ray_init_calls
    assert call["address"] == "local" and call["num_cpus"] == 3 and call["include_dashboard"] is True


def test_configured_address_then_env_var_is_joined(
    ray_init_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    init_ray(config_from_dict({"resources": {"ray_address": "10.0.0.1:6379"}}))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    init_ray(None)
    assert [c["address"] for c in ray_init_calls] == ["10.0.0.1:6379", "10.0.0.2:6379"]
    assert "num_cpus" not in ray_init_calls[0]  # a cluster's resources are its own


def test_engine_gpus_is_tensor_times_pipeline_parallel() -> None:
    assert engine_gpus({}) == 1
    assert engine_gpus({"tensor_parallel_size": 4, "pipeline_parallel_size": 2}) == 8
