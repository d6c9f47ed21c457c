"""Stage 2: fine-tune the student on teacher data with Ray Train × DeepSpeed ZeRO.

    distray train --config jobs/configs/quickstart.yaml train.loss=kd train.zero_stage=3

`run(cfg)` trains on the teacher data of the run (`<run>/generate/data/train/*.parquet`, and
`<run>/generate/data/validation/` as validation when generate labelled one) and writes `<run>/train/`:
`checkpoints/` (Ray Train), `student/` (the exported Hugging Face folder), `metrics.jsonl` and
`loss.png`.

`train_model(cfg, data, out_dir, answers="reference")` is the same machinery without a teacher:
plain SFT on the ground-truth `reference` answers of an input JSONL/Parquet file (the format of
`distray.formats`), or on a Ray Dataset. The quickstart uses it to train its stand-in teacher and
the few-label baseline student.

Rerunning with the same output folder resumes from the latest checkpoint (Ray Train restores
its checkpoint list from storage), after a driver kill as after a worker crash.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from distray.config import DistrayConfig, TrainConfig
from distray.errors import ConfigError, DataError, StageError
from distray.formats import (
    ID,
    INPUT_ID,
    INPUT_SUFFIXES,
    MESSAGE_TYPE,
    MESSAGES,
    RESPONSE,
    RESPONSE_TOKEN_IDS,
    TOPK_LOGPROBS,
    TOPK_TOKEN_IDS,
    filesystem_for,
    list_files,
    normalize_row,
    parse_jsonl_line,
)
from distray.paths import RunPaths
from distray.train.data import TRAIN_COLUMNS, holdout_flags

__all__ = [
    "TrainResult",
    "run",
    "train_model",
    "build_deepspeed_config",
    "plan_steps",
    "check_vocab",
    "teacher_splits",
    "plot_loss",
]

logger = logging.getLogger(__name__)

Answers = Literal["teacher", "reference"]


@dataclass
class TrainResult:
    """What a training run produced, and its figures.

    `epochs` counts completed passes over the data; `tokens_per_s` is non-padding tokens over
    all workers per second of training (start-up, evaluation and checkpoints excluded);
    `resumed_from_step` is the step the last (re)start continued from, 0 for a fresh run.
    `checkpoint_dir` is the checkpoint exported to `student_dir`: the latest, or the one at the
    best validation loss when early stopping ended the run (`val_loss` is then the last
    evaluation's, `best_val_loss` the exported weights').
    """

    student_dir: str
    checkpoint_dir: str | None
    metrics_path: str
    loss_plot: str | None
    steps: int
    epochs: int
    train_rows: int
    validation_rows: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    tokens_per_s: float
    train_time_s: float
    elapsed_s: float
    truncated: int
    no_target: int
    resumed_from_step: int
    num_workers: int
    zero_stage: int
    use_gpu: bool
    loss: str

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-able values."""
        return asdict(self)


# ------------------------------------------------------------------------------------------
# DeepSpeed config and step plan (pure functions)
# ------------------------------------------------------------------------------------------

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _user_int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    return None if v is None or v == "auto" else int(v)


