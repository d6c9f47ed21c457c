"""Stand-ins for the quickstart: a small teacher distray trains itself, the student's initial
weights, and the baseline student trained on a few ground-truth labels.

    distray run jobs/configs/quickstart.yaml     # calls prepare_demo when demo.train_teacher is on

The teacher made here is a STAND-IN for a large model (DeepSeek-V3, GPT-4o, ...): a few-million
parameter Llama trained on a built-in task's ground truth, so the whole pipeline runs on a
laptop. It is cached at `teacher.model` and reused by later runs.

All training goes through the real train stage (`distray.train.trainer.run`, Ray Train +
DeepSpeed): the labels are written as teacher data (response = the ground-truth reference,
teacher = "ground-truth") into a side run folder, and the stage trains on them unchanged.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from distray.config import DistrayConfig, VLLMTeacher
from distray.errors import ConfigError
from distray.paths import RunPaths

__all__ = ["prepare_demo", "write_label_data", "train_on_labels", "baseline_dir"]

logger = logging.getLogger(__name__)

GROUND_TRUTH = "ground-truth"


def baseline_dir(cfg: DistrayConfig) -> str:
    """Where the baseline student (trained on `demo.baseline_labels` labels) is exported."""
    return f"{cfg.run_dir}/baseline/train/student"


def write_label_data(cfg: DistrayConfig, rows: list[dict[str, Any]], run_dir: str) -> int:
    """Write ground-truth rows as teacher data (one Parquet shard) into `run_dir`'s generate/data.

    Args:
        cfg: the run config (task prompts are applied as in generate).
        rows: input rows with `prompt`/`messages` and a `reference`.
        run_dir: the side run folder.

    Returns:
        Rows written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distray import formats as F
    from distray.tasks import task_prompts

    system, template = task_prompts(cfg.task)
    out = []
    for raw in rows:
        row, rej = F.normalize_row(raw, system_prompt=system, prompt_template=template)
        if row is None or not row[F.REFERENCE]:
            raise ConfigError(f"label row {raw!r} is unusable: {rej.reason if rej else 'no reference'}")
        out.append(
            {
                F.ID: F.content_hash(row[F.ID], GROUND_TRUTH),
                F.INPUT_ID: row[F.ID],
                F.MESSAGES: row[F.MESSAGES],
                F.PROMPT: row[F.PROMPT],
                F.REFERENCE: row[F.REFERENCE],
                F.RESPONSE: row[F.REFERENCE],
                F.FINISH_REASON: "stop",
                F.TEACHER: GROUND_TRUTH,
                F.SAMPLE_INDEX: 0,
            }
        )
    table = pa.Table.from_pylist(out, schema=F.TEACHER_DATA_SCHEMA)
    data_dir = Path(RunPaths(run_dir).generate_data) / "train"
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / "labels-00000.parquet")
    return len(out)


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
        rows: labelled input rows.
        init_model: the model folder to start from.
        work_dir: side run folder (generate/data, train/checkpoints, train/student).
        train_overrides: TrainConfig fields to change (steps, lr, loss, ...).

    Returns:
        The exported HF folder.
    """
    from distray.train.trainer import run as train_run

    paths = RunPaths(work_dir)
    if Path(paths.student, "model.safetensors").exists():
        return paths.student
    data = cfg.model_dump(mode="json")
    data["run"] = {**data["run"], "name": Path(work_dir).name, "output_dir": str(Path(work_dir).parent)}
    data["student"] = {"model": init_model}
    data["teacher"] = None
    data["teachers"] = []
    data["generate"] = {**data["generate"], "logprobs": None}
    data["data"] = {**data["data"], "validation": None}
    data["train"] = {**data["train"], "loss": "sft", **train_overrides}
    side = DistrayConfig.model_validate(data)
    if not any(Path(paths.generate_data).rglob("*.parquet")):
        write_label_data(side, rows, work_dir)
    train_run(side)
    return paths.student


def prepare_demo(cfg: DistrayConfig) -> None:
    """Build what the quickstart needs and does not have yet: the stand-in teacher, the student's
    initial weights and the baseline student. Each is skipped when it exists already.

    Raises:
        ConfigError: the demo is on without a built-in task or a local vLLM/HF teacher.
    """
    demo = cfg.demo
    if not demo.train_teacher:
        return
    if cfg.data.builtin is None:
        raise ConfigError("`demo.train_teacher` needs `data.builtin` (the task it learns)")
    teacher = cfg.teacher
    if teacher is None or teacher.kind == "openai":
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
            cfg, rows, init, str(work / "run"),
            train_overrides={
                "max_steps": demo.teacher_steps, "lr": demo.teacher_lr, "epochs": 100,
                "checkpoint_every_steps": None, "eval_every_steps": None,
                "early_stopping_patience": None,
            },
        )
        teacher_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(exported, teacher_dir, dirs_exist_ok=True)
    student_dir = Path(cfg.student.model)
    if not (student_dir / "model.safetensors").exists():
        make_tiny(
            student_dir, layers=demo.student_layers, hidden=demo.student_hidden,
            heads=demo.student_heads, max_position=128, seed=cfg.run.seed + 2,
            tokenizer_dir=str(teacher_dir),
        )
    if "baseline" in cfg.evaluate.models and cfg.evaluate.baseline in (None, baseline_dir(cfg)):
        rows = task_rows(
            b.name, {"test": b.n_test, "validation": b.n_validation, "train": b.n_train}, seed=b.seed
        )["train"][: demo.baseline_labels]
        logger.info("demo: training the baseline student on %d ground-truth labels", len(rows))
        train_on_labels(
            cfg, rows, str(student_dir), f"{cfg.run_dir}/baseline",
            train_overrides={"epochs": demo.baseline_epochs, "max_steps": None},
        )


def teacher_is_local(cfg: DistrayConfig) -> bool:
    """True when the (single) teacher is a local vLLM model folder."""
    return isinstance(cfg.teacher, VLLMTeacher) and Path(cfg.teacher.model).is_dir()
