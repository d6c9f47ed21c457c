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

from distray.config import DistrayConfig, write_resolved
from distray.errors import ConfigError
from distray.formats import exists, read_text
from distray.paths import RunPaths, is_hub_id

__all__ = [
    "STAGES", "PipelineResult", "changed_settings", "check_vocabularies", "fetch_hub_models", "headline", "resolve", "run",
    "stage_done",
]

logger = logging.getLogger(__name__)

STAGES = ("generate", "train", "evaluate", "bench", "report")

# The settings each stage's outputs are made from, besides those of the stages before it that it
# reads (evaluate and bench read train's student, train reads generate's data). A finished stage
# whose settings changed since its outputs were written is not skipped silently: `run` stops
# and says which settings changed. `resources` and `run.name`/`output_dir` change no output.
_OWN_INPUTS: dict[str, tuple[str, ...]] = {
    "generate": ("data", "task", "teacher", "teachers", "generate", "demo", "run.seed"),
    "train": ("student", "train"),
    "evaluate": ("evaluate",),
    "bench": ("serve", "bench"),
}
_READS = {"generate": (), "train": ("generate",), "evaluate": ("generate", "train"),
          "bench": ("generate", "train")}


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


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_settings(old: dict[str, Any], new: dict[str, Any], stage: str) -> list[str]:
    """Dotted settings that `stage`'s outputs depend on and that differ between two configs.

    Returns:
        Lines `key: old → new`, sorted; empty when the stage's outputs are still current.
    """
    prefixes = [p for s in (*_READS[stage], stage) for p in _OWN_INPUTS[s]]
    a, b = _flat(old), _flat(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in prefixes) and a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key)!r} → {b.get(key)!r}")
    return lines


def _previous_config(cfg: DistrayConfig) -> dict[str, Any] | None:
    import yaml

    path = f"{cfg.run_dir}/config.resolved.yaml"
    if not exists(path):
        return None
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _fetch_hub_model(value: str, field: str, cfg: DistrayConfig) -> str:
    """Download a hub id (`org/name`) once into `<output_dir>/_models/` and return the folder.

    The student is read by every Ray Train worker and exported from a folder, so it must be a
    folder; vLLM teachers download hub ids themselves and are left alone.
    """
    base = cfg.run.output_dir
    if "://" in base:  # workers cannot load from a bucket: use this machine's cache
        base = str(Path("~/.cache/distray").expanduser())
    target = Path(base) / "_models" / value.replace("/", "--")
    if (target / "config.json").is_file():
        return str(target)
    logger.info("%s: downloading `%s` from the Hugging Face hub into %s", field, value, target)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id=value, local_dir=str(target),
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"],
        )
    except Exception as e:
        raise ConfigError(
            f"`{field}` is `{value}`, which is not a local folder, and downloading it from the "
            f"Hugging Face hub failed ({type(e).__name__}: {str(e)[:200]}); download it yourself "
            f"(`huggingface-cli download {value} --local-dir DIR`) and set {field}=DIR"
        ) from e
    return str(target)


def fetch_hub_models(cfg: DistrayConfig) -> DistrayConfig:
    """Replace hub ids in the student, tokenizer, baseline and serve model by local folders."""
    data = cfg.model_dump(mode="json")
    places = [("student", "model"), ("student", "tokenizer"), ("evaluate", "baseline"), ("serve", "model")]
    changed = False
    for section, key in places:
        value = (data.get(section) or {}).get(key)
        if not isinstance(value, str) or not is_hub_id(value):
            continue  # a folder, a URI, or a missing local path (the stage that reads it says so)
        data[section][key] = _fetch_hub_model(value, f"{section}.{key}", cfg)
        changed = True
    return DistrayConfig.model_validate(data) if changed else cfg


def check_vocabularies(cfg: DistrayConfig) -> None:
    """Before generate: logit KD with a local teacher whose tokenizer is not the student's stops.

    The train stage checks the generated token ids again (API and hub teachers are only
    checked there); this catches the common mistake before the teacher's hours are spent.

    Raises:
        ConfigError: naming both models, both vocabulary sizes and a token that differs.
    """
    if not cfg.train.is_logit_loss or cfg.student is None:
        return
    student = (cfg.student.tokenizer or cfg.student.model)
    if not Path(student, "config.json").is_file() and not Path(student, "tokenizer.json").is_file():
        return  # not built yet (demo) or not local: train checks it
    from transformers import AutoConfig, AutoTokenizer

    from distray.train.trainer import _teacher_tokenizers, check_vocab

    teachers = _teacher_tokenizers(cfg)
    if not teachers:
        return
    problem = check_vocab(
        AutoTokenizer.from_pretrained(student),
        int(AutoConfig.from_pretrained(cfg.student.model).vocab_size),
        [], teachers, student_name=cfg.student.model,
    )
    if problem:
        raise ConfigError(
            f"{problem}. `train.loss: {cfg.train.loss}` distils the teacher's logits, which needs "
            "one tokenizer for teacher and student: pick a student of the teacher's family, or "
            "set train.loss=sft (sequence-level distillation on the teacher's text)"
        )


def resolve(cfg: DistrayConfig, *, demo: bool = True, baseline: bool = True) -> DistrayConfig:
    """Fill what the stages read from the run folder: built-in task files, demo stand-ins.

    With `data.builtin`, the task's JSONL files are written into `<run>/data/` (once) and
    `data.train/validation/test` point at them. With `demo.train_teacher`, the stand-in teacher,
    the student's initial weights and (with `baseline`) the baseline are built when missing. A student (or
    baseline, or served model) given as a hub id is downloaded once into `<output_dir>/_models/`.

    Returns:
        The config every stage receives (also written as config.resolved.yaml).
    """
    cfg = absolutize(cfg)
    cfg = fetch_hub_models(cfg)
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

        prepare_demo(cfg, baseline=baseline)
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
    if not folder or not exists(folder):
        return
    logger.info("--force: removing %s", folder)
    if "://" in folder:
        from distray.formats import filesystem_for

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


BENCH_APP = "distray-bench"


def _run_bench(cfg: DistrayConfig) -> Any:
    """Deploy the student (and teacher) as their own Serve app, benchmark them, delete the app.

    The app has its own name and route prefix, so a `distray serve` app already running on the
    cluster (the default name, at `/`) is neither replaced nor deleted.
    """
    from distray import bench, serve

    if cfg.bench.endpoints:
        return bench.run(cfg)
    endpoints = serve.deploy(cfg, app_name=BENCH_APP, route_prefix=f"/{BENCH_APP}")
    try:
        bcfg = cfg.model_copy(update={"bench": cfg.bench.model_copy(update={"endpoints": endpoints})})
        return bench.run(bcfg)
    finally:
        serve.shutdown(BENCH_APP)


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
    return dict(metrics.get("headline") or {})


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
    previous = _previous_config(cfg)
    if previous is not None:
        new = cfg.model_dump(mode="json")
        for stage in STAGES[:-1]:
            if stage not in wanted or force or not stage_done(cfg, stage):
                continue
            diff = changed_settings(previous, new, stage)
            if diff:
                more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
                raise ConfigError(
                    f"stage {stage}: its outputs in {cfg.run_dir} were made with other settings: "
                    + "; ".join(diff[:5]) + more
                    + f". Pass --force to rerun {stage} and the stages after it with the new "
                    "settings, or set a new run.name to keep both runs"
                )
    if "generate" in wanted and (force or not stage_done(cfg, "generate")):
        check_vocabularies(cfg)
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
            if stage == "generate":
                _warn_retry_rows(cfg)
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
