"""Every shipped config in jobs/configs/ loads, validates and round-trips.

    pytest tests/unit/test_configs_shipped.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from distray.config import config_from_dict, dump_config, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
# <teacher>_to_<student>_<method>.yaml, e.g. deepseek-v3_to_phi-4-mini_kd.yaml
NAME = re.compile(r"^(?P<teacher>[a-z0-9.\-]+)_to_(?P<student>[a-z0-9.\-]+)_(?P<method>[a-z_]+)\.yaml$")


def test_quickstart_is_shipped() -> None:
    if not CONFIGS:
        pytest.skip("jobs/configs/ has no configs yet")
    assert CONFIG_DIR / "quickstart.yaml" in CONFIGS  # `make quickstart` runs it


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    # What `distray config show` prints loads back to the same config.
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert cfg.all_teachers, f"{path.name} names no teacher"
    assert cfg.student is not None, f"{path.name} names no student"
    if path.name == "quickstart.yaml":
        return
    match = NAME.match(path.name)
    assert match, f"{path.name} does not follow <teacher>_to_<student>_<method>.yaml"
    # `_kd` covers sequence-level KD (a plain sft loss on teacher text); `_sft` never has a
    # logit loss, which would need the teacher's logprobs.
    if match["method"] == "sft":
        assert cfg.train.loss == "sft", f"{path.name} says sft but train.loss is {cfg.train.loss}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_takes_overrides(path: Path) -> None:
    cfg = load_config(path, ["train.lr=3e-5", "run.name=override-check"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.run.name == "override-check"
