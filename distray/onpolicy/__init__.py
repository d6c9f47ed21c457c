"""On-policy distillation on Ray: the student generates, the teacher scores, the student learns.

    distray train --config jobs/configs/quickstart.yaml train.mode=on_policy

Public API:
- `run(cfg) -> TrainResult`: every round of `train.on_policy` (rounds.py), the final student in
  `<run>/train/student`, per-round figures in `<run>/onpolicy/metrics.json` and `rounds.png`.

Modules: layout (folders, schemas), selection (prompts per round), rollouts (student engines
through generate's path), scoring (teacher prompt logprobs over the student's tokens), mixing
(λ on-policy + 1 − λ off-policy rows), metrics (reverse KL, teacher NLL, time per phase).
Importing this package is cheap; Ray and the engines load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run"]


def run(cfg: Any) -> Any:
    """Run (or resume) the on-policy rounds of `cfg` (see `distray.onpolicy.rounds.run`)."""
    from distray.onpolicy.rounds import run as run_rounds

    return run_rounds(cfg)
