"""What a training run writes for people beside its outputs: the DeepSpeed config it derived,
and how an exported student was made.

    python -c "import json; print(json.load(open('runs/quickstart/train/student/distray_export.json')))"

- `<train>/deepspeed.json`: the DeepSpeed config `train.plan.build_deepspeed_config` derived
  from `train.*` (batch sizes, ZeRO stage, precision, optimizer, scheduler), as every worker
  received it; rewritten by each run of the folder.
- `<train>/student/distray_export.json`, written into the folder before its export marker, so it
  travels with the student wherever it is copied:

      {"base_model": "/models/phi-4-mini", "answers": "teacher",
       "teachers": [{"label": "deepseek-v3", "kind": "openai", "model": "deepseek-chat"}],
       "train": {"mode": "off_policy", "loss": "kd", "alpha": 0.5, ...}, "steps": 1200,
       "data": {"train": ".../generate/data/train", "digest": "sha256:…"},
       "command": ["distray", "run", "config.yaml"], ...}
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from distray.config import DistrayConfig
from distray.storage import write_text
from distray.train.plan import WorkerPlan

__all__ = ["DEEPSPEED_CONFIG", "EXPORT_RECORD", "data_digest", "export_record", "write_deepspeed_config"]

logger = logging.getLogger(__name__)

#: The derived DeepSpeed config, in the train folder.
DEEPSPEED_CONFIG = "deepspeed.json"
#: How the student was made, in the exported student folder.
EXPORT_RECORD = "distray_export.json"


def write_deepspeed_config(plan: WorkerPlan) -> str:
    """Write `plan.ds_config` as `<out_dir>/deepspeed.json`; returns the path."""
    path = f"{plan.out_dir.rstrip('/')}/{DEEPSPEED_CONFIG}"
    write_text(path, json.dumps(plan.ds_config, indent=2, sort_keys=True, default=str) + "\n")
    return path


def data_digest(data: Any) -> str | None:
    """A content digest of training data given as a path (`distray.digest.tree_digest`: every
    shard's content, cached by size and mtime); None for an in-memory Ray Dataset."""
    if not isinstance(data, str):
        return None
    from distray.digest import tree_digest

    try:
        return tree_digest(data)
    except (OSError, ValueError) as e:  # a record for people: never a reason to fail the export
        logger.warning("no digest of %s for %s: %s", data, EXPORT_RECORD, e)
        return None


def export_record(
    cfg: DistrayConfig, plan: WorkerPlan, *, data: Any, validation_data: Any, answers: str,
    metrics: dict[str, Any], checkpoint: str,
) -> dict[str, Any]:
    """The `distray_export.json` of a student (see the module docstring).

    Args:
        cfg: the run config (`train`, the teachers).
        plan: the worker plan (base model, tokenizer, DeepSpeed config).
        data, validation_data: what `train_model` trained and validated on (paths or datasets).
        answers: `teacher` or `reference`.
        metrics: the last figures the workers reported (`step`, `epoch`, losses).
        checkpoint: the checkpoint exported.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        distray_version = version("distray")
    except PackageNotFoundError:
        distray_version = None
    tc = cfg.train
    teachers = [
        {"label": t.label, "kind": t.kind, "model": t.model} for t in cfg.all_teachers
    ] if answers == "teacher" else []
    return {
        "base_model": plan.model,
        "tokenizer": plan.tokenizer,
        "lora": cfg.student.lora.model_dump(mode="json") if cfg.student and cfg.student.lora else None,
        "answers": answers,
        "teachers": teachers,
        "train": {
            "mode": tc.mode, "loss": tc.loss, "alpha": tc.alpha, "temperature": tc.temperature,
            "lr": tc.lr, "max_seq_len": tc.max_seq_len, "num_workers": tc.num_workers,
            "zero_stage": tc.zero_stage, "precision": tc.precision,
            "train_batch_size": plan.ds_config.get("train_batch_size"),
        },
        "steps": int(metrics.get("step", 0)),
        "epochs": int(metrics.get("epoch", 0)),
        "train_loss": metrics.get("train_loss"),
        "val_loss": metrics.get("val_loss"),
        "checkpoint": checkpoint,
        "data": {
            "train": data if isinstance(data, str) else None,
            "validation": validation_data if isinstance(validation_data, str) else None,
            "digest": data_digest(data),
            "validation_digest": data_digest(validation_data),
        },
        "seed": cfg.run.seed,
        "command": list(sys.argv),
        "distray_version": distray_version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