def build_deepspeed_config(tc: TrainConfig, world_size: int, *, use_gpu: bool) -> dict[str, Any]:
    """distray's DeepSpeed config with `train.deepspeed` merged over it (DeepSpeed's names).

    The three batch fields are made consistent with the world size:
    `train_batch_size = train_micro_batch_size_per_gpu × world_size × gradient_accumulation_steps`.
    Values the user set in `train.deepspeed` win (`"auto"` counts as unset); the missing ones are
    derived, from `train.global_batch_size` when set.

    Raises:
        ConfigError: the batch fields contradict each other or the world size.
    """
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if tc.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if tc.zero_stage >= 2:
        zero["overlap_comm"] = use_gpu
    base: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16"},
        # distray prints its own step line.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if tc.grad_clip is not None:
        base["gradient_clipping"] = tc.grad_clip
    if tc.offload_optimizer:
        # Optimizer offload needs DeepSpeed's CPU Adam, which only DeepSpeed can build.
        base["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": tc.lr, "weight_decay": tc.weight_decay, "betas": [0.9, 0.95]},
        }
    user = dict(tc.deepspeed)
    merged = _deep_merge(base, {k: v for k, v in user.items() if k not in _BATCH_KEYS})

    micro = _user_int(user, "train_micro_batch_size_per_gpu") or tc.micro_batch_size
    accum = _user_int(user, "gradient_accumulation_steps")
    total = _user_int(user, "train_batch_size")
    per_step = micro * world_size
    if total is None and accum is None and tc.global_batch_size is not None:
        total = tc.global_batch_size
    if total is not None and accum is not None and total != per_step * accum:
        raise ConfigError(
            f"`train.deepspeed.train_batch_size` ({total}) must equal micro ({micro}) × workers "
            f"({world_size}) × gradient_accumulation_steps ({accum}) = {per_step * accum}; "
            "set only one of them"
        )
    if accum is None:
        total = total or per_step
        if total % per_step:
            raise ConfigError(
                f"global batch ({total}) must be divisible by micro_batch_size × num_workers "
                f"({micro} × {world_size} = {per_step}); adjust train.global_batch_size"
            )
        accum = total // per_step
    merged["train_micro_batch_size_per_gpu"] = micro
    merged["gradient_accumulation_steps"] = accum
    merged["train_batch_size"] = per_step * accum
    return merged


def plan_steps(
    n_rows: int, world_size: int, micro: int, accum: int, epochs: int, max_steps: int | None
) -> tuple[int, int, int, int]:
    """Optimizer steps the run will take.

    Shards are equal (`n_rows // world_size` rows each); the micro-batches of an epoch that do
    not fill a whole accumulation group are skipped. `max_steps` overrides `epochs` (as in
    transformers): the data is repeated as often as needed.

    Returns:
        `(total_steps, steps_per_epoch, micro_batches_per_epoch, epochs)`.

    Raises:
        DataError: too few rows for one optimizer step.
    """
    rows_per_worker = n_rows // world_size
    micro_batches = math.ceil(rows_per_worker / micro)
    steps_per_epoch = micro_batches // accum
    if steps_per_epoch < 1:
        raise DataError(
            f"{n_rows} training rows give {rows_per_worker} per worker ({world_size} workers), "
            f"fewer than one optimizer step needs (micro_batch_size {micro} × accumulation "
            f"{accum}); add data or lower train.global_batch_size / num_workers"
        )
    if max_steps is not None:
        return max_steps, steps_per_epoch, micro_batches, math.ceil(max_steps / steps_per_epoch)
    return steps_per_epoch * epochs, steps_per_epoch, micro_batches, epochs


# ------------------------------------------------------------------------------------------
# vocabulary agreement
# ------------------------------------------------------------------------------------------


def _sample_rows(path: str, n: int = 32) -> list[dict[str, Any]]:
    """The first `n` rows of the first Parquet file under `path` (nothing more is read)."""
    import pyarrow.parquet as pq

    files = list_files(path, (".parquet",))
    if not files:
        return []
    fs, _ = filesystem_for(path)
    with fs.open_input_file(files[0]) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in (RESPONSE, RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS, "teacher") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=n, columns=cols):
            return batch.to_pylist()
    return []


