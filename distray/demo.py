"""Stand-ins for the quickstart: a small teacher distray trains itself, the student's initial
weights, and the baseline student trained on a few ground-truth labels.

    distray run jobs/configs/quickstart.yaml     # calls prepare_demo when demo.train_teacher is on

The teacher made here is a STAND-IN for a large model (DeepSeek-V3, GPT-4o, ...): a few-million
parameter Llama trained on a built-in task's ground truth, so the whole pipeline runs on a
laptop. It is cached at `teacher.model` and reused by later runs.

All training goes through the real train stage (`distray.train.trainer.train_model`, Ray Train
+ DeepSpeed), in SFT on the ground-truth references instead of teacher answers.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from distray.config import DistrayConfig
from distray.errors import ConfigError

__all__ = ["prepare_demo", "train_on_labels", "baseline_dir"]

logger = logging.getLogger(__name__)


def baseline_dir(cfg: DistrayConfig) -> str:
    """Where the baseline student (trained on `demo.baseline_labels` labels) is exported."""
    return f"{cfg.run_dir}/baseline/student"


def train_on_labels(
    cfg: DistrayConfig,
    rows: list[dict[str, Any]],
    init_model: str,
    work_dir: str,
    *,
    train_overrides: dict[str, Any],
) -> str:
    """SFT `init_model` on ground-truth `rows` with the real train stage; return the export.

    Args:
        cfg: the run config (train settings are the base; `train_overrides` replace fields).
        rows: labelled input rows (`prompt`/`messages` with a `reference`).
        init_model: the model folder to start from.
        work_dir: gets labels.jsonl, checkpoints/, student/ (rerunning resumes).
        train_overrides: TrainConfig fields to change (steps, lr, ...).

    Returns:
        The exported HF folder.
    """
    from distray.storage import write_jsonl
    from distray.train.trainer import train_model

    student = f"{work_dir}/student"
    if Path(student, "model.safetensors").exists():
        return student
    data = cfg.model_dump(mode="json")
    data["train"] = {**data["train"], "loss": "sft", **train_overrides}
    side = DistrayConfig.model_validate(data)
    labels = f"{work_dir}/labels.jsonl"
    write_jsonl(labels, rows)
    train_model(side, labels, work_dir, answers="reference", model=init_model)
    return student


def prepare_demo(cfg: DistrayConfig, *, baseline: bool = True) -> None:
    """Build what the quickstart needs and does not have yet: the stand-in teacher, the student's
    initial weights and (with `baseline`) the baseline student. Each is skipped when it exists.

    Raises:
        ConfigError: the demo is on without a built-in task or a local vLLM/HF teacher.
    """
    demo = cfg.demo
    if not demo.train_teacher:
        return
    if cfg.data.builtin is None:
        raise ConfigError("`demo.train_teacher` needs `data.builtin` (the task it learns)")
    teacher = cfg.teacher
    from distray.engines import engine_for

    if teacher is None or not engine_for(teacher).local:
        raise ConfigError("`demo.train_teacher` needs a local `teacher` (kind vllm or hf)")
    if cfg.student is None:
        raise ConfigError("`demo.train_teacher` needs `student.model` (a folder it creates)")
    from distray.tasks import task_rows
    from distray.tiny import make_tiny

    b = cfg.data.builtin
    teacher_dir = Path(teacher.model)
    if not (teacher_dir / "model.safetensors").exists():
        logger.info(
            "demo: training the stand-in teacher (%d layers, hidden %d) on %d ground-truth rows of "
            "`%s` — a stand-in for a large model, cached at %s",
            demo.teacher_layers, demo.teacher_hidden, demo.teacher_train_rows, b.name, teacher_dir,
        )
        work = teacher_dir.parent / f"{teacher_dir.name}.work"
        init = make_tiny(
            work / "init", layers=demo.teacher_layers, hidden=demo.teacher_hidden,
            heads=demo.teacher_heads, max_position=128, seed=cfg.run.seed + 1,
        )
        # Same seed and split order as the run's data: test and validation prompts are the
        # run's own, drawn first and excluded from the teacher's training rows.
        rows = task_rows(
            b.name,
            {"test": b.n_test, "validation": b.n_validation, "train": demo.teacher_train_rows},
            seed=b.seed,
        )["train"]
        exported = train_on_labels(
            cfg, rows, init, str(work),
            train_overrides={
                "max_steps": demo.teacher_steps, "lr": demo.teacher_lr, "epochs": 100,
                "checkpoint_every_steps": None, "eval_every_steps": None,
                "early_stopping_patience": None,
            },
        )
        # Copy, then rename: a half-copied folder never looks like a cached teacher.
        tmp = teacher_dir.parent / f"{teacher_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(exported, tmp)
        shutil.rmtree(teacher_dir, ignore_errors=True)
        tmp.rename(teacher_dir)
    student_dir = Path(cfg.student.model)
    if not (student_dir / "model.safetensors").exists():
        make_tiny(
            student_dir, layers=demo.student_layers, hidden=demo.student_hidden,
            heads=demo.student_heads, max_position=128, seed=cfg.run.seed + 2,
            tokenizer_dir=str(teacher_dir),
        )
    if baseline and "baseline" in cfg.evaluate.models and cfg.evaluate.baseline in (None, baseline_dir(cfg)):
        rows = task_rows(
            b.name, {"test": b.n_test, "validation": b.n_validation, "train": b.n_train}, seed=b.seed
        )["train"][: demo.baseline_labels]
        logger.info("demo: training the baseline student on %d ground-truth labels", len(rows))
        train_on_labels(
            cfg, rows, str(student_dir), baseline_dir(cfg).removesuffix("/student"),
            train_overrides={"epochs": demo.baseline_epochs, "max_steps": None},
        )

