"""The Ray Datasets a training run streams to its workers, built and checked on the driver.

    .venv/bin/python -m pytest tests/unit/test_train_data.py -q -k holdout

Two sources, one row layout (`{id, messages, response, ...}`, `distray.train.data.TRAIN_COLUMNS`):

- teacher data (`answers="teacher"`): generate's Parquet shards in TEACHER_DATA_SCHEMA, checked
  for top-k logprobs when the loss needs them and for a vocabulary the student shares
  (`distray.train.vocab`), before any worker starts;
- ground truth (`answers="reference"`): input rows (JSONL/Parquet, `distray.formats`) that carry
  a `reference`, which becomes the `response`.

Without a validation split, `train.validation_fraction` of the rows is held out by a hash of the
input id. Every dataset is lazy; each has an id-only twin from which the driver reads the run's
row ids (`RunDatasets.collect_ids`): each id once, whatever number of shards hold it
(`distray.train.order`).

Data given as a path also gets a `FileRows` twin: the driver reads the ids, and a
worker whose share is small (`order.LOCAL_SORT_ROWS`) its rows, with pyarrow in its own process
instead of a Ray Data execution (see `FileRows` for why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

from distray.config import DistrayConfig
from distray.errors import DataError
from distray.formats import (
    ID,
    INPUT_ID,
    MESSAGE_TYPE,
    MESSAGES,
    RESPONSE,
    RESPONSE_TOKEN_IDS,
    TOPK_LOGPROBS,
    TOPK_TOKEN_IDS,
    normalize_row,
    parse_jsonl_line,
)
from distray.inputs import INPUT_SUFFIXES
from distray.paths import RunPaths
from distray.storage import exists, filesystem_for, list_files
from distray.train.data import TRAIN_COLUMNS, holdout_flags
from distray.train.filerows import FileRows

__all__ = [
    "Answers",
    "FileRows",
    "RunDatasets",
    "build_datasets",
    "holdout_filter",
    "teacher_splits",
]

logger = logging.getLogger(__name__)

Answers = Literal["teacher", "reference"]


@dataclass
class RunDatasets:
    """Lazy Ray Datasets for one run, and the cheap id-only twins used to count rows."""

    train: Any
    validation: Any | None
    count_train: Any
    count_validation: Any | None
    columns: list[str]
    use_teacher_ids: bool = False
    with_topk: bool = False
    max_rows: int | None = None
    train_ids: Any = None
    validation_ids: Any = None
    duplicates: int = 0
    #: The same rows as `FileRows` (data given as a path), else None.
    train_files: FileRows | None = None
    validation_files: FileRows | None = None

    def collect_ids(self, seed: int) -> None:
        """Read the row ids (the id-only twins) into `train_ids` / `validation_ids`: sorted,
        each id once, training limited to `max_rows` by a seeded choice; `duplicates` counts the
        rows dropped because another row has their id (e.g. two shards written for one block
        after a crash), and a warning says so."""
        from distray.train.order import limit_ids, unique_ids

        self.train_ids, dup_train = unique_ids(_ids(self.count_train, self.train_files))
        self.train_ids = limit_ids(self.train_ids, self.max_rows, seed)
        dup_val = 0
        if self.count_validation is not None:
            self.validation_ids, dup_val = unique_ids(_ids(self.count_validation, self.validation_files))
        self.duplicates = dup_train + dup_val
        if self.duplicates:
            logger.warning(
                "dropped %d duplicate row(s) (%d training, %d validation): their id is held by "
                "another row too, e.g. in two shards written for one block; each id trains once",
                self.duplicates, dup_train, dup_val,
            )

    def for_workers(self) -> dict[str, Any]:
        """{"train", "validation"?}: what each worker reads its rows from, reduced to
        TRAIN_COLUMNS: a `FileRows` where there is one, else the Ray Dataset."""
        keep = [c for c in TRAIN_COLUMNS if c in self.columns]
        out: dict[str, Any] = {
            "train": self.train_files.with_columns(keep) if self.train_files else self.train.select_columns(keep)
        }
        if self.validation is not None:
            out["validation"] = (
                self.validation_files.with_columns(keep)
                if self.validation_files
                else self.validation.select_columns(keep)
            )
        return out


def teacher_splits(paths: RunPaths) -> tuple[str, str | None]:
    """Where generate wrote the teacher data: (train, validation or None).

    generate writes `generate/data/train/` and, when it labels a validation split,
    `generate/data/validation/`; a flat `generate/data/` (no split folders) is all training data.
    """

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


def holdout_filter(fraction: float, seed: int, keep_holdout: bool) -> Any:
    """A pyarrow-batch function that keeps (or drops) the held-out rows.

    The hash is of `input_id` when the rows have one: a teacher row's `id` differs per sample
    and per teacher, and hashing it would put answers to one prompt on both sides.
    """

    def fn(batch: Any) -> Any:
        import pyarrow as pa

        key = INPUT_ID if INPUT_ID in batch.column_names else ID
        flags = holdout_flags(batch.column(key).to_pylist(), fraction, seed)
        return batch.filter(pa.array(flags if keep_holdout else ~flags))

    return fn


def build_datasets(
    cfg: DistrayConfig,
    data: Any,
    validation_data: Any,
    *,
    answers: Answers,
    model: str,
    tokenizer_dir: str,
    max_rows: int | None = None,
) -> RunDatasets:
    """The run's datasets, checked (top-k, vocabulary) and limited to `max_rows` training rows.

    Args:
        cfg: the run config (`train`, `task`, `run.seed`, the teachers).
        data: teacher data or input rows (see `distray.train.trainer.train_model`).
        validation_data: same kind as `data`, or None to hold out `train.validation_fraction`.
        answers: `teacher` or `reference`.
        model: the student folder (its vocabulary size).
        tokenizer_dir: the student's tokenizer folder.
        max_rows: use at most this many training rows (after the hold-out), chosen by
            `run.seed` when the ids are collected.

    Raises:
        DataError: teacher data without top-k for a logit loss, or vocabularies that differ.
    """
    if answers == "teacher":
        d = _teacher_datasets(cfg, data, validation_data, model, tokenizer_dir)
    else:
        d = _reference_datasets(cfg, data, validation_data)
    # Applied to the row ids (`collect_ids`): `limit` would keep whichever rows come first.
    d.max_rows = max_rows
    for ds in (d.train, d.validation, d.count_train, d.count_validation):
        if ds is not None:
            # Progress bars of every epoch's stream would bury the step lines; training reports
            # progress itself.
            ds.context.enable_progress_bars = False
    return d


def _ids(ds: Any, files: FileRows | None) -> list[Any]:
    """The `id` column, as Arrow arrays read on the driver: with pyarrow from `files` when
    given, else from the Ray Dataset."""
    if files is not None:
        if files.read_columns is not None:  # Parquet: read the ids (and what the hold-out hashes)
            files = replace(files, read_columns=[c for c in (ID, INPUT_ID) if c in files.read_columns])
        return [t.column(ID) for t in files.with_columns([ID]).tables()]
    import ray

    return [ray.get(ref).column(ID) for ref in ds.select_columns([ID]).to_arrow_refs()]


def _with_holdout(d: RunDatasets, fraction: float, seed: int) -> RunDatasets:
    """Split `train` into train / validation by a hash of the input id (`holdout_filter`)."""
    keep = holdout_filter(fraction, seed, keep_holdout=True)
    drop = holdout_filter(fraction, seed, keep_holdout=False)
    return RunDatasets(
        train=d.train.map_batches(drop, batch_format="pyarrow"),
        validation=d.train.map_batches(keep, batch_format="pyarrow"),
        count_train=d.count_train.map_batches(drop, batch_format="pyarrow"),
        count_validation=d.count_train.map_batches(keep, batch_format="pyarrow"),
        columns=d.columns,
        use_teacher_ids=d.use_teacher_ids,
        with_topk=d.with_topk,
        train_files=d.train_files.filtered(drop) if d.train_files else None,
        validation_files=d.train_files.filtered(keep) if d.train_files else None,
    )


# ------------------------------------------------------------------------------------------
# teacher data
# ------------------------------------------------------------------------------------------


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
    return FileRows(path, read_columns=columns).dataset()


def _teacher_datasets(
    cfg: DistrayConfig, data: Any, validation_data: Any, model: str, tokenizer_dir: str
) -> RunDatasets:
    """Teacher-data datasets, after the top-k and vocabulary checks (driver side, no workers)."""
    tc = cfg.train
    if isinstance(data, str):
        columns = _parquet_columns(data)
        ids = [c for c in (ID, INPUT_ID) if c in columns]  # what the hold-out hashes
        d = RunDatasets(_teacher_dataset(data, columns), None, _teacher_dataset(data, ids), None, columns)
        d.train_files = FileRows(data, read_columns=columns)
    else:
        columns = list(data.columns())
        ids = [c for c in (ID, INPUT_ID) if c in columns]
        d = RunDatasets(data, None, data.select_columns(ids), None, columns)
    d.with_topk = tc.is_logit_loss
    if d.with_topk and not (TOPK_TOKEN_IDS in columns and TOPK_LOGPROBS in columns):
        raise DataError(
            f"`train.loss` ({tc.loss}) needs teacher top-k logprobs, but the teacher data has no "
            f"{TOPK_TOKEN_IDS}/{TOPK_LOGPROBS} columns (columns: {columns}); regenerate with "
            "generate.logprobs set, or use train.loss: sft"
        )
    d.use_teacher_ids = RESPONSE_TOKEN_IDS in columns
    if isinstance(data, str):
        _check_teacher_sample(cfg, d, data, model, tokenizer_dir)
    if validation_data is None:
        return _with_holdout(d, tc.validation_fraction, cfg.run.seed) if tc.validation_fraction > 0 else d
    if isinstance(validation_data, str):
        val_columns = _parquet_columns(validation_data)
        d.validation = _teacher_dataset(validation_data, val_columns)
        d.count_validation = _teacher_dataset(validation_data, [ID])
        d.validation_files = FileRows(validation_data, read_columns=val_columns)
    else:
        d.validation = validation_data
        d.count_validation = validation_data.select_columns([ID])
    return d


def _check_teacher_sample(
    cfg: DistrayConfig, d: RunDatasets, data: str, model: str, tokenizer_dir: str
) -> None:
    """Check `data`: top-k present for a logit loss (a sample of every shard), one shared
    vocabulary (every shard, `distray.train.vocab.check_teacher_data`).

    A vocabulary mismatch fails a logit loss; SFT falls back to re-tokenising the answer text
    (`d.use_teacher_ids` turns False).
    """
    from distray.train.vocab import check_teacher_data, sample_rows, teacher_tokenizers

    tc = cfg.train
    sample = sample_rows(data)
    if d.with_topk and sample and not any(r.get(TOPK_TOKEN_IDS) for r in sample):
        raise DataError(
            f"`train.loss` ({tc.loss}) needs teacher top-k logprobs, but the "
            f"{len(sample)} rows sampled from `{data}` have none (teacher {sample[0].get('teacher')!r}); "
            "regenerate with generate.logprobs set, or use train.loss: sft"
        )
    if not d.use_teacher_ids:
        return
    from transformers import AutoConfig, AutoTokenizer

    trust = bool(cfg.student.trust_remote_code) if cfg.student else False
    problem = check_teacher_data(
        data,
        AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust),
        int(AutoConfig.from_pretrained(model, trust_remote_code=trust).vocab_size),
        teacher_tokenizers(cfg),
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


# ------------------------------------------------------------------------------------------
# ground-truth references
# ------------------------------------------------------------------------------------------


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


def _reference_rows(source: Any, cfg: DistrayConfig) -> tuple[Any, FileRows | None]:
    """{id, messages, response} from input rows that carry a `reference`: a Ray Dataset, and
    the same rows as `FileRows` when `source` is a path."""
    import ray.data

    to_sft = _to_sft_rows(cfg.task.system_prompt, cfg.task.prompt_template)
    if isinstance(source, ray.data.Dataset):
        return source.map_batches(to_sft, batch_format="pyarrow"), None
    files = FileRows(str(source), suffixes=INPUT_SUFFIXES, filters=(to_sft,))
    return files.dataset(), files


def _reference_datasets(cfg: DistrayConfig, data: Any, validation_data: Any) -> RunDatasets:
    """Ground-truth SFT datasets: input rows with a `reference`, as {id, messages, response}."""
    train, train_files = _reference_rows(data, cfg)
    d = RunDatasets(train, None, train, None, [ID, MESSAGES, RESPONSE], train_files=train_files)
    if validation_data is not None:
        d.validation, d.validation_files = _reference_rows(validation_data, cfg)
        d.count_validation = d.validation
    elif cfg.train.validation_fraction > 0:
        d = _with_holdout(d, cfg.train.validation_fraction, cfg.run.seed)
    return d
