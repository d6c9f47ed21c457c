"""Shared fixtures: tiny local models and one local Ray cluster per test session.

    make test            # everything
    pytest tests/unit    # no Ray, fast
"""

from __future__ import annotations

import os

import pytest

# Set before anything imports vllm / deepspeed / ray.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/distray/torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One Ray auth mode for the whole session. Ray 2.60 turns token auth on for a new local
# `ray.init()` when the mode is unset, and caches the mode per process: a test that flips the
# variable later leaves its clients and a fresh GCS disagreeing ("InvalidAuthToken"). The
# suite's clusters bind 127.0.0.1 only; run with RAY_AUTH_MODE=token to test with tokens.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


#: Per-test limits (pytest-timeout), so one hung engine fails its test instead of hanging CI.
#: A test sets its own with @pytest.mark.timeout(N); these are the defaults per folder.
TIMEOUT_S = {"unit": 60, "integration": 900, "gpu": 600}


#: The slowest files, slowest first (minutes each, mostly engine and worker start-up). `make
#: test` runs the suite on two pytest-xdist workers, a file per worker at a time (`--dist
#: loadfile`, files in this order): the long files start first, the short ones fill the gaps.
SLOW_FILES = (
    "test_cluster.py", "test_pipeline.py", "test_train.py", "test_onpolicy_rounds.py",
    "test_rerun_matrix.py", "test_benchmarks.py", "test_generate.py", "test_real_model.py",
    "test_serve.py", "test_serve_hostile.py", "test_evaluate.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
    for item in items:
        folder = item.path.parent.name
        if folder in TIMEOUT_S and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIMEOUT_S[folder]))
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, hidden-128 Llama with a byte-level tokenizer (≈0.47M params)."""
    from distray.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-student"), layers=2, hidden=128, heads=4, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> str:
    """A bigger Llama (4 layers, hidden 256) sharing `tiny_model`'s tokenizer and vocabulary."""
    from distray.tiny import make_tiny

    return make_tiny(
        tmp_path_factory.mktemp("tiny-teacher"),
        layers=4,
        hidden=256,
        heads=8,
        seed=1,
        tokenizer_dir=tiny_model,
    )


def start_local_ray():
    """The suite's local Ray (4 logical CPUs: engines plus Serve fit), unless one is up."""
    import ray

    from distray.ray_utils import init_ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        from distray.config import DistrayConfig

        init_ray(DistrayConfig.model_validate({"resources": {"num_cpus": 4}}))
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the local Ray down at the end of the session."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session):
    """One local Ray shared by the session's tests.

    Started on first use, and again after a module that needs the cores for a cluster of its
    own (the `ray job submit` pipeline test, the multi-node tests) shut it down with
    `release_local_ray`: one Ray per test process at a time (`make test` runs two
    pytest-xdist workers, so at most two Rays share the machine).
    """
    yield start_local_ray()


def release_local_ray() -> None:
    """Shut the shared local Ray down (its Serve apps included) so another cluster gets the cores."""
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - best effort: Serve may not be running
            pass
        ray.shutdown()
