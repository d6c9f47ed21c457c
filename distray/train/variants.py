"""The train stage: the variant `train.mode` names, each a `run(cfg) -> TrainResult`.

    distray train --config jobs/configs/quickstart.yaml [train.mode=on_policy]

- `off_policy`: `distray.train.trainer` (SFT and logit KD on the teacher data from generate);
- `on_policy`: `distray.onpolicy` (rounds of student rollouts the teacher scores, each trained
  with `train.trainer.train_model`).

The choice is made here, above both, so the import graph stays one-way: on-policy uses the
trainer, and the trainer knows nothing of on-policy (`tests/unit/test_import_graph.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distray.config import DistrayConfig
    from distray.train.trainer import TrainResult

__all__ = ["run"]


def run(cfg: DistrayConfig) -> TrainResult:
    """Run the train variant `cfg.train.mode` names (see the module docstring)."""
    if cfg.train.mode == "on_policy":
        from distray.onpolicy import run as on_policy

        result: TrainResult = on_policy(cfg)
        return result
    from distray.train.trainer import run as off_policy

    return off_policy(cfg)
