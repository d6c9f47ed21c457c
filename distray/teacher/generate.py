"""The generate stage: prompt files → teacher data, validated, resumable, with stats.

    distray generate --config jobs/configs/quickstart.yaml generate.logprobs=5

The splits (`generate.splits`: train from `data.train`, validation from `data.validation`;
a built-in task's files under `<run>/data/`) are validated one by one; then each teacher
(`teacher` or `teachers`) answers every split in one streaming Ray Data pipeline, so its
engines load the model once per run, not once per split (on a large teacher, loading the
weights takes minutes):

    read → validate ─────────────────────────────────────────────────────────┐ rejects
    (each split) → one row per sample (ids) → skip ids already done ┐
                                        union of the splits ────────┴→ [cache] → teacher → filter
                                                                         → write to the row's split

Output (`RunPaths`):

    <run>/generate/data/train/part-<hash>.parquet        accepted rows, TEACHER_DATA_SCHEMA
    <run>/generate/data/validation/part-<hash>.parquet   (when a validation split is labelled)
    <run>/generate/rejects/rejects-<hash>.jsonl          REJECT_SCHEMA: input row, stage, reason
    <run>/generate/rejects/retry-<run>-<hash>.jsonl      REJECT_SCHEMA: transient teacher failures
    <run>/generate/stats.json                            this run's figures, per teacher (and validation per split)

Every input row (× teachers × samples) ends in data or rejects exactly once, and a job killed
at any moment and run again finishes the rest without asking the teacher twice: the rules that
make it so are stated in `distray.teacher.publish`, which enforces them. With
`generate.cache_dir`, a first pass writes rows whose answer is cached; only the rest reach the
teacher, whose engines do not start when the cache answered every row.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from distray import formats as F
from distray import storage
from distray.config import (
    DistrayConfig,
)
from distray.engines import engine_for
from distray.errors import ConfigError, DataError, StageError
from distray.lease import current
from distray.paths import RunPaths
from distray.teacher import writer as W
from distray.teacher.dataset import answer
from distray.teacher.filters import DuplicateTracker, response_digest
from distray.teacher.progress import PROGRESS_DIR, clear_progress, count_answered
from distray.teacher.prune import move_removed_rows
from distray.teacher.publish import Sink, cache_lookup, input_rejects_sink, sum_stats
from distray.teacher.rows import Teacher, expand_rows, model_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["GenerateResult", "run", "split_inputs"]


@dataclass
class GenerateResult:
    """What `run` wrote and measured (this run only; `total_*` count the folders)."""

    data_dir: str
    rejects_dir: str
    stats_path: str
    splits: dict[str, str]
    rows_in: int = 0
    skipped_done: int = 0
    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    teacher_requests: int = 0
    cache_hits: int = 0
    http_attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_tokens_per_s: float = 0.0
    generate_wall_s: float = 0.0
    engine_busy_s: float = 0.0
    engine_output_tokens_per_s: float = 0.0
    wall_s: float = 0.0
    gpu_hours: float = 0.0
    cost_usd: float = 0.0
    total_data_rows: int = 0
    total_reject_rows: int = 0
    total_retry_rows: int = 0
    #: Engine replicas of this run per Ray node id, on a cluster of more than one node (from
    #: Ray's state API; None on one node, or where that API is not reachable).
    engine_nodes: dict[str, int] | None = None
    parts: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """The one summary line the stage logs."""
        by_count = sorted(self.rejected_by_reason.items(), key=lambda kv: -kv[1])
        reasons = ", ".join(f"{k} {v}" for k, v in by_count)
        return (
            f"generate | {self.rows_in} rows in ({self.skipped_done} already done) | "
            f"{self.accepted} accepted, {self.rejected} rejected"
            + (f" ({reasons})" if reasons else "")
            + f" | {self.teacher_requests} teacher requests, {self.cache_hits} cache hits | "
            f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens | "
            f"{self.output_tokens_per_s:,.1f} out tok/s ({self.engine_output_tokens_per_s:,.1f} "
            f"while engines busy) | {self.wall_s:.1f} s | "
            f"${self.cost_usd:.4f} | data {self.data_dir} | rejects {self.rejects_dir} | "
            f"stats {self.stats_path}"
            + (
                f" | {self.total_retry_rows} transient teacher failures in rejects/retry-*: "
                "rerun generate to retry them"
                if self.total_retry_rows else ""
            )
        )


# ---- inputs ------------------------------------------------------------------------------


def split_inputs(cfg: DistrayConfig) -> dict[str, str]:
    """`{split: input path}` for the splits the teacher labels.

    Raises:
        ConfigError: no training input is configured.
    """
    out: dict[str, str] = {}
    for split in cfg.generate.splits:
        # A built-in task's files are written by `distray.prepare`, which points data.* at them.
        src = getattr(cfg.data, split)
        if src is not None:
            out[split] = src
    if "train" in cfg.generate.splits and "train" not in out:
        raise ConfigError(
            "`data.train` is not set and there is no `data.builtin` task; point data.train at a "
            "JSONL or Parquet prompt file (or set data.builtin.name)"
        )
    return out


_REMOTE_ERROR = re.compile(r"distray\.errors\.(StageError|ConfigError|DataError): (.+?)(?:\n\n|\Z)", re.S)


def _unwrap(e: BaseException) -> BaseException:
    """The StageError / ConfigError / DataError a Ray task raised, if `e` carries one.

    Ray Data re-raises a UDF's exception on the driver as a RayTaskError(UserCodeException)
    without the original as its cause, so the error is found in the chain or, failing that,
    rebuilt from the message Ray passes along.
    """
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (StageError, ConfigError, DataError)):
            return cur
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)
    m = _REMOTE_ERROR.search(str(e))
    if m:
        cls = {"StageError": StageError, "ConfigError": ConfigError, "DataError": DataError}[m.group(1)]
        return cls(m.group(2).strip())
    return e


# ---- the stage -----------------------------------------------------------------------------


class _Stage:
    """One `run`: the folders, the done-id set, the running totals."""

    def __init__(self, cfg: DistrayConfig, inputs: dict[str, str], on_gpu: bool) -> None:
        self.cfg = cfg
        self.inputs = inputs
        self.on_gpu = on_gpu
        self.paths = RunPaths(cfg.run_dir)
        self.rejects_dir = self.paths.generate_rejects
        self.tmp_dir = f"{self.paths.generate}/.tmp"
        # This run's retry shards are told from older runs' by this prefix.
        self.retry_prefix = f"{W.RETRY_PREFIX}-{uuid.uuid4().hex[:8]}"
        self.out_dirs = {split: f"{self.paths.generate_data}/{split}" for split in inputs}
        self.tracker: Any = None
        # The lease this run holds on its folder: its writers (Ray tasks) publish only under it.
        self.fence = current(cfg.run_dir)
        self.reasons: Counter[str] = Counter()
        self.gpu_s = 0.0
        self.api_cost_usd = 0.0
        self.result = GenerateResult(
            data_dir=self.paths.generate_data,
            rejects_dir=self.rejects_dir,
            stats_path=self.paths.generate_stats,
            splits=dict(self.out_dirs),
        )

    def done_ids(self) -> np.ndarray:
        return W.load_done_ids([self.paths.generate_data, self.rejects_dir])

    def add(self, part: dict[str, Any], **labels: Any) -> None:
        r = self.result
        r.parts.append({**labels, **part})
        r.accepted += part["accepted"]
        r.rejected += part["rejected"]
        r.teacher_requests += part["teacher_requests"]
        r.cache_hits += part["cache_hits"]
        r.http_attempts += part["http_attempts"]
        r.prompt_tokens += part["prompt_tokens"]
        r.completion_tokens += part["completion_tokens"]
        self.reasons.update(part["reasons"])

    def max_rows(self, split: str) -> int | None:
        return self.cfg.data.max_rows if split == "train" else None

    def validate(self, split: str, src: str) -> int:
        """Pass 0: input rows that fail validation go to rejects once, whatever the teachers.

        Returns:
            The number of valid input rows.
        """
        from distray.teacher.reader import read_raw

        raw = read_raw(src, self.cfg, max_rows=self.max_rows(split))
        sink = input_rejects_sink(
            self.rejects_dir, self.tmp_dir, self.cfg.data.rejects_format, self.done_ids(), self.fence
        )
        part = sum_stats(raw.map_batches(sink, batch_format="pyarrow", batch_size=None))
        n_valid = int(part["valid_inputs"])
        self.result.rows_in += part["rows"]
        self.result.skipped_done += part["rows"] - n_valid - part["rejected"]
        self.add(part, split=split, teacher=None, pass_="validate")
        return n_valid

    def todo(self, split: str, src: str, teacher: Teacher, with_cache_key: bool) -> Any:
        """Teacher rows of `src` not yet in data or rejects (lazy)."""
        from distray.teacher.reader import read_raw, valid_rows

        gen = self.cfg.generate
        # The split is in the id (a prompt in train and validation is two rows); the model's
        # fingerprint is taken here, where the folder is, so every worker computes the same ids.
        kwargs = {
            "teacher": teacher, "sampling": gen.sampling, "logprobs": gen.logprobs,
            "with_cache_key": with_cache_key, "split": split,
            "fingerprint": model_fingerprint(teacher.model),
        }
        ds = valid_rows(read_raw(src, self.cfg, max_rows=self.max_rows(split))).map_batches(
            _expand, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None
        )
        keep: Any = W.keep_not_done
        return ds.map_batches(
            keep, fn_kwargs={"done": self.done_ids()},
            batch_format="pyarrow", batch_size=None,
        )

    def sink(self, store_cache: bool) -> Sink:
        gen = self.cfg.generate
        return Sink(
            out_dirs=self.out_dirs, rejects_dir=self.rejects_dir, tmp_dir=self.tmp_dir,
            rejects_format=self.cfg.data.rejects_format, retry_prefix=self.retry_prefix,
            filters=gen.filters,
            labels=self.cfg.task.labels, cache_dir=gen.cache_dir, store_cache=store_cache,
            tracker=self.tracker, fence=self.fence,
        )

    def todo_all(self, teacher: Teacher, with_cache_key: bool) -> Any:
        """Teacher rows of every split not yet done, as one dataset (lazy)."""
        parts = [self.todo(split, src, teacher, with_cache_key) for split, src in self.inputs.items()]
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    def label(self, teacher: Teacher, n_valid: int) -> None:
        """Passes A (cache, optional) and B (teacher) of one teacher over every split.

        One pipeline for all splits: the teacher's engines start (and load its weights) once.
        """
        gen = self.cfg.generate
        splits = "+".join(self.inputs)
        processed = 0
        if gen.cache_dir:
            # Pass A: rows whose answer is cached are written without the teacher.
            hits = self.todo_all(teacher, True).map_batches(
                cache_lookup, fn_kwargs={"cache_dir": gen.cache_dir},
                batch_format="pyarrow", batch_size=None,
            )
            part = sum_stats(
                hits.map_batches(
                    self.sink(store_cache=False),
                    batch_format="pyarrow", batch_size=gen.rows_per_shard,
                )
            )
            processed += part["rows"]
            self.add(part, split=splits, teacher=teacher.label, pass_="cache")
        # Pass B: the rest goes to the teacher.
        todo = self.todo_all(teacher, gen.cache_dir is not None)
        if processed and todo.limit(1).count() == 0:
            # The cache answered every row left: starting the teacher's engines (loading its
            # weights: minutes for a big model) would be for nothing. The check re-reads the
            # prompts, which costs a second or two.
            logger.info("teacher %s: every row left was answered from the cache; its engines "
                        "were not started", teacher.label)
            self.result.skipped_done += max(0, n_valid * gen.sampling.n - processed)
            return
        t0 = time.perf_counter()
        counter: Any = count_answered
        # The engine's batch size keeps the count from fusing into the writer's bigger batches:
        # it runs as each engine batch comes out, minutes before a shard is full.
        answered = answer(todo, teacher, self.cfg, gen.sampling, gen.logprobs).map_batches(
            counter, fn_kwargs={"folder": f"{self.paths.generate}/{PROGRESS_DIR}"},
            batch_format="pyarrow", batch_size=int(getattr(teacher, "batch_size", 0) or 16),
        )
        part = sum_stats(
            answered.map_batches(
                self.sink(store_cache=True),
                batch_format="pyarrow", batch_size=gen.rows_per_shard,
            )
        )
        wall = time.perf_counter() - t0
        processed += part["rows"]
        part["wall_s"] = round(wall, 3)
        part["output_tokens_per_s"] = round(part["completion_tokens"] / wall, 2) if wall > 0 else 0.0
        self.add(part, split=splits, teacher=teacher.label, pass_="teacher")
        self.result.generate_wall_s += wall
        self.result.engine_busy_s += part["engine_busy_s"]
        self.result.skipped_done += max(0, n_valid * gen.sampling.n - processed)
        engine = engine_for(teacher)
        self.gpu_s += wall * engine.gpus(self.on_gpu)
        self.api_cost_usd += engine.cost_usd(part["prompt_tokens"], part["completion_tokens"])
        engine.check_answered(part)

    def settle_retries(self) -> None:
        """Drop the older retry-shard rows this run settled (see the module docstring)."""
        done = [self.paths.generate_data, self.rejects_dir]
        n = W.settle_retry_shards(self.rejects_dir, self.tmp_dir, done, self.retry_prefix, self.fence)
        if n:
            logger.info("settled %d retry shard(s) of earlier runs in %s", n, self.rejects_dir)

    def finish(self, t_start: float) -> GenerateResult:
        self.settle_retries()
        r = self.result
        r.rejected_by_reason = dict(self.reasons)
        r.wall_s = time.perf_counter() - t_start
        r.output_tokens_per_s = r.completion_tokens / r.generate_wall_s if r.generate_wall_s > 0 else 0.0
        r.engine_output_tokens_per_s = (
            r.completion_tokens / r.engine_busy_s if r.engine_busy_s > 0 else 0.0
        )
        r.gpu_hours = self.gpu_s / 3600
        r.cost_usd = self.api_cost_usd + r.gpu_hours * self.cfg.generate.gpu_hour_usd
        r.total_data_rows = len(W.load_done_ids([self.paths.generate_data]))
        r.total_reject_rows = len(W.load_done_ids([self.rejects_dir], include_retry=True))
        r.total_retry_rows = r.total_reject_rows - len(W.load_done_ids([self.rejects_dir]))
        r.engine_nodes = _engine_nodes()
        storage.write_text(self.paths.generate_stats, json.dumps(asdict(r), indent=2, default=str))
        return r


def run(cfg: DistrayConfig) -> GenerateResult:
    """Label the configured prompt splits with every configured teacher.

    Args:
        cfg: the run config (data, task, teacher/teachers, generate, resources).

    Returns:
        Output paths and this run's figures (also in `<run>/generate/stats.json`).

    Raises:
        ConfigError: no teacher, or no training input.
        DataError: an input path does not exist.
        StageError: a teacher failed (e.g. an API endpoint under `min_success_ratio`).
    """
    teachers = cfg.all_teachers
    if not teachers:
        raise ConfigError(
            "no teacher configured; set `teacher` (kind: vllm, openai or hf) or `teachers`"
        )
    t_start = time.perf_counter()
    inputs = split_inputs(cfg)

    from distray.ray_utils import cluster_has_gpu, init_ray

    init_ray(cfg)
    import ray

    stage = _Stage(cfg, inputs, cluster_has_gpu())
    W.clean_tmp(stage.tmp_dir)
    # An unreadable shard would stop every rerun here: set it aside and label its rows again.
    W.quarantine_unreadable(
        [stage.paths.generate_data, stage.rejects_dir], f"{stage.paths.generate}/quarantine"
    )
    clear_progress(stage.paths.generate)
    # Rows of prompts that left the input are moved aside before anything counts them done.
    move_removed_rows(cfg, inputs, data_dir=stage.paths.generate_data,
                      generate_dir=stage.paths.generate, max_rows=stage.max_rows, fence=stage.fence)
    if cfg.generate.filters.dedupe_responses:
        stage.tracker = _start_tracker(list(stage.out_dirs.values()))
    try:
        n_valid = sum(stage.validate(split, src) for split, src in inputs.items())
        for teacher in teachers:
            stage.label(teacher, n_valid)
    except Exception as e:
        try:
            # A run stopped by min_success_ratio has retried some rows: keep them once.
            stage.settle_retries()
        except OSError as settle_error:
            logger.warning("could not settle retry shards: %s", settle_error)
        inner = _unwrap(e)
        if inner is not e:
            raise inner from e
        raise
    finally:
        if stage.tracker is not None:
            ray.kill(stage.tracker)
    result = stage.finish(t_start)
    clear_progress(stage.paths.generate)
    logger.info(result.summary())
    return result


#: The teacher engines' actor classes, as Ray Data names their actors (`MapWorker(...)`).
_ENGINE_CLASSES = ("vLLMEngineStageUDF", "HFGenerator", "OpenAIClient")


def _engine_nodes() -> dict[str, int] | None:
    """How many engine replicas this job ran on each Ray node (dead ones included), by node id."""
    try:
        import ray
        from ray.util.state import list_actors

        if sum(1 for n in ray.nodes() if n["Alive"]) < 2:
            return None  # one node: nothing to tell, and a local Ray runs no state API
        job = ray.get_runtime_context().get_job_id()
        actors = list_actors(filters=[("job_id", "=", job)], detail=True, limit=10_000,
                             raise_on_missing_output=False, timeout=20)
    except Exception as e:  # noqa: BLE001 - a record for people, never a reason to fail the stage
        logger.debug("engine placement not recorded: %s", e)
        return None
    nodes = Counter(a.node_id for a in actors
                    if a.node_id and any(c in (a.class_name or "") for c in _ENGINE_CLASSES))
    return dict(nodes)


def _expand(batch: pa.Table, **kwargs: Any) -> pa.Table:
    """One teacher row per (prompt row, sample), with ids (`rows.expand_rows`) and `_split`,
    which tells the sink the row's folder."""
    rows = expand_rows(batch.to_pylist(), **kwargs)
    for r in rows:
        r["_split"] = kwargs["split"]
    return pa.Table.from_pylist(rows)


def _start_tracker(data_dirs: list[str]) -> Any:
    """The duplicate-answer tracker actor, seeded with the answers already accepted."""
    import ray

    tracker_cls: Any = ray.remote(num_cpus=0)(DuplicateTracker)
    tracker = tracker_cls.remote()
    pairs: list[tuple[bytes, str]] = []
    for d in data_dirs:
        fs, _ = storage.filesystem_for(d)
        for path in W.iter_shard_files(d):
            import pyarrow.parquet as pq

            with fs.open_input_file(path) as f:
                t = pq.read_table(f, columns=[F.RESPONSE, F.INPUT_ID])
            for resp, iid in zip(t.column(F.RESPONSE).to_pylist(), t.column(F.INPUT_ID).to_pylist(), strict=True):
                if resp is not None:
                    pairs.append((response_digest(resp), iid))
    if pairs:
        ray.get(tracker.seed.remote(pairs))
    return tracker
