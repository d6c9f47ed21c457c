"""The whole chain: generate → train → evaluate → serve + bench → report.

    distray run jobs/configs/quickstart.yaml [key=value ...] [--stages generate,train] [--force]
    distray train --config jobs/configs/quickstart.yaml      # one stage: `run_stage`
    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/X.yaml

A stage whose outputs exist is skipped on rerun (unless `force`); a stage that was interrupted
resumes from its own state (generate skips finished rows, train restarts from its latest
checkpoint). The run ends with one summary: paths and the headline table.

What it knows about each stage (its folders, marker, lineage, hooks) it asks the stage's
`Stage` in `distray.stages.REGISTRY` (re-exported here); it never branches on a stage's name.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distray.config import DistrayConfig
from distray.errors import ConfigError, StageError
from distray.paths import RunPaths
from distray.stages import BENCH_APP, COMMANDS, REGISTRY, STAGES, Stage, pipeline_stages
from distray.storage import exists, read_text

__all__ = [
    "BENCH_APP", "COMMANDS", "REGISTRY", "STAGES", "PipelineResult", "Stage", "clear_stage",
    "headline", "run", "run_stage", "stage_done",
]

logger = logging.getLogger(__name__)

#: Asked before `--force` deletes a finished stage: gets the question, returns True to go on.
Confirm = Callable[[str], bool]


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
    """True when `stage` finished: the file it writes last (`Stage.marker`) exists.

    Each marker is written once everything else of its stage is in place: generate's
    stats.json after the last shard, train's export marker after the student's files (on an
    object store a folder is uploaded file by file, so a `model.safetensors` alone proves
    nothing), evaluate's metrics.json and bench's results.json after their predictions.
    """
    return REGISTRY[stage].done(cfg.run_dir)


def clear_stage(cfg: DistrayConfig, stage: str) -> None:
    """Remove a stage's output folders (`--force`); nothing to remove is no error."""
    for folder in REGISTRY[stage].folders(cfg.run_dir):
        if not exists(folder):
            continue
        logger.warning("--force: removing %s", folder)
        if "://" in folder:
            from distray.storage import filesystem_for

            fs, inner = filesystem_for(folder)
            fs.delete_dir(inner)
        else:
            shutil.rmtree(folder)


def _force_set(force: bool | str | Iterable[str] | None, wanted: Iterable[str]) -> set[str]:
    """The stages `force` names: all of `wanted` for True, "a,b" or a list for some."""
    if force is True or force == "all":
        return set(wanted)
    if not force:
        return set()
    names = [n.strip() for n in force.split(",")] if isinstance(force, str) else list(force)
    unknown = [n for n in names if n not in REGISTRY or not REGISTRY[n].has_lineage]
    if unknown:
        known = ", ".join(n for n, s in REGISTRY.items() if s.has_lineage)
        raise ConfigError(f"`--force` names {', '.join(unknown)}; choose from {known}, or give "
                          "--force alone for every stage that runs")
    return set(names)


def _clear_forced(cfg: DistrayConfig, stage: Stage, confirm: Confirm | None) -> None:
    """`--force`: clear the stage, asking first (on a terminal) when that deletes finished work."""
    if confirm is not None and stage.done(cfg.run_dir):
        cost = stage.cost_line(cfg)
        question = (f"--force {stage.name}: delete the finished {', '.join(stage.folders(cfg.run_dir))}"
                    + (f" ({cost})" if cost else "") + "?")
        if not confirm(question):
            raise StageError(f"stopped: {stage.name}'s outputs kept (answer y, or pass --yes, to "
                             "delete them; or set a new run.name to keep both runs)")
    clear_stage(cfg, stage.name)


def headline(run_dir: str) -> dict[str, Any]:
    """The figures the run ends with: retention, latency and memory reduction, baseline gain."""
    path = RunPaths(run_dir).eval_metrics
    if not exists(path):
        return {}
    metrics = json.loads(read_text(path))
    return dict(metrics.get("headline") or {})


def _check_settings(cfg: DistrayConfig, wanted: list[str], forced: set[str], hint: str) -> None:
    """Before any work: stop when a resumable stage to run has outputs made with other settings.

    A stage that starts over (evaluate, bench) just runs again with the new settings: its
    outputs are derived and cheap next to teacher data and a trained student.
    """
    from distray import lineage

    for name in wanted:
        stage = REGISTRY[name]
        if name not in forced and stage.resumable and stage.has_lineage:
            lineage.check(cfg, stage, force_hint=hint.format(stage=name))


def _redo_if_stale(cfg: DistrayConfig, stage: Stage) -> None:
    """Make a stage whose inputs or settings changed since it ran run again.

    generate resumes (its rows are keyed by content, and new prompts get labelled; removed
    prompts' rows are moved aside); the others start over, since their outputs were computed
    from the old inputs. Resumable stages with changed settings were refused before
    (`_check_settings`).
    """
    from distray import lineage

    if not stage.has_lineage or lineage.read(cfg, stage) is None:
        return
    changed = lineage.inputs_changed(cfg, stage)
    if not changed and not stage.resumable:
        if lineage.settings_changed(cfg, stage):
            changed = ["settings"]
    if not changed:
        return
    if stage.keyed_by_content:
        logger.warning("stage %s: its inputs changed (%s); resuming to label new prompts",
                       stage.name, ", ".join(changed))
        marker = stage.marker_of(cfg.run_dir)
        if marker and exists(marker):
            from distray.storage import filesystem_for

            fs, inner = filesystem_for(marker)
            fs.delete_file(inner)
        return
    logger.warning("stage %s: its inputs changed since it ran (%s); running it again (removing %s)",
                   stage.name, ", ".join(changed), ", ".join(stage.folders(cfg.run_dir)))
    clear_stage(cfg, stage.name)


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


