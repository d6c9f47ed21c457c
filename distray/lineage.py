"""What each stage's outputs were made from, so a rerun can tell reusable outputs from stale ones.

    cat runs/quickstart/train/lineage.json

When a stage starts it writes `<run>/<stage>/lineage.json` next to its outputs:

    {"stage": "train",
     "settings": {"train.lr": 0.0003, "student.model": "/models/phi-4-mini", ...},
     "inputs": {"generate": "9f2c...", ...}}

`settings` are the config values the stage's outputs depend on (its own section and what it
reads directly; secrets as a short hash), and `inputs` the digests of the outputs it read (the
prompt files, an upstream stage's outputs). A rerun then:
- refuses to resume or reuse a stage, finished or partial, whose settings changed (`check`);
- reruns a stage whose inputs changed since it ran (an upstream stage was rerun), which in turn
  changes its own outputs, so everything downstream follows (`inputs_changed`).

Settings that change nothing in a stage's outputs do not mark it stale: `resources`, the run's
name and folder, `data.test` for generate (unless it labels the test split), and the demo
settings of a run that builds no demo parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from distray.config import DistrayConfig, redact
from distray.errors import ConfigError
from distray.paths import RunPaths
from distray.storage import exists, filesystem_for, read_text, write_text

__all__ = ["changed_settings", "check", "input_digests", "inputs_changed", "read", "settings", "write"]

logger = logging.getLogger(__name__)

#: Config prefixes each stage's outputs depend on, besides the outputs of other stages it reads.
_OWN: dict[str, tuple[str, ...]] = {
    "generate": ("data.train", "data.validation", "data.builtin", "task", "teacher", "teachers",
                 "generate", "run.seed"),
    "train": ("student", "train", "run.seed"),
    "evaluate": ("evaluate", "data.test", "task", "teacher", "teachers"),
    "bench": ("serve", "bench", "teacher", "teachers"),
}
#: The stages whose outputs each stage reads.
_READS: dict[str, tuple[str, ...]] = {
    "generate": (), "train": ("generate",), "evaluate": ("train",), "bench": ("train",),
}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _hash_secret(value: Any) -> str:
    # A changed key must still mark the stage stale, without writing the key down.
    return "<secret sha256:" + hashlib.sha256(str(value).encode()).hexdigest()[:12] + ">"


def _prefixes(cfg: DistrayConfig, stage: str) -> tuple[str, ...]:
    own = _OWN[stage]
    if stage == "generate":
        if "test" in cfg.generate.splits:
            own = (*own, "data.test")
        if cfg.demo.train_teacher:
            own = (*own, "demo")
    if stage == "evaluate" and cfg.demo.train_teacher:
        own = (*own, "demo")  # the baseline is trained from demo settings
    if stage == "train" and getattr(cfg.train, "mode", "off_policy") == "on_policy":
        own = (*own, "teacher", "teachers", "generate.logprobs")  # the teacher scores each round
    return own


def settings(cfg: DistrayConfig, stage: str) -> dict[str, Any]:
    """The dotted settings `stage`'s outputs depend on, secrets replaced by a short hash."""
    data = redact(cfg.model_dump(mode="json"), mask=_hash_secret)
    prefixes = _prefixes(cfg, stage)
    return {
        k: v for k, v in sorted(_flat(data).items())
        if any(k == p or k.startswith(p + ".") for p in prefixes)
    }


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Lines `key: old → new` for every setting that differs between two `settings` dicts."""
    return [
        f"{k}: {old.get(k)!r} → {new.get(k)!r}"
        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    ]


def _listing_digest(h: Any, path: str) -> None:
    """Feed the names and sizes of the files under `path` (a file or a folder) into `h`."""
    from pyarrow import fs as pafs

    fs, inner = filesystem_for(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        h.update(b"missing\0")
        return
    files = [info] if info.type == pafs.FileType.File else [
        f for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        if f.type == pafs.FileType.File and "/." not in f.path[len(inner):]
    ]
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path[len(inner):]}\0{f.size}\0".encode())


def _output_digest(cfg: DistrayConfig, stage: str) -> str:
    """A digest of a finished stage's outputs that changes whenever the stage is rerun.

    The summary file each stage writes last (generate's stats.json, train's metrics.jsonl)
    carries the run's timings, so its bytes differ on every run, even when the data or the
    weights happen to come out the same; the file listing catches edits in between.
    """
    p = RunPaths(cfg.run_dir)
    h = hashlib.sha256()
    summary, folder = {
        "generate": (p.generate_stats, p.generate_data),
        "train": (p.train_metrics, p.student),
    }[stage]
    h.update(read_text(summary).encode() if exists(summary) else b"none")
    _listing_digest(h, folder)
    return h.hexdigest()


def input_digests(cfg: DistrayConfig, stage: str) -> dict[str, str]:
    """Digests of what `stage` reads: its input files and the outputs of the stages it reads."""
    out = {s: _output_digest(cfg, s) for s in _READS[stage]}
    files = {"generate": [f"data.{s}" for s in cfg.generate.splits], "evaluate": ["data.test"]}
    for key in files.get(stage, []):
        path = getattr(cfg.data, key.split(".")[1], None)
        if path:
            h = hashlib.sha256()
            _listing_digest(h, path)
            out[key] = h.hexdigest()
    return out


def _path(cfg: DistrayConfig, stage: str) -> str:
    return f"{cfg.run_dir}/{stage}/lineage.json"


def read(cfg: DistrayConfig, stage: str) -> dict[str, Any] | None:
    """The stage's record, or None when it has none (never ran, or ran before records existed)."""
    path = _path(cfg, stage)
    if not exists(path):
        return None
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write(cfg: DistrayConfig, stage: str) -> str:
    """Record, as `stage` starts, its settings and the digests of its inputs; returns the path."""
    path = _path(cfg, stage)
    record = {"stage": stage, "settings": settings(cfg, stage), "inputs": input_digests(cfg, stage)}
    write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def check(cfg: DistrayConfig, stage: str, *, how_to_force: str) -> None:
    """Refuse when `stage` has outputs (finished or partial) made with other settings.

    Raises:
        ConfigError: naming each changed setting as `key: old → new`, and the way out.
    """
    record = read(cfg, stage)
    if record is None:
        return
    old = dict(record.get("settings") or {})
    new = settings(cfg, stage)
    # A setting distray added after the record was written reads as its default there.
    defaults = settings(type(cfg).model_validate(_skeleton(cfg)), stage)
    for key in set(new) - set(old):
        if key in defaults and new[key] == defaults[key]:
            old[key] = new[key]
    diff = changed_settings(old, new)
    if diff:
        more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
        raise ConfigError(
            f"stage {stage}: its outputs in {cfg.run_dir}/{stage} (finished or partial) were made "
            "with other settings: " + "; ".join(diff[:5]) + more
            + f". {how_to_force} to redo {stage} with the new settings, or set a new run.name "
            "to keep both runs"
        )


def _skeleton(cfg: DistrayConfig) -> dict[str, Any]:
    """The smallest config with `cfg`'s required values: everything else at its default."""
    skeleton: dict[str, Any] = {}
    if cfg.student is not None:
        skeleton["student"] = {"model": cfg.student.model or "x"}
    return skeleton


def inputs_changed(cfg: DistrayConfig, stage: str) -> list[str]:
    """The inputs of `stage` that changed since its outputs were made ([] when none, or no record)."""
    record = read(cfg, stage)
    if record is None:
        return []
    old = record.get("inputs") or {}
    new = input_digests(cfg, stage)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
