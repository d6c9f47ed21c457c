"""A small valid config for unit tests of run bookkeeping (no Ray, no models needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distray.config import config_from_dict


def small_config(tmp_path: Path, **sections: Any) -> Any:
    """The built-in `reverse` task, a vllm teacher and a student as empty local folders (prepare
    stops on a model folder that is not there), each section updated by `sections`."""
    for folder in ("teacher", "student"):
        (tmp_path / folder).mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
        "data": {"builtin": {"name": "reverse", "n_train": 20, "n_validation": 0, "n_test": 5}},
        "teacher": {"kind": "vllm", "model": str(tmp_path / "teacher")},
        "student": {"model": str(tmp_path / "student")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)
