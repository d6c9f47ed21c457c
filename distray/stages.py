"""The stage registry: every fact about a stage, in its `Stage`.

    python -c "from distray.stages import REGISTRY; print(list(REGISTRY))"

pipeline (what runs, what is skipped, what `--force` clears), lineage (which settings and
inputs a stage's outputs depend on), console (the progress line) and the API ask the `Stage`;
none of them branches on a stage's name. Adding a stage means adding it to `REGISTRY` and
writing its own module (`tests/unit/test_stage_registry.py` adds a toy stage that way).

This module imports nothing heavy and no stage: a stage's function is named by module and
attribute and imported when it runs, so `distray --help` loads neither Ray nor vLLM, and no
import cycle runs through the registry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from distray.paths import RunPaths
from distray.storage import exists

__all__ = ["BENCH_APP", "COMMANDS", "REGISTRY", "STAGES", "Stage", "pipeline_stages", "stage"]


def _call(ref: str, *args: Any) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)(*args)


@dataclass(frozen=True)
class Stage:
    """One stage and all of its facts.

    Attributes:
        name: the stage (and command) name.
        module, attr: the function called with the prepared config.
        help: one line for `distray --help`.
        in_pipeline: `distray run` runs it (serve is a command only: the bench stage deploys).
        command: `distray <name> --config ...` runs it alone (report takes a run folder instead).
        demo, baseline: what `prepare` builds for it alone (serve and bench build nothing, so
            `distray serve` on a fresh run fails at once instead of training a demo teacher).
        pipeline_kwargs: extra arguments inside `distray run`.
        folder: its folder in the run (a `RunPaths` attribute, or a path under the run folder);
            what `--force` clears, with
            `extra_folders`. None: it writes nothing of its own there.
        marker: the file it writes last (`RunPaths` attribute, or a path under the run folder):
            it exists once the stage finished. None: never "done" (always runs).
        content: what the next stage reads, relative to `folder` (the shards, the student):
            its output digest covers these and nothing else (no stats, timings, logs).
        resumable: an interrupted run resumes its state (the others start over).
        covers: the config prefixes its outputs depend on (only answer-changing settings count,
            `distray.settings`); empty means it records no lineage.
        covers_when: "module:attr" returning more prefixes for a given config (the test split
            when generate labels it, the demo's settings when the demo builds parts).
        reads: the stages whose outputs it reads.
        input_files: the `data.*` keys of the files it reads, or "module:attr" returning them.
        after: "module:attr" called with the run folder after it ran (evaluate: the report).
        progress: "module:attr" returning its progress line from (cfg, run folder), or None.
        extra_folders: more folders `--force` clears, relative to the run folder.
        cost: "module:attr" returning a line on what its outputs cost (for `--force`).
        keyed_by_content: its outputs are keyed by what made them (generate's row ids), so
            changed inputs resume it (new prompts get labelled) instead of redoing it.
        on_skip: "module:attr" called with the config when `distray run` skips it as done.
        deploys: it deploys models on Serve (serve, bench): checked before it starts.
        models: the models it reads, which must exist when it starts ("teacher", "student",
            "baseline"): generate runs before the student exists.
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
    folder: str | None = None
    marker: str | None = None
    content: tuple[str, ...] = ()
    resumable: bool = False
    covers: tuple[str, ...] = ()
    covers_when: str | None = None
    reads: tuple[str, ...] = ()
    input_files: str | tuple[str, ...] = ()
    after: str | None = None
    progress: str | None = None
    extra_folders: tuple[str, ...] = ()
    cost: str | None = None
    keyed_by_content: bool = False
    on_skip: str | None = None
    deploys: bool = False
    models: tuple[str, ...] = ("teacher", "student", "baseline")

    def fn(self) -> Any:
        return getattr(importlib.import_module(self.module), self.attr)

    @property
    def has_lineage(self) -> bool:
        return bool(self.covers)

    def folder_of(self, run_dir: str) -> str | None:
        if self.folder is None:
            return None
        p = RunPaths(run_dir)
        return str(getattr(p, self.folder)) if hasattr(p, self.folder) else p._p(self.folder)

    def folders(self, run_dir: str) -> list[str]:
        """What `--force` clears: its folder and the extra ones."""
        own = self.folder_of(run_dir)
        return ([own] if own else []) + [f"{run_dir.rstrip('/')}/{f}" for f in self.extra_folders]

    def marker_of(self, run_dir: str) -> str | None:
        if self.marker is None:
            return None
        p = RunPaths(run_dir)
        return str(getattr(p, self.marker)) if hasattr(p, self.marker) else p._p(self.marker)

    def done(self, run_dir: str) -> bool:
        """True when it finished: its marker exists."""
        marker = self.marker_of(run_dir)
        return marker is not None and exists(marker)

    def content_paths(self, run_dir: str) -> list[str]:
        own = self.folder_of(run_dir)
        return [f"{own}/{c}" for c in self.content] if own else []

    def prefixes(self, cfg: Any) -> tuple[str, ...]:
        more = tuple(_call(self.covers_when, cfg)) if self.covers_when else ()
        return (*self.covers, *more)

    def files(self, cfg: Any) -> list[str]:
        keys = _call(self.input_files, cfg) if isinstance(self.input_files, str) else self.input_files
        return list(keys)

    def run_after(self, run_dir: str) -> None:
        if self.after:
            _call(self.after, run_dir)

    def progress_line(self, cfg: Any, run_dir: str, state: dict[str, Any]) -> str | None:
        return _call(self.progress, cfg, run_dir, state) if self.progress else None

    def skipped(self, cfg: Any) -> None:
        if self.on_skip:
            _call(self.on_skip, cfg)

    def cost_line(self, cfg: Any) -> str:
        return str(_call(self.cost, cfg)) if self.cost else ""


#: Inside `distray run`, bench deploys the models as their own Serve app (name and route prefix),
#: so a `distray serve` app already running on the cluster is neither replaced nor deleted.
BENCH_APP = "distray-bench"

REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", "distray.teacher.generate", "run",
          "label prompts with the teacher (Ray Data + vLLM) into Parquet teacher data",
          folder="generate", marker="generate_stats", content=("data", "rejects"), resumable=True,
          covers=("data.train", "data.validation", "data.builtin", "data.max_rows", "task",
                  "teacher", "teachers", "generate", "run.seed"),
          covers_when="distray.stage_facts:generate_covers",
          input_files="distray.stage_facts:generate_files",
          progress="distray.stage_facts:generate_progress",
          cost="distray.stage_facts:generate_cost", keyed_by_content=True,
          on_skip="distray.stage_facts:generate_on_skip", models=("teacher",)),
    Stage("train", "distray.train.variants", "run",
          "distil the student on the teacher data (Ray Train + DeepSpeed ZeRO)",
          folder="train", marker="train/student/_distray_export.json", content=("student",),
          resumable=True, covers=("student", "train", "run.seed"),
          covers_when="distray.stage_facts:train_covers", reads=("generate",),
          extra_folders=("onpolicy",), cost="distray.stage_facts:train_cost"),
    Stage("evaluate", "distray.evaluate.runner", "run",
          "score teacher, student and baseline on the test set", baseline=True,
          folder="evaluate", marker="eval_metrics",
          covers=("evaluate", "data.test", "task", "teacher", "teachers"),
          covers_when="distray.stage_facts:evaluate_covers", reads=("train",),
          input_files=("data.test",), after="distray.report:build_report"),
    Stage("serve", "distray.serve", "run",
          "serve the student behind an OpenAI-compatible endpoint (Ray Serve)",
          in_pipeline=False, demo=False, deploys=True),
    Stage("bench", "distray.bench", "run",
          "load-test served endpoints: TTFT, TPOT, ITL, latency percentiles, throughput",
          demo=False, pipeline_kwargs={"app_name": BENCH_APP}, deploys=True,
          folder="bench", marker="bench_results",
          covers=("serve", "bench", "teacher", "teachers", "data.test"), reads=("train",),
          input_files="distray.stage_facts:bench_files"),
    Stage("report", "distray.report", "run", "write report.md and plots for a run folder",
          command=False, demo=False),
)}


def stage(name: str) -> Stage:
    """The registered stage `name` (KeyError names the known ones)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown stage `{name}`; known: {', '.join(REGISTRY)}") from None


def pipeline_stages() -> tuple[str, ...]:
    """The stages `distray run` runs, in order (read from the registry each time)."""
    return tuple(name for name, s in REGISTRY.items() if s.in_pipeline)


#: The stages `distray run` runs, in order.
STAGES = pipeline_stages()
#: The stages with a `distray <stage> --config ...` command.
COMMANDS = tuple(name for name, s in REGISTRY.items() if s.command)
