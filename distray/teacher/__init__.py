"""Teacher generation: prompts → teacher data (Ray Data × vLLM / OpenAI-compatible APIs / HF).

    distray generate --config jobs/configs/quickstart.yaml

Public API:
- `run(cfg) -> GenerateResult`: the `generate` stage (read, validate, skip done rows, cache,
  teacher, filter, write Parquet shards, stats.json).
- `generate_dataset(ds, teacher, cfg, *, sampling=None, logprobs=None) -> Dataset`: the
  generation path alone, as a lazy Ray Data transform (used by `evaluate`).
- `read_prompts(path, cfg) -> (valid, rejects)`: read + validate prompt files into Ray Data.
- `teacher_ident(teacher) -> dict`: what about a teacher decides its answers (row ids, cache).

Importing this package is cheap; Ray and the engines load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "run", "GenerateResult", "generate_dataset", "read_prompts", "OUTPUT_SCHEMA", "teacher_ident",
]

_LAZY = {
    "run": "distray.teacher.generate",
    "GenerateResult": "distray.teacher.generate",
    "generate_dataset": "distray.teacher.dataset",
    "OUTPUT_SCHEMA": "distray.teacher.dataset",
    "read_prompts": "distray.teacher.reader",
    "teacher_ident": "distray.teacher.rows",
}

if TYPE_CHECKING:
    from distray.teacher.dataset import OUTPUT_SCHEMA, generate_dataset
    from distray.teacher.generate import GenerateResult, run
    from distray.teacher.reader import read_prompts
    from distray.teacher.rows import teacher_ident


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distray.teacher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
