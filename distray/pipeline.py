"""The whole chain: generate → train → evaluate → serve + bench → report.

    distray run jobs/configs/quickstart.yaml [key=value ...] [--stages generate,train] [--force]
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

from distray.config import DistrayConfig, EndpointConfig, write_resolved
from distray.errors import ConfigError
from distray.formats import exists, read_text
from distray.paths import RunPaths

__all__ = ["STAGES", "PipelineResult", "resolve", "run", "stage_done", "headline"]

logger = logging.getLogger(__name__)

STAGES = ("generate", "train", "evaluate", "bench", "report")


@dataclass
class PipelineResult:
    """What `distray run` did and where it put it."""

    run_dir: str
    report_path: str | None
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    headline: dict[str, Any] = field(default_factory=dict)


def absolutize(cfg: DistrayConfig) -> DistrayConfig:
    """Make relative local paths absolute.

    Ray workers (Train workers, engine actors) run in their own working directories, so a path
    relative to where the user typed the command would point nowhere there. Cloud URIs and hub
    ids (`org/name` that is not a local folder) are left alone.
    """
    data = cfg.model_dump(mode="json")
    demo_models = bool(data["demo"]["train_teacher"])

    def fix(section: dict[str, Any] | None, key: str, *, model: bool = False) -> None:
        if not section:
            return
        value = section.get(key)
        if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
            return
        if model and not (Path(value).exists() or demo_models or value.startswith((".", "~"))):
            return  # a hub id such as meta-llama/Llama-3.1-8B-Instruct
        section[key] = str(Path(value).expanduser().resolve())

    fix(data["run"], "output_dir")
    for key in ("train", "validation", "test"):
        fix(data["data"], key)
    for t in [data.get("teacher"), *data.get("teachers", [])]:
        if t and t.get("kind") != "openai":
            fix(t, "model", model=True)
    if data.get("student"):
        fix(data["student"], "model", model=True)
        fix(data["student"], "tokenizer", model=True)
    fix(data["evaluate"], "baseline", model=True)
    fix(data["generate"], "cache_dir")
    fix(data["serve"], "model", model=True)
    fix(data["bench"], "prompts")
    return DistrayConfig.model_validate(data)


def resolve(cfg: DistrayConfig, *, demo: bool = True) -> DistrayConfig:
    """Fill what the stages read from the run folder: built-in task files, demo stand-ins.

    With `data.builtin`, the task's JSONL files are written into `<run>/data/` (once) and
    `data.train/validation/test` point at them. With `demo.train_teacher`, the stand-in teacher,
    the student's initial weights and the baseline are built when missing.

    Returns:
        The config every stage receives (also written as config.resolved.yaml).
    """
    cfg = absolutize(cfg)
    paths = RunPaths(cfg.run_dir)
    b = cfg.data.builtin
    if b is not None:
        from distray.tasks import make_task

        if not exists(paths.task_split("test")):
            make_task(b.name, paths.data, b.n_train, b.seed, n_validation=b.n_validation, n_test=b.n_test)
        update = {
            "train": paths.task_split("train"),
            "validation": paths.task_split("validation") if b.n_validation else None,
            "test": paths.task_split("test"),
        }
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=update)})
    if demo and cfg.demo.train_teacher:
        from distray.demo import baseline_dir, prepare_demo

        prepare_demo(cfg)
        if cfg.evaluate.baseline is None and "baseline" in cfg.evaluate.models:
            ev = cfg.evaluate.model_copy(update={"baseline": baseline_dir(cfg)})
            cfg = cfg.model_copy(update={"evaluate": ev})
    # Round-trip through validation so cross-field checks see the filled-in values.
    return DistrayConfig.model_validate(cfg.model_dump(mode="json"))


def stage_done(cfg: DistrayConfig, stage: str) -> bool:
    """True when `stage`'s final outputs exist in the run folder."""
    p = RunPaths(cfg.run_dir)
    marker = {
        "generate": p.generate_stats,
        "train": f"{p.student}/model.safetensors",
        "evaluate": p.eval_metrics,
        "bench": p.bench_results,
        "report": None,
    }[stage]
    return marker is not None and exists(marker)


def _clear(cfg: DistrayConfig, stage: str) -> None:
    p = RunPaths(cfg.run_dir)
    folder = {"generate": p.generate, "train": p.train, "evaluate": p.evaluate, "bench": p.bench}.get(stage)
    if folder and "://" not in folder and Path(folder).exists():
        logger.info("--force: removing %s", folder)
        shutil.rmtree(folder)


def _run_bench(cfg: DistrayConfig) -> Any:
    """Deploy the student (and teacher) on Ray Serve, benchmark them, shut Serve down."""
    from distray import bench, serve

    if cfg.bench.endpoints:
        return bench.run(cfg)
    endpoints = serve.deploy(cfg)
    try:
        eps = [EndpointConfig.model_validate(e if isinstance(e, dict) else e.model_dump()) for e in endpoints]
        bcfg = cfg.model_copy(update={"bench": cfg.bench.model_copy(update={"endpoints": eps})})
        return bench.run(bcfg)
    finally:
        serve.shutdown()


def _stage_fn(stage: str) -> Any:
    if stage == "generate":
        from distray.teacher.generate import run as generate_run

        return generate_run
    if stage == "train":
        from distray.train.trainer import run as train_run

        return train_run
    if stage == "evaluate":
        from distray.evaluate.runner import run as evaluate_run

        return evaluate_run
    if stage == "bench":
        return _run_bench
    if stage == "report":
        from distray.report import build_report

        return lambda cfg: build_report(cfg.run_dir)
    raise ConfigError(f"unknown stage `{stage}`; choose from {', '.join(STAGES)}")


def headline(run_dir: str) -> dict[str, Any]:
    """The figures the run ends with: retention, latency and memory reduction, baseline gain."""
    path = RunPaths(run_dir).eval_metrics
    if not exists(path):
        return {}
    metrics = json.loads(read_text(path))
    return dict(metrics.get("comparison") or metrics.get("headline") or {})


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
    cfg = resolve(cfg)
    resolved = write_resolved(cfg)
    logger.info("run folder %s (config: %s)", cfg.run_dir, resolved)
    result = PipelineResult(run_dir=cfg.run_dir, report_path=None)
    for stage in STAGES:
        if stage not in wanted:
            continue
        if force:
            _clear(cfg, stage)
        elif stage_done(cfg, stage):
            logger.info("stage %s: done already (outputs exist), skipped; --force reruns it", stage)
            result.stages_skipped.append(stage)
            continue
        logger.info("stage %s: starting", stage)
        t0 = time.perf_counter()
        out = _stage_fn(stage)(cfg)
        result.stage_seconds[stage] = round(time.perf_counter() - t0, 1)
        result.stages_run.append(stage)
        if stage == "report":
            result.report_path = out if isinstance(out, str) else RunPaths(cfg.run_dir).report
        logger.info("stage %s: finished in %.1f s", stage, result.stage_seconds[stage])
    result.headline = headline(cfg.run_dir)
    if result.report_path is None and exists(RunPaths(cfg.run_dir).report):
        result.report_path = RunPaths(cfg.run_dir).report
    logger.info(
        "run %s: ran %s, skipped %s; report %s; headline %s",
        cfg.run.name, result.stages_run, result.stages_skipped, result.report_path, result.headline,
    )
    return result
