"""The whole chain: generate → train → evaluate → serve + bench → report; the one stage registry.

    distray run jobs/configs/quickstart.yaml [key=value ...] [--stages generate,train] [--force]
    distray train --config jobs/configs/quickstart.yaml      # one stage: `run_stage`
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/X.yaml

A stage whose outputs exist is skipped on rerun (unless `force`); a stage that was interrupted
resumes from its own state (generate skips finished rows, train restarts from its latest
checkpoint). The run ends with one summary: paths and the headline table.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distray.config import DistrayConfig
from distray.errors import ConfigError
from distray.paths import RunPaths
from distray.storage import exists, read_text

__all__ = [
    "COMMANDS", "REGISTRY", "STAGES", "PipelineResult", "Stage", "clear_stage", "headline", "run",
    "run_stage", "stage_done",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One stage: where its `run(cfg)` lives and what preparing a run for it builds.

    Attributes:
        name: the stage (and command) name.
        module, attr: the function called with the prepared config, imported when it runs so that
            `distray --help` loads neither Ray nor vLLM.
        help: one line for `distray --help`.
        in_pipeline: `distray run` runs it (serve is a command only: the bench stage deploys).
        command: `distray <name> --config ...` runs it alone (report takes a run folder instead).
        demo, baseline: what `prepare` builds for it alone (serve and bench build nothing, so
            `distray serve` on a fresh run fails at once instead of training a demo teacher).
        pipeline_kwargs: extra arguments inside `distray run`.
    """

    name: str
    module: str
    attr: str
    help: str
    in_pipeline: bool = True
    command: bool = True
    demo: bool = True
    baseline: bool = False
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def fn(self) -> Any:
        import importlib

        return getattr(importlib.import_module(self.module), self.attr)


#: Inside `distray run`, bench deploys the models as their own Serve app (name and route prefix),
#: so a `distray serve` app already running on the cluster is neither replaced nor deleted.
BENCH_APP = "distray-bench"

REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", "distray.teacher.generate", "run",
          "label prompts with the teacher (Ray Data + vLLM) into Parquet teacher data"),
    Stage("train", "distray.train.trainer", "run",
          "distil the student on the teacher data (Ray Train + DeepSpeed ZeRO)"),
    Stage("evaluate", "distray.evaluate.runner", "run",
          "score teacher, student and baseline on the test set", baseline=True),
    Stage("serve", "distray.serve", "run",
          "serve the student behind an OpenAI-compatible endpoint (Ray Serve)",
          in_pipeline=False, demo=False),
    Stage("bench", "distray.bench", "run",
          "load-test served endpoints: TTFT, TPOT, ITL, latency percentiles, throughput",
          demo=False, pipeline_kwargs={"app_name": BENCH_APP}),
    Stage("report", "distray.report", "run", "write report.md and plots for a run folder",
          command=False, demo=False),
)}

#: The stages that record their lineage (settings and inputs) next to their outputs.
LINEAGE_STAGES = ("generate", "train", "evaluate", "bench")
#: The stages that resume what an interrupted run left (the others start over).
RESUMABLE = ("generate", "train")
#: The stages `distray run` runs, in order.
STAGES = tuple(name for name, s in REGISTRY.items() if s.in_pipeline)
#: The stages with a `distray <stage> --config ...` command.
COMMANDS = tuple(name for name, s in REGISTRY.items() if s.command)

@dataclass
class PipelineResult:
    """What `distray run` did and where it put it."""

    run_dir: str
    report_path: str | None
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    headline: dict[str, Any] = field(default_factory=dict)


def stage_done(cfg: DistrayConfig, stage: str) -> bool:
    """True when `stage` finished: the file it writes last exists in the run folder.

    Each marker is written once everything else of its stage is in place: generate's
    stats.json after the last shard, train's export marker after the student's files (on an
    object store a folder is uploaded file by file, so a `model.safetensors` alone proves
    nothing), evaluate's metrics.json and bench's results.json after their predictions.
    """
    from distray.cluster import EXPORT_MARKER

    p = RunPaths(cfg.run_dir)
    marker = {
        "generate": p.generate_stats,
        "train": f"{p.student}/{EXPORT_MARKER}",
        "evaluate": p.eval_metrics,
        "bench": p.bench_results,
        "report": None,
    }[stage]
    if marker is None:
        return False
    if stage == "train" and "://" not in p.student and not exists(marker):
        # A local export older than the marker was renamed into place whole: still complete.
        return exists(f"{p.student}/model.safetensors")
    return exists(marker)


