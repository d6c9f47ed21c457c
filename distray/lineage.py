"""What each stage's outputs were made from, so a rerun can tell reusable outputs from stale ones.

    cat runs/quickstart/train/lineage.json

When a stage starts it writes `<run>/<stage>/lineage.json` next to its outputs:

    {"stage": "train",
     "settings": {"train.lr": 0.0003, "student.model": "/models/phi-4-mini", ...},
     "inputs": {"generate": "9f2c...", ...}}

`settings` are the answer-changing config values under the prefixes the stage covers
(`Stage.covers`; secrets as a short hash): speed-only settings (`distray.settings`) are never
recorded, so changing them never blocks a resume or a skip. `inputs` are content digests of
what it read: its input files (`distray.digest`: a streamed hash of local files, the ETag of
objects in a bucket) and the content the stages it reads made (`Stage.content`: teacher shards
and rejects, the exported student; never stats, timings, logs or lineage files). A command
that changes nothing therefore leaves every digest as it was. A rerun then:
- refuses to resume or reuse a stage, finished or partial, whose settings changed (`check`),
  naming each change and the ways out that delete nothing;
- reruns a stage whose inputs changed since it ran, which in turn changes its own outputs, so
  everything downstream follows (`inputs_changed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from distray.config import DistrayConfig, redact
from distray.errors import ConfigError
from distray.settings import answer_only
from distray.stages import Stage
from distray.stages import stage as stage_of
from distray.storage import exists, read_text, write_text

__all__ = ["changed_settings", "check", "input_digests", "inputs_changed", "output_digest", "read",
           "settings", "settings_changed", "write"]

logger = logging.getLogger(__name__)


def _stage(stage: str | Stage) -> Stage:
    return stage if isinstance(stage, Stage) else stage_of(stage)


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


def settings(cfg: DistrayConfig, stage: str | Stage) -> dict[str, Any]:
    """The answer-changing dotted settings `stage`'s outputs depend on, secrets as a short hash."""
    data = answer_only(redact(cfg.model_dump(mode="json"), mask=_hash_secret))
    prefixes = _stage(stage).prefixes(cfg)
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


def output_digest(cfg: DistrayConfig, stage: str | Stage) -> str:
    """A digest of the content of a stage's outputs that the next stage reads.

    It covers `Stage.content` (teacher shards and rejects, the exported student's files) and
    nothing else: rerunning a stage that makes the same bytes, or one that had nothing to do,
    leaves it as it was.
    """
    from distray.cluster import EXPORT_MARKER
    from distray.digest import tree_digest

    s = _stage(stage)
    h = hashlib.sha256()
    for path in s.content_paths(cfg.run_dir):
        rel = path[len(cfg.run_dir.rstrip("/")) + 1:]
        # The export records (marker, how it was made) carry times and the command line.
        digest = tree_digest(path, exclude=(EXPORT_MARKER, "distray_export.json", "lineage.json",
                                            "stats.json"))
        h.update(f"{rel}\0{digest}\0".encode())
    return h.hexdigest()


def input_digests(cfg: DistrayConfig, stage: str | Stage) -> dict[str, str]:
    """Digests of what `stage` reads: its input files and the outputs of the stages it reads."""
    from distray.digest import tree_digest

    s = _stage(stage)
    out = {r: output_digest(cfg, r) for r in s.reads}
    for key in s.files(cfg):
        section, _, name = key.partition(".")
        path = getattr(getattr(cfg, section), name, None)
        if path:
            out[key] = tree_digest(str(path))
    return out


def _path(cfg: DistrayConfig, stage: str) -> str:
    return f"{cfg.run_dir}/{stage}/lineage.json"


def read(cfg: DistrayConfig, stage: str | Stage) -> dict[str, Any] | None:
    """The stage's record, or None when it has none (never ran, or ran before records existed)."""
    path = _path(cfg, _stage(stage).name)
    if not exists(path):
        return None
    try:
        data = json.loads(read_text(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write(cfg: DistrayConfig, stage: str | Stage) -> str:
    """Record, as `stage` starts, its settings and the digests of its inputs; returns the path."""
    s = _stage(stage)
    path = _path(cfg, s.name)
    record = {"stage": s.name, "settings": settings(cfg, s), "inputs": input_digests(cfg, s)}
    write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def _answer_part(record_settings: dict[str, Any]) -> dict[str, Any]:
    """A recorded settings dict without its speed-only settings (records written before the
    classification hold them too)."""
    from distray.settings import speed_only

    out: dict[str, Any] = {}
    for k, v in record_settings.items():
        if speed_only(k):
            continue
        out[k] = answer_only(v, k) if isinstance(v, (dict, list)) else v
    return out


def _cli_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) or value is None else str(value)


def check(cfg: DistrayConfig, stage: str | Stage, *, force_hint: str) -> None:
    """Refuse when `stage` has outputs (finished or partial) made with other settings.

    Args:
        cfg: the prepared config.
        stage: the stage.
        force_hint: the command that would redo the stage (`distray run CONFIG --force train`).

    Raises:
        ConfigError: naming each changed setting as `key: old → new`, the ways out that keep
            the outputs (a new run.name, or the old values), and what `--force` would delete.
    """
    s = _stage(stage)
    record = read(cfg, s.name)
    if record is None:
        return
    old = _answer_part(dict(record.get("settings") or {}))
    new = settings(cfg, s)
    # A setting distray added after the record was written reads as its default there.
    defaults = settings(type(cfg).model_validate(_skeleton(cfg)), s)
    for key in set(new) - set(old):
        if key in defaults and new[key] == defaults[key]:
            old[key] = new[key]
    diff = changed_settings(old, new)
    if not diff:
        return
    more = f"\n  (and {len(diff) - 8} more)" if len(diff) > 8 else ""
    back = " ".join(f"{k}={_cli_value(old.get(k))}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k))[:400]
    folders = ", ".join(f for f in s.folders(cfg.run_dir) if exists(f)) or f"{cfg.run_dir}/{s.name}"
    cost = s.cost_line(cfg)
    raise ConfigError(
        f"stage {s.name}: its outputs in {folders} (finished or partial) were made with other "
        "settings:\n  " + "\n  ".join(diff[:8]) + more + "\n"
        "To keep them, either\n"
        f"  - start a new run beside this one: add `run.name={cfg.run.name}-2` (nothing is "
        "deleted, nothing is shared), or\n"
        f"  - resume with the old values: add `{back}`.\n"
        f"`{force_hint}` would DELETE {folders}" + (f" ({cost})" if cost else "")
        + f" and redo {s.name} with the new settings."
    )


def settings_changed(cfg: DistrayConfig, stage: str | Stage) -> list[str]:
    """`key: old → new` for each answer-changing setting that differs from the stage's record
    ([] when none, or no record)."""
    record = read(cfg, stage)
    if record is None:
        return []
    return changed_settings(_answer_part(dict(record.get("settings") or {})), settings(cfg, stage))


def _skeleton(cfg: DistrayConfig) -> dict[str, Any]:
    """The smallest config with `cfg`'s required values: everything else at its default."""
    skeleton: dict[str, Any] = {}
    if cfg.student is not None:
        skeleton["student"] = {"model": cfg.student.model or "x"}
    return skeleton


def inputs_changed(cfg: DistrayConfig, stage: str | Stage) -> list[str]:
    """The inputs of `stage` that changed since its outputs were made ([] when none, or no record)."""
    record = read(cfg, stage)
    if record is None:
        return []
    old = record.get("inputs") or {}
    new = input_digests(cfg, stage)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
