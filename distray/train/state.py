"""What a training worker counts: `TrainState` (saved in every checkpoint) and the step window.

    .venv/bin/python -m pytest tests/unit/test_train_data.py -q -k state
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NOT_EVALUATED", "TrainState", "Window"]

#: `checkpoint_val_loss` of a checkpoint whose weights were not evaluated. Ray Train ranks every
#: checkpoint by it, and needs a number: None fails its sort, inf turns null in its snapshot.
NOT_EVALUATED = 1e30


@dataclass
class TrainState:
    """Progress saved in every checkpoint (DeepSpeed `client_state`, and `distray_state.json`).

    `rows_in_epoch` rows of each worker's list for `epoch` (`distray.train.order.worker_ids`)
    have been trained on, under the row list, seed and worker count that `order_digest` names.
    """

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    rows_in_epoch: int = 0
    order_digest: str | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    early_stopped: bool = False
    train_tokens: int = 0
    train_time_s: float = 0.0
    truncated: int = 0
    no_target: int = 0
    examples: int = 0
    last_val_loss: float | None = None
    last_train_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def record_eval(self, ev: dict[str, float], patience: int | None) -> bool:
        """Store one validation result (`ev["val_loss"]`, ...) at the current step.

        Args:
            ev: the validation losses.
            patience: `train.early_stopping_patience`; None or 0 never stops.

        Returns:
            True when early stopping should stop the run (`patience` evaluations in a row
            without improvement); `early_stopped` is then set.
        """
        self.last_val_loss = ev["val_loss"]
        self.history.append({"step": self.step, "val_step": self.step, **ev})
        if self.best_val_loss is None or ev["val_loss"] < self.best_val_loss - 1e-6:
            self.best_val_loss = ev["val_loss"]
            self.best_step = self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if patience and self.evals_without_improvement >= patience:
            self.early_stopped = True
            return True
        return False


@dataclass
class Window:
    """This worker's figures since the last step line (all-reduced when the line is logged)."""

    loss: float = 0.0
    sft: float = 0.0
    logit: float = 0.0
    micro: int = 0
    tokens: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