def clear_stage(cfg: DistrayConfig, stage: str) -> None:
    """Remove a stage's output folder (`--force`); nothing to remove is no error."""
    p = RunPaths(cfg.run_dir)
    folders = {"generate": [p.generate], "train": [p.train, f"{cfg.run_dir}/onpolicy"],
               "evaluate": [p.evaluate], "bench": [p.bench]}.get(stage, [])
    for folder in folders:
        if not exists(folder):
            continue
        logger.info("--force: removing %s", folder)
        if "://" in folder:
            from distray.storage import filesystem_for

            fs, inner = filesystem_for(folder)
            fs.delete_dir(inner)
        else:
            shutil.rmtree(folder)


def _warn_retry_rows(cfg: DistrayConfig) -> None:
    """Say so when a finished generate left transient teacher failures behind (`retry-*`)."""
    from distray.teacher.writer import is_retry_shard, iter_shard_files

    folder = RunPaths(cfg.run_dir).generate_rejects
    shards = [p for p in iter_shard_files(folder) if is_retry_shard(p)]
    if shards:
        logger.warning(
            "stage generate: %d shard(s) of transient teacher failures in %s (rejects/retry-*); "
            "`distray generate --config ...` retries just those rows (later stages then need "
            "--force to use them)", len(shards), folder,
        )


def headline(run_dir: str) -> dict[str, Any]:
    """The figures the run ends with: retention, latency and memory reduction, baseline gain."""
    path = RunPaths(run_dir).eval_metrics
    if not exists(path):
        return {}
    metrics = json.loads(read_text(path))
    return dict(metrics.get("headline") or {})


def _check_settings(cfg: DistrayConfig, wanted: list[str], force: bool, how: str) -> None:
    """Before any work: stop when a stage to run has outputs made with other settings."""
    if force:
        return
    from distray import lineage

    for stage in wanted:
        # A stage that starts over (evaluate, bench) is only at risk when it would be skipped.
        if stage in RESUMABLE or (stage in LINEAGE_STAGES and stage_done(cfg, stage)):
            lineage.check(cfg, stage, how_to_force=how)


def _refresh_if_inputs_changed(cfg: DistrayConfig, stage: str) -> None:
    """Make a stage whose inputs changed since it ran run again (see `distray.lineage`).

    generate resumes (its rows are keyed by content, and new prompts get labelled); the others
    start over, since their outputs were computed from the old inputs.
    """
    from distray import lineage

    changed = lineage.inputs_changed(cfg, stage)
    if not changed:
        return
    if stage == "generate":
        logger.warning("stage generate: its input files changed (%s); resuming to label new prompts",
                       ", ".join(changed))
        stats = RunPaths(cfg.run_dir).generate_stats
        if exists(stats):
            from distray.storage import filesystem_for

            fs, inner = filesystem_for(stats)
            fs.delete_file(inner)
        return
    logger.warning("stage %s: its inputs changed since it ran (%s); running it again",
                   stage, ", ".join(changed))
    clear_stage(cfg, stage)


def _check_demo_teacher(stage: str, cfg: DistrayConfig) -> None:
    """Fail fast when serve/bench would deploy the demo teacher before anything built it."""
    deploys = stage == "serve" or not cfg.bench.endpoints
    teacher = cfg.teacher
    if not (deploys and cfg.serve.serve_teacher and cfg.demo.train_teacher and teacher is not None):
        return
    if "://" in teacher.model or (Path(teacher.model) / "config.json").exists():
        return
    raise ConfigError(
        f"`teacher.model` `{teacher.model}` does not exist yet and `serve.serve_teacher` is true; "
        "with demo.train_teacher the stand-in teacher is built by `distray generate`: run "
        "`distray generate` and `distray train` first (or `distray run`), or set "
        "serve.serve_teacher=false"
    )


def run_stage(cfg: DistrayConfig, name: str, force: bool = False) -> Any:
    """Prepare a run for one stage and run it, as `distray <stage> --config ...` does.

    A stage runs whether or not its outputs exist: generate and train resume their own state,
    after checking that it was made with the same settings (`force` clears it first); evaluate
    and bench start over. The run folder's `config.resolved.yaml` and the stage's lineage
    record are written, and evaluate's comparison is added to report.md.

    Returns:
        The stage's result.
    """
    stage = REGISTRY.get(name)
    if stage is None or not stage.command:
        raise ConfigError(f"unknown stage `{name}`; choose from {', '.join(COMMANDS)}")
    if name not in LINEAGE_STAGES:  # serve reads the run folder, it writes nothing there
        return _run_stage_held(cfg, stage, force)
    from distray.cluster import check_shared_output
    from distray.lease import hold
    from distray.prepare import run_dir_of

    check_shared_output(cfg)
    with hold(run_dir_of(cfg)):
        return _run_stage_held(cfg, stage, force)


