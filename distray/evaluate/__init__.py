"""Evaluation: predictions of teacher / student / baseline on the test set, scorers, efficiency.

    distray evaluate --config jobs/configs/quickstart.yaml
"""

from __future__ import annotations

from typing import Any

__all__ = ["run", "EvaluateResult", "score", "score_all", "SCORERS"]

from distray.evaluate.scorers import SCORERS, score, score_all


def __getattr__(name: str) -> Any:
    # The runner pulls in Ray; import it only when asked for.
    if name in ("run", "EvaluateResult"):
        from distray.evaluate import runner

        return getattr(runner, name)
    raise AttributeError(name)