def check_vocab(
    student_tokenizer: Any,
    student_vocab_size: int,
    rows: list[dict[str, Any]],
    teacher_tokenizers: dict[str, Any] | None = None,
    *,
    student_name: str = "student",
) -> str | None:
    """Check that teacher token ids mean the same tokens for the student.

    Three checks, cheapest first: each local teacher tokenizer maps every token to the same id
    as the student's; every teacher token id is inside the student's embedding table; the
    student tokenizer decodes the teacher's `response_token_ids` back to the teacher's text.

    Args:
        student_tokenizer: the student's tokenizer.
        student_vocab_size: rows of the student's embedding table (`config.vocab_size`).
        rows: a sample of teacher-data rows (response, response_token_ids, topk_token_ids).
        teacher_tokenizers: {teacher folder: tokenizer} for teachers available locally.
        student_name: for messages.

    Returns:
        None when the vocabularies agree, else a message naming both sizes and a mismatch.
    """
    s_vocab = student_tokenizer.get_vocab()
    for name, ttok in (teacher_tokenizers or {}).items():
        t_vocab = ttok.get_vocab()
        if t_vocab == s_vocab:
            continue
        for tok, tid in sorted(t_vocab.items(), key=lambda kv: kv[1]):
            if s_vocab.get(tok) != tid:
                where = s_vocab.get(tok)
                return (
                    f"teacher `{name}` has a {len(t_vocab)}-token vocabulary and student "
                    f"`{student_name}` {len(s_vocab)}: token {tok!r} is id {tid} for the teacher "
                    f"but {'absent' if where is None else f'id {where}'} for the student"
                )
        return (
            f"student `{student_name}` vocabulary ({len(s_vocab)} tokens) has tokens the teacher "
            f"`{name}` ({len(t_vocab)} tokens) lacks"
        )
    max_id = -1
    for r in rows:
        for t in r.get(RESPONSE_TOKEN_IDS) or []:
            max_id = max(max_id, int(t))
        for pos in r.get(TOPK_TOKEN_IDS) or []:
            for t in pos or []:
                max_id = max(max_id, int(t))
    if max_id >= student_vocab_size:
        return (
            f"teacher data holds token id {max_id}, outside student `{student_name}`'s "
            f"vocabulary of {student_vocab_size} ids (student tokenizer: {len(s_vocab)} tokens)"
        )
    checked = bad = 0
    example = ""
    for r in rows:
        ids, text = r.get(RESPONSE_TOKEN_IDS), r.get(RESPONSE)
        if not ids or not text or not text.strip():
            continue
        checked += 1
        decoded = student_tokenizer.decode(ids, skip_special_tokens=True).strip()
        want = text.strip()
        head = min(len(want), 32)
        if not (decoded[:head] == want[:head] or want.startswith(decoded[:head])):
            bad += 1
            example = example or f"{want[:40]!r} decodes as {decoded[:40]!r}"
    if checked and bad * 2 > checked:
        return (
            f"the student tokenizer of `{student_name}` ({len(s_vocab)} tokens) does not decode "
            f"the teacher's response_token_ids to the teacher's text in {bad} of {checked} sampled "
            f"rows (e.g. {example})"
        )
    return None


