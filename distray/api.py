"""`DistillationJob`: the seed's Azure-shaped Python face over the same config as the CLI.

    python examples/seed_azure_example.py

```python
from distray import DistillationJob

job = DistillationJob(
    teacher_model="deepseek-ai/DeepSeek-V3",        # hub id / folder → vLLM; "gpt-4o" → API
    student_model="microsoft/Phi-4-mini-instruct",
    training_data="train.jsonl",
    validation_data="val.jsonl",
    task_type="conversation",
    hyperparameters={"learning_rate": 2e-5, "batch_size": 2, "num_epochs": 3, "temperature": 0.7},
)
job.run()                                    # on the local or connected Ray
job.submit("http://127.0.0.1:8265"); job.wait()   # or as a Ray job
job.evaluate("test.jsonl", metrics=["accuracy", "bleu_score", "inference_time"])
```
Every argument lands in `job.config` (a `DistrayConfig`); nothing lives beside it, so
`DistillationJob.from_config(path)` and YAML give the same job.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from distray.config import (
    DistrayConfig,
    config_from_dict,
    dump_config,
    load_config,
    redact,
    secret_env,
)
from distray.errors import ConfigError, StageError, UsageError

__all__ = ["DistillationJob", "HYPERPARAMETERS", "METRICS"]

logger = logging.getLogger(__name__)

#: The seed's hyperparameter names (and a few more) → dotted config paths.
HYPERPARAMETERS: dict[str, str] = {
    "learning_rate": "train.lr",
    "batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "num_epochs": "train.epochs",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "max_seq_len": "train.max_seq_len",
    "max_seq_length": "train.max_seq_len",
    "loss": "train.loss",
    "alpha": "train.alpha",
    # The seed's "temperature: teacher output softness" is how soft the teacher's answers are:
    # its sampling temperature. The logit-KD temperature has its own name.
    "temperature": "generate.sampling.temperature",
    "kd_temperature": "train.temperature",
    "max_tokens": "generate.sampling.max_tokens",
    "top_p": "generate.sampling.top_p",
    "num_samples": "generate.sampling.n",
    "logprobs": "generate.logprobs",
    "num_workers": "train.num_workers",
    "zero_stage": "train.zero_stage",
    "seed": "run.seed",
    "enable_chain_of_thought": "task.chain_of_thought",
}

#: The seed's evaluation metric names → distray scorers. "accuracy" is the task's primary
#: scorer (the first of `evaluate.scorers` that is not teacher_agreement); None means
#: "always measured" (latency, memory and throughput come with every evaluation).
METRICS: dict[str, str | None] = {
    "accuracy": None,
    "exact_match": "exact_match",
    "bleu_score": "bleu",
    "bleu": "bleu",
    "rouge": "rouge_l",
    "rouge_l": "rouge_l",
    "f1": "f1",
    "numeric": "numeric",
    "choice": "choice",
    "teacher_agreement": "teacher_agreement",
    "inference_time": None,
    "latency": None,
    "memory": None,
    "throughput": None,
    # White-box fidelity: measured whenever teacher and student share a tokenizer
    # (`evaluate.fidelity`), so asking for them adds nothing to the scorers.
    "teacher_nll": None,
    "token_agreement": None,
    "rouge_l_vs_teacher": None,
    "fidelity": None,
}


def _scorers_with(configured: list[str], metrics: list[str]) -> list[str]:
    """`configured` scorers plus those `metrics` ask for (seed names; see METRICS), in order.

    "accuracy" is the task's primary scorer: the first configured one that is not
    teacher_agreement (exact_match when there is none).

    Raises:
        ConfigError: a metric name METRICS does not know.
    """
    primary = next((s for s in configured if s != "teacher_agreement"), "exact_match")
    out = list(configured)
    for m in metrics:
        if m not in METRICS:
            close = difflib.get_close_matches(m, list(METRICS), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(f'`{c}`' for c in close)}? " if close else ""
            raise ConfigError(f"metric `{m}` is unknown; {hint}valid names: {', '.join(METRICS)}")
        s = primary if m == "accuracy" else METRICS[m]
        if s and s not in out:
            out.append(s)
    return out


def _is_local_address(address: str) -> bool:
    """True when a Ray address names this machine (127.0.0.1, localhost, ::1)."""
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"http://{address}").hostname
    return host in ("127.0.0.1", "localhost", "::1")


def _inline_secrets(cfg: DistrayConfig) -> list[str]:
    """Dotted config paths (outside `resources.env`) whose values `redact` would mask."""
    data = cfg.model_dump(mode="json")
    data["resources"]["env"] = {}

    def walk(a: Any, b: Any, at: str) -> list[str]:
        if isinstance(a, dict):
            return [p for k in a for p in walk(a[k], b[k], f"{at}.{k}" if at else str(k))]
        if isinstance(a, list):
            return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in walk(x, y, f"{at}[{i}]")]
        return [at] if a != b else []

    return walk(data, redact(data), "")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def _teacher_from(model: str | dict[str, Any]) -> dict[str, Any]:
    """A teacher section from the seed's `teacher_model`.

    A dict is a teacher section as is. A string that is a local folder or a hub id
    (`org/name`) is a vLLM teacher; any other name (`gpt-4o`, `deepseek-chat`) is an
    OpenAI-compatible API model.
    """
    if isinstance(model, dict):
        return dict(model)
    if Path(model).is_dir() or "/" in model:
        return {"kind": "vllm", "model": model}
    return {"kind": "openai", "model": model}


class DistillationJob:
    """A distillation run, built from the seed's argument names or any config section.

    Args:
        teacher_model: hub id or folder (vLLM teacher), API model name (OpenAI-compatible
            teacher), or a full `teacher` section as a dict.
        student_model: the student's folder or hub id.
        training_data: prompts (JSONL/Parquet, local or a cloud URI).
        validation_data: validation prompts.
        test_data: held-out test prompts for evaluate and bench.
        task_type: custom, nli, conversation, qa, math or summarization (a preset of defaults).
        hyperparameters: seed names (`learning_rate`, `batch_size`, `num_epochs`,
            `temperature`; see `HYPERPARAMETERS`) or dotted config paths (`train.zero_stage`).
        name: run name (`run.name`).
        output_dir: where run folders go (`run.output_dir`).
        **sections: any config section as a dict (`serve={...}`, `train={...}`).

    Raises:
        ConfigError: unknown hyperparameter or setting (with the closest names), bad values.
    """

    def __init__(
        self,
        teacher_model: str | dict[str, Any] | None = None,
        student_model: str | None = None,
        training_data: str | None = None,
        validation_data: str | None = None,
        test_data: str | None = None,
        task_type: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        output_dir: str | None = None,
        **sections: Any,
    ) -> None:
        data: dict[str, Any] = copy.deepcopy(sections)
        if teacher_model is not None:
            data["teacher"] = {**_teacher_from(teacher_model), **data.get("teacher", {})}
        if student_model is not None:
            data.setdefault("student", {})["model"] = student_model
        for key, value in (("train", training_data), ("validation", validation_data), ("test", test_data)):
            if value is not None:
                data.setdefault("data", {})[key] = str(value)
        if task_type is not None:
            data.setdefault("task", {})["type"] = task_type
        if name is not None:
            data.setdefault("run", {})["name"] = name
        if output_dir is not None:
            data.setdefault("run", {})["output_dir"] = str(output_dir)
        for key, value in (hyperparameters or {}).items():
            if "." in key:
                dotted = key
            elif key in HYPERPARAMETERS:
                dotted = HYPERPARAMETERS[key]
            else:
                close = difflib.get_close_matches(key, list(HYPERPARAMETERS), n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else (
                    f"known names: {', '.join(sorted(HYPERPARAMETERS))}, or a dotted config path "
                    "such as train.zero_stage"
                )
                raise ConfigError(f"hyperparameter `{key}` is not a setting; {hint}")
            _set_dotted(data, dotted, value)
        self._config = config_from_dict(data, "(DistillationJob)")
        self._job_id: str | None = None
        self._client: Any = None

    # ---- config --------------------------------------------------------------------------

    @property
    def config(self) -> DistrayConfig:
        """The resolved config every stage receives."""
        return self._config

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], overrides: list[str] | None = None) -> DistillationJob:
        """A job from a YAML config (the same file `distray run` takes)."""
        job = cls.__new__(cls)
        job._config = load_config(path, overrides)
        job._job_id = None
        job._client = None
        return job

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The config as YAML (secret-looking `resources.env` values redacted); written to `path`
        when given."""
        text = dump_config(self._config)
        if path is not None:
            Path(path).write_text(text)
        return text

    # ---- running -------------------------------------------------------------------------

    def run(self, stages: list[str] | None = None, force: bool = False) -> Any:
        """Run the pipeline on the local (embedded) or connected Ray; returns PipelineResult."""
        from distray.pipeline import run

        return run(self._config, stages=stages, force=force)

    def submit(
        self,
        address: str = "http://127.0.0.1:8265",
        runtime_env: dict[str, Any] | None = None,
        stages: list[str] | None = None,
    ) -> str:
        """Submit the pipeline as a Ray job (Ray's JobSubmissionClient); returns the job id.

        The job's working dir holds the resolved config and a copy of the distray package, so
        the cluster needs only Ray and the stack installed, as `ray job submit --working-dir .`.
        Ray uploads it during submission; the local temporary copy is removed afterwards.
        `runtime_env` passes through (`env_vars`, `pip`, `py_modules`, ...) except
        `working_dir`, which distray sets: add your own code with `py_modules`, and data as
        absolute paths or URIs in the config.

        Data paths (`data.*`), `run.output_dir` and local model folders are made absolute on
        this machine, so the cluster must see the same filesystem (a shared/NFS mount at the
        same path), or the config must use cloud URIs (s3://, gs://) for them. A warning is
        logged when `address` is not this machine and the config has such local paths.

        Raises:
            UsageError: `runtime_env` sets `working_dir`.
        """
        from ray.job_submission import JobSubmissionClient

        from distray.prepare import absolutize, local_paths

        if runtime_env and "working_dir" in runtime_env:
            raise UsageError(
                f"`runtime_env['working_dir']` ({runtime_env['working_dir']!r}) is set by distray "
                "(it ships the config and the distray package); drop it, and add your code with "
                "`runtime_env['py_modules']` and data as absolute paths or URIs in the config"
            )
        # The job runs in its own working dir: local paths must be absolute to mean the same.
        cfg = absolutize(self._config)
        if not _is_local_address(address):
            local = local_paths(cfg)
            if local:
                logger.warning(
                    "submitting to %s with local paths %s: the cluster's nodes must see them at "
                    "the same path (shared/NFS filesystem), or use cloud URIs (s3://, gs://)",
                    address, ", ".join(f"{k}={v}" for k, v in local.items()),
                )
        entry = "python -m distray run distray_config.yaml"
        if stages:
            from distray.pipeline import STAGES

            unknown = [st for st in stages if st not in STAGES]
            if unknown:
                raise UsageError(f"`stages` has {unknown}; choose from {', '.join(STAGES)}")
            entry += f" --stages {shlex.quote(','.join(stages))}"
        secrets = secret_env(cfg)
        inline = _inline_secrets(cfg)
        if inline:
            logger.warning(
                "the config holds credentials at %s; they travel inside the job's working dir. "
                "Put them in environment variables instead (teacher.api_key_env, resources.env "
                "with a secret-looking name), which the job receives as env vars only",
                ", ".join(inline),
            )
        work = Path(tempfile.mkdtemp(prefix="distray-job-"))
        try:
            # Secret resources.env entries are left out of the file: they travel as the job's
            # environment variables, which Ray gives every worker of the job.
            (work / "distray_config.yaml").write_text(
                dump_config(cfg, redact_secrets=False, drop_secret_env=True)
            )
            pkg = Path(__file__).resolve().parent
            shutil.copytree(pkg, work / "distray", ignore=shutil.ignore_patterns("__pycache__"))
            env = {**(runtime_env or {}), "working_dir": str(work)}
            env["env_vars"] = {**secrets, **(env.get("env_vars") or {})}
            # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override an explicit address (inside
            # a Ray job or after a local run they point elsewhere); the address asked for wins.
            keys = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
            saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
            try:
                self._client = JobSubmissionClient(address)
            finally:
                os.environ.update(saved)
            # Right after `ray start` the dashboard answers before its job agent is up; Ray says
            # "No available agent to submit job, please try again later", so do that, briefly.
            deadline = time.monotonic() + 120
            while True:
                try:
                    self._job_id = self._client.submit_job(entrypoint=entry, runtime_env=env)
                    break
                except RuntimeError as e:
                    if "No available agent" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(2)
        finally:
            # submit_job has uploaded the working dir as a package by the time it returns.
            shutil.rmtree(work, ignore_errors=True)
        logger.info("submitted Ray job %s to %s", self._job_id, address)
        return self._job_id

    def _require_job(self) -> tuple[Any, str]:
        if self._client is None or self._job_id is None:
            raise UsageError("no job submitted yet; call job.submit(address) first")
        return self._client, self._job_id

    def status(self) -> str:
        """The Ray job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        client, job_id = self._require_job()
        return str(client.get_job_status(job_id).value)

    def logs(self) -> str:
        """The Ray job's driver log so far."""
        client, job_id = self._require_job()
        return str(client.get_job_logs(job_id))

    def wait(self, timeout_s: float = 3600.0, poll_s: float = 2.0) -> str:
        """Block until the job ends; returns its final status.

        Raises:
            StageError: the job failed or was stopped (the log's tail is in the message), or
                did not end within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            if time.monotonic() > deadline:
                raise StageError(f"Ray job {self._job_id} still {status} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        if status != "SUCCEEDED":
            tail = "\n".join(self.logs().splitlines()[-30:])
            raise StageError(f"Ray job {self._job_id} ended {status}; last log lines:\n{tail}")
        return status

    # ---- evaluation ----------------------------------------------------------------------

    def evaluate(
        self,
        test_data: str | None = None,
        metrics: list[str] | None = None,
        baseline_model: str | None = None,
    ) -> dict[str, Any]:
        """Score teacher, distilled student and baseline on `test_data`; returns a plain dict.

        Trains nothing: the distilled student must exist (`run(["generate", "train"])`).

        Args:
            test_data: test prompts with references; default `data.test` (or the built-in
                task's test split).
            metrics: seed names (`accuracy`, `bleu_score`, `inference_time`, ...; see METRICS),
                added to the config's `evaluate.scorers` (the preset's stay). `accuracy` is the
                task's primary scorer. Latency, memory and throughput are always measured.
            baseline_model: model to compare against; default `evaluate.baseline`, else the
                baseline `run()` trained on `demo.baseline_labels` labels (when the demo built
                one), else the student before distillation (`student.model`).

        Returns:
            `{"metrics_path", "report_path", "predictions": {model: parquet},
            "plots": [png], "models": {model: {figure: value}},
            "comparison": {"scorer", "teacher_<scorer>", "student_<scorer>",
            "baseline_<scorer>", "accuracy_retention_pct", "latency_reduction_pct",
            "memory_reduction_pct", "accuracy_gain_pts"}}`; metrics.json at `metrics_path`
            has every figure.

        Raises:
            ConfigError: an unknown metric name (with the valid ones), no test data.
            StageError: the distilled student is not trained yet.
        """
        from distray import lineage
        from distray.evaluate.runner import run as evaluate_run
        from distray.lease import hold
        from distray.report import build_report

        cfg = self._evaluate_config(test_data, metrics, baseline_model)
        # As `distray evaluate` does: one writer in the run folder, and a lineage record, so a
        # later `distray run` knows what these outputs were made from.
        with hold(cfg.run_dir):
            lineage.write(cfg, "evaluate")
            out = _plain(evaluate_run(cfg))
            out["report_path"] = build_report(cfg.run_dir)
        return out

    def _evaluate_config(
        self, test_data: str | None, metrics: list[str] | None, baseline_model: str | None
    ) -> DistrayConfig:
        """The config `evaluate()` hands the evaluate stage (see there)."""
        from distray.demo import baseline_dir
        from distray.prepare import absolutize, prepare
        from distray.storage import exists

        data = self._config.model_dump(mode="json")
        ev = data["evaluate"]
        ev["scorers"] = _scorers_with(ev["scorers"], metrics or ["accuracy"])
        if baseline_model is not None:
            ev["baseline"] = baseline_model
        # demo=False: evaluate trains nothing (no stand-in teacher, no baseline); it uses the
        # baseline run() built when there is one.
        cfg = prepare(config_from_dict(data, "(DistillationJob.evaluate)"), demo=False)
        update: dict[str, Any] = {}
        if test_data is not None:
            # prepare points data.test at a built-in task's split; the caller's file wins.
            update["data"] = cfg.data.model_copy(update={"test": str(test_data)})
        base = baseline_dir(cfg)
        wants_default = cfg.evaluate.baseline is None and "baseline" in cfg.evaluate.models
        if wants_default and exists(f"{base}/model.safetensors"):
            update["evaluate"] = cfg.evaluate.model_copy(update={"baseline": base})
        elif wants_default and cfg.demo.train_teacher:
            logger.warning(
                "evaluate: the demo baseline %s is not built yet, so the baseline is the untrained "
                "student.model; run job.run() first to train it on %d labels",
                base, cfg.demo.baseline_labels,
            )
        return absolutize(cfg.model_copy(update=update)) if update else cfg


def _plain(result: Any) -> dict[str, Any]:
    """An evaluate result (dataclass or dict) as a plain dict of built-in types."""
    import dataclasses
    import json

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    return json.loads(json.dumps(result, default=str))
