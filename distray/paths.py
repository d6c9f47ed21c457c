"""Every path of a run folder, in one place.

```
<output_dir>/<run_name>/
  config.resolved.yaml
  data/      train.jsonl validation.jsonl test.jsonl   (built-in tasks only)
  generate/  data/*.parquet  rejects/  stats.json
  train/     checkpoints/  student/ (+ distray_export.json)  metrics.jsonl  loss.png  deepspeed.json
  evaluate/  predictions/*.parquet  metrics.json
  bench/     results.json  summary.md  *.png
  report.md
```
`run_dir` may be a cloud URI; paths are joined with "/" so they stay valid URIs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["RunPaths", "is_hub_id"]


def is_hub_id(value: str) -> bool:
    """True for what can only be a Hugging Face hub id (`org/name`): not a URI, not a local folder,
    not an explicit path (`./x`, `/x`, `~/x`), exactly one slash."""
    if "://" in value or os.path.exists(value) or value.startswith((".", "/", "~")):
        return False
    return value.count("/") == 1


@dataclass(frozen=True)
class RunPaths:
    """Paths inside one run folder (`cfg.run_dir`)."""

    run_dir: str

    def _p(self, *parts: str) -> str:
        return "/".join([self.run_dir.rstrip("/"), *parts])

    @property
    def resolved_config(self) -> str:
        return self._p("config.resolved.yaml")

    # built-in task data
    @property
    def data(self) -> str:
        return self._p("data")

    def task_split(self, split: str) -> str:
        """`data/<split>.jsonl` of a built-in task."""
        return self._p("data", f"{split}.jsonl")

    # generate
    @property
    def generate(self) -> str:
        return self._p("generate")

    @property
    def generate_data(self) -> str:
        return self._p("generate", "data")

    @property
    def generate_rejects(self) -> str:
        return self._p("generate", "rejects")

    @property
    def generate_stats(self) -> str:
        return self._p("generate", "stats.json")

    # train
    @property
    def train(self) -> str:
        return self._p("train")

    @property
    def checkpoints(self) -> str:
        return self._p("train", "checkpoints")

    @property
    def student(self) -> str:
        return self._p("train", "student")

    @property
    def train_metrics(self) -> str:
        return self._p("train", "metrics.jsonl")

    @property
    def loss_plot(self) -> str:
        return self._p("train", "loss.png")

    # evaluate
    @property
    def evaluate(self) -> str:
        return self._p("evaluate")

    @property
    def predictions(self) -> str:
        return self._p("evaluate", "predictions")

    @property
    def eval_metrics(self) -> str:
        return self._p("evaluate", "metrics.json")

    # bench
    @property
    def bench(self) -> str:
        return self._p("bench")

    @property
    def bench_results(self) -> str:
        return self._p("bench", "results.json")

    @property
    def bench_summary(self) -> str:
        return self._p("bench", "summary.md")

    @property
    def report(self) -> str:
        return self._p("report.md")
