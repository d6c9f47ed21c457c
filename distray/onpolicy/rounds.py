"""On-policy distillation: rounds of student rollouts, teacher scoring and KD training.

    distray train --config jobs/configs/quickstart.yaml train.mode=on_policy train.on_policy.rounds=4

`run(cfg)` is what `distray train` runs when `train.mode` is on_policy. Round r:

1. rollouts: student r (round 0: `student.model`) answers `prompts_per_round` fresh training
   prompts, and the eval prompts (sampled and greedy), with engine replicas (rollouts.py);
2. scoring: the teacher scores those exact tokens with prompt logprobs, top-k per answer
   position; the student scores its own eval samples (scoring.py);
3. mix + train: λ of the mix is the scored rollouts, 1 − λ off-policy teacher-data rows of
   generate (mixing.py); Ray Train × DeepSpeed trains student r on it with `train.loss`
   (kd / reverse_kl / jsd over the teacher's top-k) and exports student r + 1.

After the last round, the last student answers the eval prompts once more for the final point,
and is published to `<run>/train/student` (the folder evaluate and serve read), with
`<run>/train/metrics.jsonl` and `loss.png` over all rounds. Folders: `distray.onpolicy.layout`.

Student and the teacher's engines run one after the other (`schedule: turns`) on a machine that
cannot hold both; with `schedule: overlap` (auto on GPU clusters with room for both pools) one
Ray Data pipeline streams rollouts into the teacher's engines while the student still writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from distray import formats as F
from distray import storage
from distray.config import DistrayConfig, HFTeacher, VLLMTeacher, deep_merge
from distray.errors import ConfigError, DataError, StageError
from distray.lease import current
from distray.onpolicy import selection, settle
from distray.onpolicy.layout import EVAL_SAMPLE, PURPOSE, OnPolicyPaths, RoundPaths
from distray.onpolicy.metrics import eval_figures, plot_rounds
from distray.onpolicy.mixing import write_mix
from distray.onpolicy.rollouts import rollout_stream, student_engine
from distray.onpolicy.scoring import ScoreSink, score_dataset
from distray.paths import RunPaths
from distray.teacher import writer as W

__all__ = ["OnPolicyRun", "run", "scorer_of", "round_train_settings", "SPEED_ONLY"]

logger = logging.getLogger(__name__)

#: Settings a resumed run may change: how many rounds, and how fast engines run.
SPEED_ONLY = (
    "train.on_policy.rounds", "train.on_policy.schedule", "train.on_policy.concurrency",
    "train.on_policy.batch_size", "train.on_policy.engine_kwargs",
)


def scorer_of(cfg: DistrayConfig) -> VLLMTeacher | HFTeacher:
    """The teacher that scores rollouts: the first local (vllm or hf) teacher.

    Raises:
        ConfigError: no local teacher, or no top-k setting.
    """
    from distray.engines import engine_for

    local = [cast(VLLMTeacher | HFTeacher, t) for t in cfg.all_teachers if engine_for(t).local]
    if not local:
        kinds: list[str] = [t.kind for t in cfg.all_teachers] or ["none"]
        raise ConfigError(
            f"`train.mode` is on_policy, which needs a local teacher (teacher.kind vllm or hf) "
            f"to score the student's tokens; the teachers are {kinds}"
        )
    if cfg.generate.logprobs is None:
        raise ConfigError("`train.mode` on_policy needs `generate.logprobs` (top-k per position), e.g. 5")
    return local[0]


def round_train_settings(cfg: DistrayConfig, index: int) -> dict[str, Any]:
    """The `train` settings round `index` trains with.

    With `steps_per_round`, each round runs that many steps at a constant learning rate: the
    run's own warm-up + cosine schedule over rounds × steps, read at the round's middle step
    (each round starts a fresh optimizer from the exported weights). No hold-out: validation,
    when generate labelled a split, is that split.

    The logit loss alone (`alpha` 1), as in GKD: `train.alpha` < 1 mixes in cross-entropy on
    each row's answer text, and an on-policy row's answer is the student's own sample, so that
    term would teach the student to imitate itself (a first comparison on the quickstart, with
    alpha 0.5, made the student's reverse KL on its own samples worse round after round).
    """
    tc, op = cfg.train, cfg.train.on_policy
    assert op is not None
    out: dict[str, Any] = {"validation_fraction": 0.0, "alpha": 1.0}
    if op.steps_per_round:
        from distray.train.plan import lr_lambda

        s = op.steps_per_round
        mid = index * s + s // 2
        factor = lr_lambda(mid, tc.warmup_steps, op.rounds * s, tc.min_lr_ratio)
        out.update(max_steps=s, lr=tc.lr * factor, warmup_steps=0, min_lr_ratio=1.0)
    return out


def _settings(cfg: DistrayConfig, teacher: VLLMTeacher | HFTeacher) -> dict[str, Any]:
    from distray import lineage
    from distray.teacher import teacher_ident

    s = {k: v for k, v in lineage.settings(cfg, "train").items() if not k.startswith(SPEED_ONLY)}
    s["teacher"] = json.dumps(teacher_ident(teacher), sort_keys=True, default=str)
    s["generate.logprobs"] = cfg.generate.logprobs
    s["data.train"] = cfg.data.train
    return s


class OnPolicyRun:
    """One `run`: the rounds, their phases and markers, the final student.

    Args:
        cfg: the prepared run config with `train.mode: on_policy`.
    """

    def __init__(self, cfg: DistrayConfig) -> None:
        if cfg.train.on_policy is None:
            raise ConfigError("`train.on_policy` is not set")
        self.cfg = cfg
        self.op = cfg.train.on_policy
        self.paths = OnPolicyPaths(cfg.run_dir)
        self.run_paths = RunPaths(cfg.run_dir)
        self.teacher = scorer_of(cfg)
        self.k = int(cfg.generate.logprobs or 0)
        self.overlap = False
        #: The running phase pass: names its retry shards (`distray.onpolicy.settle`).
        self.pass_id = uuid.uuid4().hex[:8]

    # ---- setup ----------------------------------------------------------------------------

    def setup(self) -> list[dict[str, Any]]:
        """Ray, the settings record, the vocabulary check; returns the eval prompts."""
        from distray.ray_utils import init_ray

        init_ray(self.cfg)
        self._check_settings()
        self._check_vocab()
        self.overlap = self._overlap()
        logger.info(
            "on-policy: %d rounds × %d prompts, λ %.2f, loss %s, teacher %s, engines %s",
            self.op.rounds, self.op.prompts_per_round, self.op.lmbda, self.cfg.train.loss,
            self.teacher.label, "at once (overlap)" if self.overlap else "in turns",
        )
        return self._eval_rows()

    def _check_settings(self) -> None:
        from distray import lineage

        now = _settings(self.cfg, self.teacher)
        if storage.exists(self.paths.settings):
            old = json.loads(storage.read_text(self.paths.settings))
            diff = lineage.changed_settings(old, now)
            if diff:
                raise ConfigError(
                    f"the on-policy rounds in {self.paths.root} were made with other settings: "
                    + "; ".join(diff[:5])
                    + f". Delete {self.paths.root} to start the rounds over, or set a new run.name"
                )
            return
        storage.write_text(self.paths.settings, json.dumps(now, indent=1, default=str) + "\n")

    def _check_vocab(self) -> None:
        """Teacher and student must share one tokenizer: the teacher scores the student's ids."""
        from transformers import AutoConfig, AutoTokenizer

        from distray.train.vocab import check_vocab

        student = self._student_dir(0)
        tok_dir = (self.cfg.student.tokenizer if self.cfg.student else None) or student
        trust = self.teacher.trust_remote_code
        own = bool(self.cfg.student.trust_remote_code) if self.cfg.student else False
        problem = check_vocab(
            AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=own),
            int(AutoConfig.from_pretrained(student, trust_remote_code=own).vocab_size),
            [],
            {self.teacher.model: AutoTokenizer.from_pretrained(self.teacher.model, trust_remote_code=trust)},
            student_name=student,
        )
        if problem:
            raise DataError(
                f"{problem}. On-policy distillation scores the student's token ids with the "
                "teacher, so both must share one tokenizer: pick a student of the teacher's family"
            )

    def _overlap(self) -> bool:
        if self.op.schedule != "auto":
            return self.op.schedule == "overlap"
        import ray

        from distray.engines import engine_for

        gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus <= 0:
            return False
        # Both at once: the student's replicas, and the teacher's at the low end of its range.
        student = engine_for(student_engine(self.cfg, self._student_dir(0), "student"))
        need = student.gpus(True) + engine_for(self.teacher).gpus(True, min_replicas=True)
        return gpus >= need

    def _eval_rows(self) -> list[dict[str, Any]]:
        n = self.op.eval_prompts
        src = self.cfg.data.validation or self.cfg.data.test
        if n == 0 or src is None:
            if n:
                logger.warning("on-policy metrics are off: no data.validation or data.test prompts")
            return []
        seed = self.cfg.run.seed
        return selection.write_once(
            self.paths.eval_prompts,
            lambda: selection.select_rows(
                src, self.cfg, lambda ids: sorted(set(ids), key=lambda i: selection.order_key(seed, i))[:n]
            ),
        )

    # ---- rounds ---------------------------------------------------------------------------

    def _student_dir(self, index: int) -> str:
        if index == 0:
            if self.cfg.student is None:
                raise ConfigError("`student.model` is not set")
            return os.path.abspath(self.cfg.student.model) if "://" not in self.cfg.student.model else self.cfg.student.model
        return self.paths.round(index - 1).student

    def phase(
        self,
        rp: RoundPaths,
        name: str,
        fn: Callable[[], dict[str, Any]],
        *,
        stages: tuple[str, ...] = (),
        unsettled: Callable[[], int] | None = None,
    ) -> dict[str, Any]:
        """Run a phase unless its marker says it finished; its figures (with `<name>_s`).

        Args:
            rp: the round.
            name: the phase (its marker is `<name>.done.json`).
            fn: runs one pass over the phase's rows not done yet; returns its figures.
            stages: the `settle` stages whose retry shards this phase's pass writes.
            unsettled: counts the phase's rows still unsettled after the pass.

        Raises:
            StageError: rows failed transiently (recorded in rejects/retry-*); no marker is
                written, so a rerun sends those rows again and the round keeps its prompts.
        """
        marker = rp.done(name)
        if storage.exists(marker):
            figures: dict[str, Any] = json.loads(storage.read_text(marker))
            logger.info("round %d: %s done already (%s)", rp.index, name, marker)
            return figures
        self.pass_id = uuid.uuid4().hex[:8]
        t0 = time.perf_counter()
        figures = fn()
        settle.drop_older_retries(rp, stages, self.pass_id)
        left = unsettled() if unsettled is not None else 0
        if left:
            raise StageError(
                f"round {rp.index}: {left} row(s) of the {name} phase failed with engine or "
                f"request errors (each with its reason in {rp.rejects}/retry-*.jsonl). The phase "
                "is left unfinished so that every round keeps all of its prompts: rerun the "
                "same command to send only those rows again; if they fail each time, the "
                "engine's log under <run>/logs/ says why"
            )
        figures[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        storage.write_text(marker, json.dumps(figures, indent=1, default=str) + "\n")
        logger.info("round %d: %s %s", rp.index, name, _brief(figures))
        return figures

    def round(self, index: int, eval_rows: list[dict[str, Any]], *, train: bool) -> dict[str, Any]:
        """Run (or finish) round `index`; its figures. Without `train`, only the eval rows."""
        rp = self.paths.round(index)
        student_dir = self._student_dir(index)
        student = student_engine(self.cfg, student_dir, f"student-round-{index:03d}")
        W.clean_tmp(rp.tmp)
        train_rows: list[dict[str, Any]] = []
        if train:
            per, seed = self.op.prompts_per_round, self.cfg.run.seed
            if self.cfg.data.train is None:
                raise ConfigError("`data.train` is not set; on-policy rounds draw their prompts from it")
            src = self.cfg.data.train
            train_rows = selection.write_once(
                rp.prompts,
                lambda: selection.select_rows(
                    src, self.cfg, lambda ids: selection.round_slice(ids, seed, index, per)
                ),
            )
        figures: dict[str, Any] = {"round": index, **self.answer_and_score(rp, student, train_rows, eval_rows)}
        if train:
            teacher_data = _teacher_train_data(self.run_paths)
            figures.update(
                self.phase(rp, "mix", lambda: write_mix(rp, teacher_data, self.op.lmbda, self.cfg.run.seed,
                                                        fence=current(self.cfg.run_dir)))
            )
            figures.update(self.phase(rp, "train", lambda: self._train(rp, index, student_dir)))
        return figures

    def answer_and_score(
        self, rp: RoundPaths, student: Any, train_rows: list[Any], eval_rows: list[Any]
    ) -> dict[str, Any]:
        """Phases (a) and (b) of a round (rollouts, then scores), and its eval figures.

        Raises:
            StageError: rows of a phase failed transiently; that phase writes no marker.
        """
        figures: dict[str, Any] = {}

        def rollouts_left() -> int:
            return settle.unsettled_rollouts(rp, train_rows, eval_rows)

        if self.overlap and not storage.exists(rp.done("rollouts")):
            figures.update(self.phase(
                rp, "rollouts", lambda: self._rollouts_and_scores(rp, student, train_rows, eval_rows),
                stages=(settle.ROLLOUT, settle.TEACHER_SCORE),
                unsettled=lambda: rollouts_left() + settle.unsettled_scores(rp, own=False),
            ))
            figures.update(self.phase(
                rp, "scoring", lambda: self._self_scores(rp, student),
                stages=(settle.SELF_SCORE,), unsettled=lambda: settle.unsettled_scores(rp, teacher=False),
            ))
        else:
            figures.update(self.phase(
                rp, "rollouts", lambda: self._rollouts(rp, student, train_rows, eval_rows),
                stages=(settle.ROLLOUT,), unsettled=rollouts_left,
            ))
            figures.update(self.phase(
                rp, "scoring", lambda: self._scores(rp, student, None),
                stages=(settle.TEACHER_SCORE, settle.SELF_SCORE), unsettled=lambda: settle.unsettled_scores(rp),
            ))
        figures.update(eval_figures(rp))
        return figures

    def evaluate(self, student_dir: str, folder: str) -> dict[str, Any]:
        """The per-round figures of any student folder (e.g. an off-policy KD student) on the
        run's eval prompts, with its rollouts and scores kept in `folder` (resumable too)."""
        eval_rows = self.setup()
        student = student_engine(self.cfg, student_dir, "student-eval")
        return self.answer_and_score(RoundPaths(folder.rstrip("/"), 0), student, [], eval_rows)

    def _rollouts(self, rp: RoundPaths, student: Any, train_rows: list[Any], eval_rows: list[Any]) -> dict[str, Any]:
        stream, sent = rollout_stream(
            self.cfg, rp, student, train_rows, eval_rows,
            retry_prefix=settle.retry_prefix(settle.ROLLOUT, self.pass_id),
        )
        rows = tokens = 0
        if stream is not None:
            for batch in stream.iter_batches(batch_format="pyarrow", batch_size=None):
                rows += batch.num_rows
                tokens += sum(len(t or []) for t in batch.column(F.RESPONSE_TOKEN_IDS).to_pylist())
        return {"rollout_requests": sent, "rollout_rows": rows, "rollout_tokens": tokens}

    def _rollouts_and_scores(self, rp: RoundPaths, student: Any, train_rows: list[Any], eval_rows: list[Any]) -> dict[str, Any]:
        """Overlap: rollouts stream into the teacher's engines within one Ray Data pipeline."""
        stream, sent = rollout_stream(
            self.cfg, rp, student, train_rows, eval_rows,
            retry_prefix=settle.retry_prefix(settle.ROLLOUT, self.pass_id),
        )
        out = self._scores(rp, student, stream, with_self=False)
        return {"rollout_requests": sent, "overlapped": True, **out}

    def _todo(self, rp: RoundPaths, done_in: list[str], purpose: str | None = None) -> Any:
        """Rollout rows on disk whose id is in none of `done_in` (lazy), or None."""
        import ray.data

        files = [f for f in W.iter_shard_files(rp.rollouts) if f.endswith(".parquet")]
        if not files:
            return None
        fs, _ = storage.filesystem_for(rp.rollouts)
        ds = ray.data.read_parquet(files, filesystem=fs)
        keep: Any = W.keep_not_done
        only: Any = _only_purpose
        ds = ds.map_batches(
            keep, fn_kwargs={"done": W.load_done_ids(done_in)}, batch_format="pyarrow", batch_size=None
        )
        if purpose is not None:
            ds = ds.map_batches(only, fn_kwargs={"purpose": purpose}, batch_format="pyarrow", batch_size=None)
        return ds

    def _sunk(self, ds: Any, scorer: Any, out_dir: str, rp: RoundPaths, kind: str) -> Any:
        stage = settle.TEACHER_SCORE if kind == "teacher" else settle.SELF_SCORE
        sink = ScoreSink(out_dir, rp.rejects, rp.tmp, kind, retry_prefix=settle.retry_prefix(stage, self.pass_id),
                         fence=current(self.cfg.run_dir))
        return score_dataset(ds, scorer, self.cfg, self.k).map_batches(
            sink, batch_format="pyarrow", batch_size=self.cfg.generate.rows_per_shard
        )

    def _scores(self, rp: RoundPaths, student: Any, extra: Any, *, with_self: bool = True) -> dict[str, Any]:
        """Teacher scores of every rollout not scored yet (+ `extra`, a stream of new ones), and
        the student's own logprobs of its eval samples (the reverse KL needs them).

        Both run in one Ray Data execution: the student's engine only scores the few eval
        samples, beside the teacher's.
        """
        todo = self._todo(rp, [rp.scored, rp.rejects])
        if extra is not None:
            todo = extra if todo is None else todo.union(extra)
        parts = [self._sunk(todo, self.teacher, rp.scored, rp, "teacher")] if todo is not None else []
        mine = self._todo(rp, [rp.self_scored, rp.rejects], purpose=EVAL_SAMPLE) if with_self else None
        if mine is not None:
            parts.append(self._sunk(mine, student, rp.self_scored, rp, "self"))
        got = _consume(parts)
        return {
            "scored_rows": got["teacher"][0], "scored_tokens": got["teacher"][1],
            "self_scored_rows": got["self"][0],
        }

    def _self_scores(self, rp: RoundPaths, student: Any) -> dict[str, Any]:
        """The student's logprobs of its own eval samples (after an overlapped rollout)."""
        mine = self._todo(rp, [rp.self_scored, rp.rejects], purpose=EVAL_SAMPLE)
        got = _consume([self._sunk(mine, student, rp.self_scored, rp, "self")] if mine is not None else [])
        return {"self_scored_rows": got["self"][0]}

    def _train(self, rp: RoundPaths, index: int, student_dir: str) -> dict[str, Any]:
        from distray.config import DistrayConfig as Cfg
        from distray.train.datasets import teacher_splits
        from distray.train.trainer import train_model

        data = self.cfg.model_dump(mode="json")
        round_cfg = Cfg.model_validate(deep_merge(data, {"train": round_train_settings(self.cfg, index)}))
        _, validation = teacher_splits(self.run_paths)
        res = train_model(round_cfg, rp.mix, rp.train, validation_data=validation, answers="teacher", model=student_dir)
        return {"result": dataclasses.asdict(res), "steps": res.steps, "train_loss": res.train_loss,
                "val_loss": res.val_loss}

    # ---- the end --------------------------------------------------------------------------

    def publish(self, points: list[dict[str, Any]]) -> Any:
        """Copy the last student to `<run>/train/student`, write metrics and plots; the result."""
        from distray.plots import plot_loss
        from distray.train.trainer import TrainResult

        last = self.paths.round(self.op.rounds - 1)
        _copy_folder(last.student, self.run_paths.student)
        records: list[dict[str, Any]] = []
        offset = 0
        for r in range(self.op.rounds):
            rp = self.paths.round(r)
            path = f"{rp.train}/metrics.jsonl"
            lines = storage.read_text(path).splitlines() if storage.exists(path) else []
            steps = 0
            for line in lines:
                rec = json.loads(line) if line.strip() else None
                if not rec or rec.get("final") or "workers" in rec:
                    continue
                steps = max(steps, int(rec.get("step", 0)))
                records.append({**rec, "round": r, "step": offset + int(rec.get("step", 0))})
            offset += steps
        storage.write_text(self.run_paths.train_metrics, "".join(json.dumps(r) + "\n" for r in records))
        plot = plot_loss(records, self.run_paths.loss_plot)
        storage.write_text(self.paths.metrics, json.dumps({"rounds": points}, indent=1, default=str) + "\n")
        rounds_png = plot_rounds(points, self.paths.plot)
        trained = [p for p in points if "result" in p]
        res = TrainResult(**trained[-1]["result"])
        return dataclasses.replace(
            res,
            student_dir=self.run_paths.student,
            metrics_path=self.run_paths.train_metrics,
            loss_plot=plot,
            steps=offset,
            train_rows=sum(int(p["result"]["train_rows"]) for p in trained),
            train_time_s=sum(float(p["result"]["train_time_s"]) for p in trained),
            elapsed_s=sum(float(p.get(f"{ph}_s") or 0) for p in points for ph in ("rollouts", "scoring", "mix", "train")),
        ), rounds_png


def run(cfg: DistrayConfig) -> Any:
    """Run (or resume) every on-policy round; the final student lands in `<run>/train/student`.

    Returns:
        A `distray.train.TrainResult` over all rounds (steps and rows summed).

    Raises:
        ConfigError: no local teacher, no top-k setting, rounds made with other settings.
        DataError: teacher and student vocabularies differ; no prompts; no teacher data to mix.
        StageError: a round's training failed after `train.max_failures` restarts.
    """
    job = OnPolicyRun(cfg)
    eval_rows = job.setup()
    points = []
    for r in range(job.op.rounds):
        points.append(job.round(r, eval_rows, train=True))
    if eval_rows:
        final = job.round(job.op.rounds, eval_rows, train=False)
        points.append(final)
    result, rounds_png = job.publish(points)
    summary = " | ".join(
        f"s{p['round']} rKL {p['reverse_kl']:.3f} NLL {p.get('teacher_nll', float('nan')):.3f}"
        for p in points if "reverse_kl" in p
    )
    logger.info(
        "on-policy done: %d rounds, %d steps | %s → student %s, metrics %s, plot %s, rounds in %s",
        job.op.rounds, result.steps, summary or "no eval prompts", result.student_dir,
        job.paths.metrics, rounds_png, job.paths.root,
    )
    return result


def _only_purpose(batch: Any, purpose: str) -> Any:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column(PURPOSE), purpose))