def _run_stage_held(cfg: DistrayConfig, stage: Stage, force: bool) -> Any:
    from distray.prepare import prepare, write_record

    name = stage.name
    cfg = prepare(cfg, demo=stage.demo, baseline=stage.baseline)
    if name in ("serve", "bench"):
        _check_demo_teacher(name, cfg)
    else:
        write_record(cfg)
    if name in LINEAGE_STAGES:
        from distray import lineage

        if force:
            clear_stage(cfg, name)
        elif name in RESUMABLE:
            lineage.check(cfg, name, how_to_force=f"Pass --force (`distray {name} --force ...`)")
        lineage.write(cfg, name)
    result = stage.fn()(cfg)
    if name == "evaluate":
        from distray.report import build_report

        build_report(cfg.run_dir)
    return result


def run(cfg: DistrayConfig, stages: list[str] | None = None, force: bool = False) -> PipelineResult:
    """Run the pipeline's stages in order, skipping finished ones.

    Args:
        cfg: the validated config.
        stages: subset of STAGES to run (in pipeline order); None runs all.
        force: rerun stages even when their outputs exist (their folders are cleared first).

    Returns:
        PipelineResult with paths, the stages run and skipped, and the headline figures.
    """
    from distray.ray_utils import init_ray

    wanted = list(STAGES) if not stages else list(stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ConfigError(f"`--stages` has {unknown}; choose from {', '.join(STAGES)}")
    if any(t.kind == "openai" for t in cfg.all_teachers) and cfg.demo.train_teacher:
        raise ConfigError("`demo.train_teacher` cannot train an API teacher; set it to false")
    init_ray(cfg)
    from distray.cluster import check_shared_output
    from distray.lease import hold
    from distray.prepare import run_dir_of

    check_shared_output(cfg)
    with hold(run_dir_of(cfg)):
        return _run_held(cfg, wanted, force)


def _run_held(cfg: DistrayConfig, wanted: list[str], force: bool) -> PipelineResult:
    from distray.prepare import check_vocabularies, prepare, write_record

    cfg = prepare(cfg)
    _check_settings(cfg, wanted, force, "Pass --force (`distray run ... --force --stages STAGE`)")
    if "generate" in wanted and (force or not stage_done(cfg, "generate")):
        check_vocabularies(cfg)
    resolved = write_record(cfg)
    logger.info("run folder %s (config: %s)", cfg.run_dir, resolved)
    result = PipelineResult(run_dir=cfg.run_dir, report_path=None)
    for name in STAGES:
        if name not in wanted:
            continue
        if force:
            clear_stage(cfg, name)
        elif name in LINEAGE_STAGES:
            _refresh_if_inputs_changed(cfg, name)
        if not force and stage_done(cfg, name):
            logger.info("stage %s: done already (outputs exist), skipped; --force reruns it", name)
            if name == "generate":
                _warn_retry_rows(cfg)
            result.stages_skipped.append(name)
            continue
        logger.info("stage %s: starting", name)
        if name in LINEAGE_STAGES:
            from distray import lineage

            lineage.write(cfg, name)
        t0 = time.perf_counter()
        stage = REGISTRY[name]
        out = stage.fn()(cfg, **stage.pipeline_kwargs)
        result.stage_seconds[name] = round(time.perf_counter() - t0, 1)
        result.stages_run.append(name)
        if name == "report":
            result.report_path = out if isinstance(out, str) else RunPaths(cfg.run_dir).report
        logger.info("stage %s: finished in %.1f s", name, result.stage_seconds[name])
    result.headline = headline(cfg.run_dir)
    if cfg.tracking.enabled:
        from distray.tracking import log_run

        log_run(cfg)
    if result.report_path is None and exists(RunPaths(cfg.run_dir).report):
        result.report_path = RunPaths(cfg.run_dir).report
    logger.info(
        "run %s: ran %s, skipped %s; report %s; headline %s",
        cfg.run.name, result.stages_run, result.stages_skipped, result.report_path, result.headline,
    )
    return result
