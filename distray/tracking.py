"""Experiment tracking: a run's config, train curves, evaluate table, bench figures and report.

    tracking: {mlflow: {}}                       # a local MLflow store at <output_dir>/mlruns
    tracking: {mlflow: {tracking_uri: http://mlflow:5000}, tensorboard: true}

    mlflow ui --backend-store-uri runs/mlruns    # then open http://127.0.0.1:5000

`log_run` is called by the pipeline when a run's stages are done, and logs what they wrote into
the run folder: the resolved config (as params and as an artifact), every train step's numeric
metrics (`train/loss`, `train/lr`, ... at their step), the evaluate table per model
(`evaluate/student/exact_match`, ...) and its headline, each bench sweep point
(`bench/<endpoint>/c16/median_ttft_ms`, ...), and report.md with its PNGs.

It reads the run folder instead of hooking into Ray Train's workers (`ray.air.integrations`):
a distray run spans several processes and reruns (generate resumes, train restarts from a
checkpoint, stages are skipped), and one MLflow run per distray run, holding every stage's
figures exactly once, is what a reader of the tracker expects. Each stage is logged when its
outputs are new; `<run>/logs/tracking.json` remembers what was logged.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from distray.config import DistrayConfig, dump_config
from distray.paths import RunPaths
from distray.storage import exists, list_files, read_text, write_text

__all__ = ["log_run", "metrics_of"]

logger = logging.getLogger(__name__)


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def metrics_of(cfg: DistrayConfig) -> dict[str, list[tuple[str, float, int]]]:
    """Every figure the run folder holds, by stage: `(name, value, step)`.

    Returns:
        `{"train": [...], "evaluate": [...], "bench": [...]}`; a stage without outputs is absent.
    """
    p = RunPaths(cfg.run_dir)
    out: dict[str, list[tuple[str, float, int]]] = {}
    if exists(p.train_metrics):
        rows = []
        for line in read_text(p.train_metrics).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not rec.get("final"):
                step = rec["step"]
                rows += [(f"train/{k}", v, step) for k, v in _numeric(rec).items() if k != "step"]
        out["train"] = rows
    if exists(p.eval_metrics):
        m = json.loads(read_text(p.eval_metrics))
        rows = []
        for role, fig in (m.get("models") or {}).items():
            rows += [(f"evaluate/{role}/{k}", v, 0) for k, v in _numeric(fig).items()]
            rows += [(f"evaluate/{role}/{k}", v, 0) for k, v in _numeric(fig.get("scores") or {}).items()]
        rows += [(f"evaluate/headline/{k}", v, 0) for k, v in _numeric(m.get("headline") or {}).items()]
        out["evaluate"] = rows
    if exists(p.bench_results):
        b = json.loads(read_text(p.bench_results))
        rows = []
        for point in b.get("points") or []:
            load = f"c{point['concurrency']}" if point.get("concurrency") else f"r{point.get('request_rate_rps')}"
            name = str(point.get("endpoint", "endpoint")).replace("/", "_")
            rows += [(f"bench/{name}/{load}/{k}", v, 0) for k, v in _numeric(point).items()
                     if k not in ("concurrency", "request_rate_rps")]
        out["bench"] = rows
    return out


def _digest(cfg: DistrayConfig, stage: str) -> str | None:
    """The stage's lineage record text: new outputs get a new record (see distray.lineage)."""
    path = f"{cfg.run_dir}/{stage}/lineage.json"
    marker = {"train": RunPaths(cfg.run_dir).train_metrics, "evaluate": RunPaths(cfg.run_dir).eval_metrics,
              "bench": RunPaths(cfg.run_dir).bench_results}[stage]
    parts = [read_text(p) for p in (path, marker) if exists(p)]
    if not parts:
        return None
    import hashlib

    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _flat_params(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(_flat_params(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: str(data)[:500]}  # MLflow caps a param value at 500 characters


def log_run(cfg: DistrayConfig) -> dict[str, int]:
    """Log the run folder's new figures to the configured trackers.

    Returns:
        Figures logged per stage (empty when tracking is off or nothing was new).
    """
    t = cfg.tracking
    if not t.enabled:
        return {}
    state_path = f"{cfg.run_dir}/logs/tracking.json"
    state = json.loads(read_text(state_path)) if exists(state_path) else {}
    figures = metrics_of(cfg)
    new = {s: rows for s, rows in figures.items() if _digest(cfg, s) != state.get(s)}
    counts = {s: len(rows) for s, rows in new.items()}
    if t.mlflow is not None:
        state["mlflow_run_id"] = _log_mlflow(cfg, new, state.get("mlflow_run_id"))
    if t.tensorboard:
        _log_tensorboard(cfg, new)
    for s in new:
        state[s] = _digest(cfg, s)
    write_text(state_path, json.dumps(state, indent=1) + "\n")
    logger.info("tracking: logged %s", ", ".join(f"{s} ({n} figures)" for s, n in counts.items()) or "nothing new")
    return counts


def _log_mlflow(cfg: DistrayConfig, new: dict[str, list[tuple[str, float, int]]], run_id: str | None) -> str:
    try:
        import mlflow
    except ImportError as e:
        from distray.errors import ConfigError

        raise ConfigError(
            "`tracking.mlflow` is set but MLflow is not installed; `pip install mlflow-skinny` "
            "(or mlflow), or remove tracking.mlflow"
        ) from e
    m = cfg.tracking.mlflow
    assert m is not None
    uri = m.tracking_uri or f"{cfg.run.output_dir.rstrip('/')}/mlruns"
    if "://" not in uri and not uri.startswith(("file:", "sqlite:", "databricks")):
        # A local folder store: MLflow 3 keeps it behind an opt-in; it is what needs no server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = "file:" + os.path.abspath(os.path.expanduser(uri))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(m.experiment)
    p = RunPaths(cfg.run_dir)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run.name) as run:
        if run_id is None:
            import yaml

            mlflow.set_tag("distray.run_dir", cfg.run_dir)
            params = _flat_params(yaml.safe_load(dump_config(cfg)))
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(items[i:i + 100]))
            mlflow.log_text(dump_config(cfg), "config.resolved.yaml")
        for rows in new.values():
            for name, value, step in rows:
                mlflow.log_metric(name.replace("%", "pct"), value, step=step)
        if exists(p.report):
            mlflow.log_text(read_text(p.report), "report.md")
        for folder in (p.train, p.evaluate, p.bench):
            if exists(folder):
                for png in list_files(folder, (".png",)):
                    if "://" not in png:
                        mlflow.log_artifact(png, artifact_path=os.path.basename(os.path.dirname(png)))
        return str(run.info.run_id)


def _log_tensorboard(cfg: DistrayConfig, new: dict[str, list[tuple[str, float, int]]]) -> None:
    from tensorboardX import SummaryWriter  # ships with ray[train]

    log_dir = f"{cfg.run_dir}/logs/tensorboard"
    writer = SummaryWriter(log_dir)
    try:
        for rows in new.values():
            for name, value, step in rows:
                writer.add_scalar(name, value, step)
        if exists(RunPaths(cfg.run_dir).report):
            writer.add_text("report", read_text(RunPaths(cfg.run_dir).report))
    finally:
        writer.close()