def _consume(parts: list[Any]) -> dict[str, tuple[int, int]]:
    """Run sink datasets (rows: {kind, rows, tokens}); `{kind: (rows, tokens)}` summed."""
    out = {"teacher": (0, 0), "self": (0, 0)}
    if not parts:
        return out
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in batch.to_pylist():
            rows, tokens = out[r["kind"]]
            out[r["kind"]] = (rows + r["rows"], tokens + r["tokens"])
    return out


def _teacher_train_data(paths: RunPaths) -> str | None:
    from distray.train.datasets import teacher_splits

    train, _ = teacher_splits(paths)
    return train if storage.exists(train) else None


def _copy_folder(src: str, dest: str) -> None:
    """Replace `dest` with a copy of the exported folder `src`; the export marker goes last."""
    from distray.cluster import EXPORT_MARKER

    if not storage.exists(f"{src}/{EXPORT_MARKER}"):
        raise DataError(f"`{src}` is not a finished export (no {EXPORT_MARKER})")
    if "://" not in dest and "://" not in src:
        tmp = dest + ".tmp-copy"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        return
    import pyarrow.fs as pafs

    sfs, sp = storage.filesystem_for(src)
    dfs, dp = storage.filesystem_for(dest)
    marker = f"{dp.rstrip('/')}/{EXPORT_MARKER}"
    if dfs.get_file_info(marker).type != pafs.FileType.NotFound:
        dfs.delete_file(marker)
    for info in sfs.get_file_info(pafs.FileSelector(sp, recursive=True)):
        name = info.path[len(sp.rstrip("/")) + 1 :]
        if info.type != pafs.FileType.File or name == EXPORT_MARKER:
            continue
        with sfs.open_input_stream(info.path) as f:
            storage.write_bytes(f"{dest.rstrip('/')}/{name}", [f.read()])
    storage.write_text(f"{dest.rstrip('/')}/{EXPORT_MARKER}", storage.read_text(f"{src}/{EXPORT_MARKER}"))


def _brief(figures: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in figures.items() if k != "result" and not isinstance(v, (dict, list))
    )