def _teacher_tokenizers(cfg: DistrayConfig) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = {}
    for t in cfg.all_teachers:
        if os.path.isdir(t.model) and any(
            os.path.isfile(os.path.join(t.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            remote_code = bool(getattr(t, "trust_remote_code", False))
            out[t.model] = AutoTokenizer.from_pretrained(t.model, trust_remote_code=remote_code)
    return out


# ------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------


def teacher_splits(paths: RunPaths) -> tuple[str, str | None]:
    """Where generate wrote the teacher data: (train, validation or None).

    generate writes `generate/data/train/` and, when it labels a validation split,
    `generate/data/validation/`; a flat `generate/data/` (no split folders) is all training data.
    """
    from distray.formats import exists

    def has_parquet(folder: str) -> bool:
        try:
            return exists(folder) and bool(list_files(folder, (".parquet",)))
        except DataError:
            return False

    train = f"{paths.generate_data}/train"
    validation = f"{paths.generate_data}/validation"
    return (
        train if has_parquet(train) else paths.generate_data,
        validation if has_parquet(validation) else None,
    )


def _holdout_filter(fraction: float, seed: int, keep_holdout: bool) -> Any:
    """Keep (or drop) the held-out rows of a pyarrow batch.

    The hash is of `input_id` when the rows have one: a teacher row's `id` differs per sample
    and per teacher, and hashing it would put answers to one prompt on both sides.
    """

    def fn(batch: Any) -> Any:
        import pyarrow as pa

        key = INPUT_ID if INPUT_ID in batch.column_names else ID
        flags = holdout_flags(batch.column(key).to_pylist(), fraction, seed)
        return batch.filter(pa.array(flags if keep_holdout else ~flags))

    return fn


def _parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    files = list_files(path, (".parquet",))
    if not files:
        raise DataError(f"no Parquet files under `{path}`; run `distray generate` first")
    fs, _ = filesystem_for(path)
    with fs.open_input_file(files[0]) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    missing = [c for c in (ID, MESSAGES, RESPONSE) if c not in names]
    if missing:
        raise DataError(
            f"teacher data `{files[0]}` lacks columns {missing} (has {names}); it should follow "
            "distray.formats.TEACHER_DATA_SCHEMA"
        )
    return [c for c in TRAIN_COLUMNS if c in names]


def _teacher_dataset(path: str, columns: list[str]) -> Any:
    import ray.data

    return ray.data.read_parquet(path, columns=columns, file_extensions=["parquet"])


def _to_sft_rows(system_prompt: str | None, prompt_template: str) -> Any:
    """Input rows (JSONL lines or Parquet rows) → {id, messages, response=reference}."""

    def fn(batch: Any) -> Any:
        import pyarrow as pa

        out: dict[str, list[Any]] = {ID: [], MESSAGES: [], RESPONSE: []}
        if "text" in batch.column_names and batch.num_columns == 1:
            items = [("line", t) for t in batch.column("text").to_pylist()]
        else:
            items = [("row", r) for r in batch.to_pylist()]
        for kind, item in items:
            if kind == "line":
                if not item or not item.strip():
                    continue
                row, _ = parse_jsonl_line(
                    item.encode("utf-8"), line=0, system_prompt=system_prompt, prompt_template=prompt_template
                )
            else:
                row, _ = normalize_row(item, system_prompt=system_prompt, prompt_template=prompt_template)
            if row is None or row.get("reference") is None:
                continue
            out[ID].append(row[ID])
            out[MESSAGES].append(row[MESSAGES])
            out[RESPONSE].append(row["reference"])
        return pa.table(
            {
                ID: pa.array(out[ID], pa.string()),
                MESSAGES: pa.array(out[MESSAGES], MESSAGE_TYPE),
                RESPONSE: pa.array(out[RESPONSE], pa.string()),
            }
        )

    return fn


def _reference_dataset(source: Any, cfg: DistrayConfig) -> Any:
    """A Ray Dataset of {id, messages, response} from input rows that carry a `reference`."""
    import ray.data

    if isinstance(source, ray.data.Dataset):
        ds = source
    else:
        files = list_files(str(source), INPUT_SUFFIXES)
        if not files:
            raise DataError(f"no .jsonl/.json/.parquet files under `{source}`")
        texts = [f for f in files if not f.endswith(".parquet")]
        parquets = [f for f in files if f.endswith(".parquet")]
        fs, _ = filesystem_for(str(source))
        parts = []
        if texts:
            parts.append(ray.data.read_text(texts, filesystem=fs))
        if parquets:
            parts.append(ray.data.read_parquet(parquets, filesystem=fs))
        ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    return ds.map_batches(
        _to_sft_rows(cfg.task.system_prompt, cfg.task.prompt_template), batch_format="pyarrow"
    )


# ------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------


def plot_loss(metrics_path: str, out_png: str) -> str | None:
    """Draw train (and validation) loss against step from metrics.jsonl; None without data."""
    from distray.formats import exists, read_text

    if not exists(metrics_path):
        return None
    recs = [json.loads(line) for line in read_text(metrics_path).splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_step" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if "://" in out_png:
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        fs, p = filesystem_for(out_png)
        with fs.open_output_stream(p) as f:
            f.write(buf.getvalue())
    else:
        os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
        fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------------------
# the stage
# ------------------------------------------------------------------------------------------


def run(cfg: DistrayConfig) -> TrainResult:
    """Train the student on the run's teacher data and export it to `<run>/train/student`.

    Raises:
        ConfigError: no student, or settings that contradict each other.
        DataError: missing teacher data, vocabulary mismatch for logit losses.
        StageError: training failed after `train.max_failures` restarts.
    """
    paths = RunPaths(cfg.run_dir)
    train_data, validation_data = teacher_splits(paths)
    return train_model(
        cfg, train_data, paths.train, validation_data=validation_data, answers="teacher"
    )


@dataclass
class _Datasets:
    """Lazy Ray Datasets for one run, and the cheap id-only twins used to count rows."""

    train: Any
    validation: Any | None
    count_train: Any
    count_validation: Any | None
    columns: list[str]
    use_teacher_ids: bool = False
    with_topk: bool = False


def _with_holdout(d: _Datasets, fraction: float, seed: int) -> _Datasets:
    """Split `train` into train / validation by a hash of the input id (`_holdout_filter`)."""
    keep = _holdout_filter(fraction, seed, keep_holdout=True)
    drop = _holdout_filter(fraction, seed, keep_holdout=False)
    return _Datasets(
        train=d.train.map_batches(drop, batch_format="pyarrow"),
        validation=d.train.map_batches(keep, batch_format="pyarrow"),
        count_train=d.count_train.map_batches(drop, batch_format="pyarrow"),
        count_validation=d.count_train.map_batches(keep, batch_format="pyarrow"),
        columns=d.columns,
        use_teacher_ids=d.use_teacher_ids,
        with_topk=d.with_topk,
    )


def _teacher_datasets(
    cfg: DistrayConfig, data: Any, validation_data: Any, model: str, tokenizer_dir: str
) -> _Datasets:
    """Teacher-data datasets, after the top-k and vocabulary checks (driver side, no workers)."""
    tc = cfg.train
    if isinstance(data, str):
        columns = _parquet_columns(data)
        ids = [c for c in (ID, INPUT_ID) if c in columns]  # what the hold-out hashes
        d = _Datasets(_teacher_dataset(data, columns), None, _teacher_dataset(data, ids), None, columns)
    else:
        columns = list(data.columns())
        ids = [c for c in (ID, INPUT_ID) if c in columns]
        d = _Datasets(data, None, data.select_columns(ids), None, columns)
    d.with_topk = tc.is_logit_loss
    if d.with_topk and not (TOPK_TOKEN_IDS in columns and TOPK_LOGPROBS in columns):
        raise DataError(
            f"`train.loss` ({tc.loss}) needs teacher top-k logprobs, but the teacher data has no "
            f"{TOPK_TOKEN_IDS}/{TOPK_LOGPROBS} columns (columns: {columns}); regenerate with "
            "generate.logprobs set, or use train.loss: sft"
        )
    d.use_teacher_ids = RESPONSE_TOKEN_IDS in columns
    if isinstance(data, str):
        sample = _sample_rows(data)
        if d.with_topk and sample and not any(r.get(TOPK_TOKEN_IDS) for r in sample):
            raise DataError(
                f"`train.loss` ({tc.loss}) needs teacher top-k logprobs, but the first "
                f"{len(sample)} rows of `{data}` have none (teacher {sample[0].get('teacher')!r}); "
                "regenerate with generate.logprobs set, or use train.loss: sft"
            )
        if d.use_teacher_ids:
            from transformers import AutoConfig, AutoTokenizer

            problem = check_vocab(
                AutoTokenizer.from_pretrained(tokenizer_dir),
                int(AutoConfig.from_pretrained(model).vocab_size),
                sample,
                _teacher_tokenizers(cfg),
                student_name=model,
            )
            if problem and tc.is_logit_loss:
                raise DataError(
                    f"{problem}. Logit distillation (train.loss: {tc.loss}) needs teacher and "
                    "student to share one tokenizer: pick a student of the teacher's family, or "
                    "use train.loss: sft"
                )
            if problem:
                logger.warning("%s; SFT re-tokenises the teacher's answer text instead", problem)
                d.use_teacher_ids = False
    if validation_data is None:
        return _with_holdout(d, tc.validation_fraction, cfg.run.seed) if tc.validation_fraction > 0 else d
    if isinstance(validation_data, str):
        d.validation = _teacher_dataset(validation_data, _parquet_columns(validation_data))
        d.count_validation = _teacher_dataset(validation_data, [ID])
    else:
        d.validation = validation_data
        d.count_validation = validation_data.select_columns([ID])
    return d


def _reference_datasets(cfg: DistrayConfig, data: Any, validation_data: Any) -> _Datasets:
    """Ground-truth SFT datasets: input rows with a `reference`, as {id, messages, response}."""
    train = _reference_dataset(data, cfg)
    d = _Datasets(train, None, train, None, [ID, MESSAGES, RESPONSE])
    if validation_data is not None:
        d.validation = d.count_validation = _reference_dataset(validation_data, cfg)
    elif cfg.train.validation_fraction > 0:
        d = _with_holdout(d, cfg.train.validation_fraction, cfg.run.seed)
    return d


def _result_from(
    m: dict[str, Any], *, student_dir: str, checkpoint: str, metrics_path: str, plot: str | None,
    n_train: int, n_val: int, t_start: float, tc: TrainConfig, use_gpu: bool,
) -> TrainResult:
    return TrainResult(
        student_dir=student_dir,
        checkpoint_dir=checkpoint,
        metrics_path=metrics_path,
        loss_plot=plot,
        steps=int(m.get("step", 0)),
        epochs=int(m.get("epoch", 0)),
        train_rows=n_train,
        validation_rows=n_val,
        train_loss=m.get("train_loss"),
        val_loss=m.get("val_loss"),
        best_val_loss=m.get("best_val_loss"),
        tokens_per_s=float(m.get("tokens_per_s", 0.0)),
        train_time_s=float(m.get("train_time_s", 0.0)),
        elapsed_s=time.perf_counter() - t_start,
        truncated=int(m.get("truncated", 0)),
        no_target=int(m.get("no_target", 0)),
        resumed_from_step=int(m.get("resumed_from_step", 0)),
        num_workers=tc.num_workers,
        zero_stage=tc.zero_stage,
        use_gpu=use_gpu,
        loss=tc.loss,
    )


def _fit(
    cfg: DistrayConfig, plan: dict[str, Any], datasets: dict[str, Any], out_dir: str, use_gpu: bool
) -> Any:
    """Run the TorchTrainer; the Ray Train Result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from distray.ray_utils import worker_env
    from distray.train.loop import train_loop_per_worker

    tc = cfg.train
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    # With validation, checkpoints are ranked by the loss of their own weights (the loop reports
    # it), so the best survives train.keep_checkpoints; Ray Train always keeps the latest too.
    scored: dict[str, Any] = (
        {"checkpoint_score_attribute": "checkpoint_val_loss", "checkpoint_score_order": "min"}
        if plan["has_validation"]
        else {}
    )
    run_config: Any = ray.train.RunConfig(
        # A fixed name under the run folder: rerunning finds the snapshot and resumes.
        name="checkpoints",
        storage_path=out_dir,
        failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints, **scored),
        worker_runtime_env={"env_vars": worker_env(cfg)},  # type: ignore[call-arg]
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "plan": plan},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # ray.train.TrainingFailedError and worker errors
        raise StageError(
            f"training failed after {tc.max_failures} restart(s) (train.max_failures): {e}. "
            f"Rerun the same command to resume from the latest checkpoint in {out_dir}/checkpoints"
        ) from e
    if result.checkpoint is None:
        raise StageError(f"training reported no checkpoint into {out_dir}/checkpoints")
    return result


def _export_source(result: Any) -> Any:
    """The checkpoint to export: the best one when early stopping ended the run, else the latest."""
    m = result.metrics or {}
    if not m.get("early_stopped") or m.get("best_step") is None:
        return result.checkpoint
    name = f"checkpoint_{int(m['best_step']):08d}"
    for ckpt, _ in result.best_checkpoints or []:
        if ckpt.path.rstrip("/").endswith(name):
            logger.info("early stopping: exporting the best checkpoint, %s", name)
            return ckpt
    logger.warning("early stopping: best checkpoint %s is gone; exporting the latest", name)
    return result.checkpoint


def train_model(
    cfg: DistrayConfig,
    data: Any,
    out_dir: str,
    *,
    validation_data: Any = None,
    answers: Answers = "teacher",
    model: str | None = None,
    max_rows: int | None = None,
) -> TrainResult:
    """Train `model` (default `cfg.student.model`) and export it to `<out_dir>/student`.

    Args:
        cfg: the run config; `train` and `student` sections are read.
        data: teacher data (a Parquet folder in TEACHER_DATA_SCHEMA, or a Ray Dataset of such
            rows) when `answers="teacher"`; input rows with `reference` (JSONL/Parquet file or
            folder, or a Ray Dataset of input rows) when `answers="reference"`.
        out_dir: gets `checkpoints/`, `student/`, `metrics.jsonl`, `loss.png`. Reusing a folder
            resumes from its latest checkpoint.
        validation_data: same kind as `data`; None holds out `train.validation_fraction` of
            `data` by a hash of the input id (`input_id`, else `id`).
        answers: `teacher` (learn the teacher's answers, SFT or logit losses) or `reference`
            (SFT on ground truth; no teacher involved).
        model: student folder to start from; default `cfg.student.model`.
        max_rows: use at most this many training rows (after the validation hold-out).

    Returns:
        Paths and figures of the run.

    Raises:
        ConfigError: no student folder; a logit loss on references; batch settings that
            contradict each other.
        DataError: no rows; teacher data without top-k for a logit loss; teacher and student
            vocabularies that differ (logit losses), all before any worker starts.
        StageError: training failed after `train.max_failures` restarts.
    """
    t_start = time.perf_counter()
    tc = cfg.train
    if model is None:
        if cfg.student is None:
            raise ConfigError("`student.model` is not set; name the student's Hugging Face folder")
        model = cfg.student.model
    if not os.path.isdir(model):
        raise ConfigError(f"student model `{model}` is not a local folder; set student.model")
    # Workers do not share the driver's working directory: hand them absolute paths.
    model = os.path.abspath(model)
    tokenizer_dir = os.path.abspath((cfg.student.tokenizer if cfg.student else None) or model)
    data, validation_data = _abs_local(data), _abs_local(validation_data)
    if answers == "reference" and tc.is_logit_loss:
        raise ConfigError(
            f"`train.loss` ({tc.loss}) needs teacher logprobs, but training on ground-truth "
            "references has none; use train.loss: sft"
        )

    from distray.ray_utils import cluster_has_gpu, init_ray

    init_ray(cfg)
    import ray

    out_dir = out_dir.rstrip("/")
    if "://" not in out_dir:
        out_dir = os.path.abspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)

    # ---- datasets (lazy: executed on the cluster and streamed to the workers) ----
    if answers == "teacher":
        d = _teacher_datasets(cfg, data, validation_data, model, tokenizer_dir)
    else:
        d = _reference_datasets(cfg, data, validation_data)
    if max_rows is not None:
        d.train, d.count_train = d.train.limit(max_rows), d.count_train.limit(max_rows)
    for ds in (d.train, d.validation, d.count_train, d.count_validation):
        if ds is not None:
            # Progress bars of every epoch's stream would bury the step lines; training reports
            # progress itself.
            ds.context.enable_progress_bars = False

    # ---- sizes and the step plan ----
    use_gpu = tc.use_gpu if tc.use_gpu is not None else cluster_has_gpu()
    world = tc.num_workers
    n_train = d.count_train.count()
    if n_train == 0:
        what = " with a `reference` answer" if answers == "reference" else ""
        raise DataError(f"no training rows{what} in `{data}`")
    n_val = d.count_validation.count() if d.count_validation is not None else 0
    if d.validation is not None and n_val < world:
        logger.warning(
            "validation has %d rows, fewer than the %d workers; training without validation loss",
            n_val,
            world,
        )
        d.validation, n_val = None, 0
    ds_config = build_deepspeed_config(tc, world, use_gpu=use_gpu)
    micro = int(ds_config["train_micro_batch_size_per_gpu"])
    accum = int(ds_config["gradient_accumulation_steps"])
    total_steps, steps_per_epoch, micro_per_epoch, epochs = plan_steps(
        n_train, world, micro, accum, tc.epochs, tc.max_steps
    )
    metrics_path = f"{out_dir}/metrics.jsonl"
    plan = {
        "model": model,
        "tokenizer": tokenizer_dir,
        "out_dir": out_dir,
        "metrics_path": metrics_path,
        "ds_config": ds_config,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "micro_batches_per_epoch": micro_per_epoch,
        "epochs": epochs,
        "use_teacher_ids": d.use_teacher_ids,
        "with_topk": d.with_topk,
        "has_validation": d.validation is not None,
        "seed": cfg.run.seed,
        "use_gpu": use_gpu,
    }
    logger.info(
        "train: %d rows (%d validation), %d workers × micro %d × accum %d = %d seq/step, "
        "%d steps (%d/epoch), ZeRO-%d, %s, loss %s, %s",
        n_train,
        n_val,
        world,
        micro,
        accum,
        ds_config["train_batch_size"],
        total_steps,
        steps_per_epoch,
        tc.zero_stage,
        tc.precision,
        tc.loss,
        "GPU/nccl" if use_gpu else "CPU/gloo",
    )
    keep_cols = [c for c in TRAIN_COLUMNS if c in d.columns]
    datasets = {"train": d.train.select_columns(keep_cols)}
    if d.validation is not None:
        datasets["validation"] = d.validation.select_columns(keep_cols)
    result = _fit(cfg, plan, datasets, out_dir, use_gpu)
    checkpoint = _export_source(result)

    # ---- export: a Ray task on the cluster, next to storage, once the workers are gone ----
    from distray.train.export import export_checkpoint

    student_dir = f"{out_dir}/student"
    lora = cfg.student.lora.model_dump() if (cfg.student and cfg.student.lora) else None
    export_task: Any = ray.remote(num_cpus=1)(export_checkpoint)
    ray.get(
        export_task.remote(
            checkpoint.path,
            model,
            student_dir,
            tokenizer=tokenizer_dir,
            lora=lora,
            trust_remote_code=cfg.student.trust_remote_code if cfg.student else False,
        )
    )
    plot = plot_loss(metrics_path, f"{out_dir}/loss.png")
    m = dict(result.metrics or {})
    res = _result_from(
        m, student_dir=student_dir, checkpoint=checkpoint.path, metrics_path=metrics_path,
        plot=plot, n_train=n_train, n_val=n_val, t_start=t_start, tc=tc, use_gpu=use_gpu,
    )
    if res.truncated or res.no_target:
        logger.warning(
            "%d of %d training examples were cut to train.max_seq_len (%d); %d kept no answer "
            "token at all",
            res.truncated,
            m.get("examples", 0),
            tc.max_seq_len,
            res.no_target,
        )
    logger.info(
        "train done: %d steps, train_loss %s, val_loss %s, %.0f tok/s → student %s, metrics %s, "
        "plot %s, checkpoints %s/checkpoints",
        res.steps,
        _f(res.train_loss),
        _f(res.val_loss),
        res.tokens_per_s,
        student_dir,
        metrics_path,
        plot,
        out_dir,
    )
    return res


def _abs_local(source: Any) -> Any:
    """An absolute path for a local path string; URIs and Ray Datasets unchanged."""
    if isinstance(source, str) and "://" not in source:
        return os.path.abspath(source)
    return source


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