def run_stage(cfg: DistrayConfig, name: str, force: bool = False,
              confirm: Confirm | None = None) -> Any:
    """Prepare a run for one stage and run it, as `distray <stage> --config ...` does.

    It checks what `distray run` checks: a resumable stage (generate, train) whose outputs were
    made with other settings is refused (`force` clears it first), one whose inputs changed
    runs again (generate resumes, train starts over); evaluate and bench start over. The run
    folder's lease is held, `config.resolved.yaml` and the stage's lineage record are written,
    and the stage's `after` hook runs (evaluate: report.md).

    Args:
        cfg: the validated config.
        name: the stage.
        force: clear the stage's outputs first.
        confirm: asked before `force` deletes a finished stage (the CLI asks on a terminal).

    Returns:
        The stage's result.
    """
    stage = REGISTRY.get(name)
    if stage is None or not stage.command:
        raise ConfigError(f"unknown stage `{name}`; choose from {', '.join(COMMANDS)}")
    if not stage.has_lineage:  # serve reads the run folder, it writes nothing there
        return _run_stage_held(cfg, stage, force, confirm)
    from distray.cluster import check_shared_output
    from distray.lease import hold
    from distray.prepare import run_dir_of

    check_shared_output(cfg)
    with hold(run_dir_of(cfg)):
        return _run_stage_held(cfg, stage, force, confirm)


def _run_stage_held(cfg: DistrayConfig, stage: Stage, force: bool, confirm: Confirm | None) -> Any:
    from distray.prepare import prepare, write_record

    if stage.has_lineage and not force and stage.demo:
        # Refuse before the demo builds anything (its stand-in teacher and baseline take minutes).
        _check_settings(prepare(cfg, demo=False, models=stage.models), [stage.name], set(),
                        f"distray {stage.name} --config ... --force")
    cfg = prepare(cfg, demo=stage.demo, baseline=stage.baseline, models=stage.models)
    if stage.deploys:
        _check_demo_teacher(stage.name, cfg)
    else:
        write_record(cfg)
    if stage.has_lineage:
        from distray import lineage

        if force:
            _clear_forced(cfg, stage, confirm)
        else:
            _check_settings(cfg, [stage.name], set(),
                            f"distray {stage.name} --config ... --force")
            _redo_if_stale(cfg, stage)
        lineage.write(cfg, stage)
    result = stage.fn()(cfg)
    stage.run_after(cfg.run_dir)
    return result


def run(cfg: DistrayConfig, stages: list[str] | None = None,
        force: bool | str | Iterable[str] = False, confirm: Confirm | None = None) -> PipelineResult:
    """Run the pipeline's stages in order, skipping finished ones.

    Args:
        cfg: the validated config.
        stages: subset of STAGES to run (in pipeline order); None runs all.
        force: rerun stages even when their outputs exist (their folders are cleared first):
            True for every stage that runs, or the names of some ("train", ["train", "bench"]).
        confirm: asked before `force` deletes a finished stage (the CLI asks on a terminal).

    Returns:
        PipelineResult with paths, the stages run and skipped, and the headline figures.
    """
    from distray.ray_utils import init_ray

    order = pipeline_stages()
    wanted = list(order) if not stages else list(stages)
    unknown = [s for s in wanted if s not in order]
    if unknown:
        raise ConfigError(f"`--stages` has {unknown}; choose from {', '.join(order)}")
    forced = _force_set(force, wanted)
    if any(t.kind == "openai" for t in cfg.all_teachers) and cfg.demo.train_teacher:
        raise ConfigError("`demo.train_teacher` cannot train an API teacher; set it to false")
    init_ray(cfg)
    from distray.cluster import check_shared_output
    from distray.lease import hold
    from distray.prepare import run_dir_of

    check_shared_output(cfg)
    with hold(run_dir_of(cfg)):
        return _run_held(cfg, wanted, forced, confirm)


def _run_held(cfg: DistrayConfig, wanted: list[str], forced: set[str],
              confirm: Confirm | None) -> PipelineResult:
    from distray.prepare import check_vocabularies, prepare, write_record

    models = tuple(m for m in ("teacher", "student", "baseline")
                   if any(m in REGISTRY[n].models for n in wanted))
    hint = "distray run ... --force {stage}"
    # Refuse before the demo builds anything (its stand-in teacher and baseline take minutes).
    _check_settings(prepare(cfg, demo=False, models=models), wanted, forced, hint)
    cfg = prepare(cfg, models=models)
    _check_settings(cfg, wanted, forced, hint)
    if "generate" in wanted and ("generate" in forced or not stage_done(cfg, "generate")):
        check_vocabularies(cfg)
    resolved = write_record(cfg)
    logger.info("run folder %s (config: %s)", cfg.run_dir, resolved)
    result = PipelineResult(run_dir=cfg.run_dir, report_path=None)
    for name in pipeline_stages():
        if name not in wanted:
            continue
        stage = REGISTRY[name]
        if name in forced:
            _clear_forced(cfg, stage, confirm)
        else:
            _redo_if_stale(cfg, stage)
        if name not in forced and stage.done(cfg.run_dir):
            logger.info("stage %s: done already (outputs exist), skipped; --force %s reruns it",
                        name, name)
            stage.skipped(cfg)
            result.stages_skipped.append(name)
            continue
        logger.info("stage %s: starting", name)
        if stage.has_lineage:
            from distray import lineage

            lineage.write(cfg, stage)
        t0 = time.perf_counter()
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
