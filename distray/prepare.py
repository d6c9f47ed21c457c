"""The one place a run is prepared: every face (cli, api, jobs, pipeline) calls `prepare` once.

    cfg = prepare(load_config("jobs/configs/quickstart.yaml"))

Preparing a run turns the config a user wrote into the config every stage and every Ray worker
receives:
- local paths become absolute (Ray workers run in their own working directories);
- offline aliases (`distray models list`) are fetched into the shared model cache, and models
  named by a hub id are downloaded once into `<output_dir>/_models/`;
- a student made from the teacher (`student.from_teacher`) is pruned once into the run folder;
- a built-in task's JSONL files are written into `<run>/data/` and `data.*` point at them;
- the quickstart's stand-ins (`demo.train_teacher`) are built when missing.

The result is validated once, here, and handed unchanged to the stages. `write_record` writes it
into the run folder as `config.resolved.yaml` (secrets redacted).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from distray.config import DistrayConfig, config_from_dict, dump_config
from distray.errors import ConfigError
from distray.paths import RunPaths, is_hub_id

__all__ = [
    "MODEL_FIELDS", "PATH_FIELDS", "absolutize", "check_vocabularies", "fetch_hub_models", "local_paths",
    "prepare", "run_dir_of", "write_record",
]

logger = logging.getLogger(__name__)

#: Config fields that hold a model: a local folder, a hub id, or (teachers) an API model name.
#: Teachers are listed separately because `teachers` is a list and openai teachers hold no path.
MODEL_FIELDS: tuple[tuple[str, str], ...] = (
    ("student", "model"),
    ("student", "tokenizer"),
    ("evaluate", "baseline"),
    ("serve", "model"),
)

#: Config fields that hold a file or folder path (local or URI), never a model.
PATH_FIELDS: tuple[tuple[str, str], ...] = (
    ("run", "output_dir"),
    ("data", "train"),
    ("data", "validation"),
    ("data", "test"),
    ("generate", "cache_dir"),
    ("bench", "prompts"),
)


def _teacher_sections(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(config path, section) of each local teacher (vllm/hf) in a dumped config."""
    out = []
    if data.get("teacher") and data["teacher"].get("kind") != "openai":
        out.append(("teacher", data["teacher"]))
    for i, t in enumerate(data.get("teachers") or []):
        if t.get("kind") != "openai":
            out.append((f"teachers[{i}]", t))
    return out


def _absolutize(data: dict[str, Any]) -> None:
    """Make relative local paths in a dumped config absolute, in place.

    Ray workers (Train workers, engine actors) run in their own working directories, so a path
    relative to where the user typed the command would point nowhere there. Cloud URIs and hub
    ids (`org/name` that is not a local folder) are left alone.
    """
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

    for section, key in PATH_FIELDS:
        fix(data[section], key)
    for _, t in _teacher_sections(data):
        fix(t, "model", model=True)
    for section, key in MODEL_FIELDS:
        fix(data.get(section), key, model=True)


def absolutize(cfg: DistrayConfig) -> DistrayConfig:
    """`cfg` with relative local paths made absolute (see `_absolutize`)."""
    data = cfg.model_dump(mode="json")
    _absolutize(data)
    return DistrayConfig.model_validate(data)


def local_paths(cfg: DistrayConfig) -> dict[str, str]:
    """Config fields that hold a local absolute path, which every node of a cluster must see."""
    data = cfg.model_dump(mode="json")
    fields = {f"{s}.{k}": (data.get(s) or {}).get(k) for s, k in (*PATH_FIELDS, *MODEL_FIELDS)}
    fields.pop("generate.cache_dir", None)  # a per-node cache may be local
    fields.pop("bench.prompts", None)  # read by the driver only
    for at, t in _teacher_sections(data):
        fields[f"{at}.model"] = t.get("model")
    return {
        k: v for k, v in fields.items()
        if isinstance(v, str) and v and "://" not in v and Path(v).is_absolute()
    }


def _fetch_hub_model(value: str, field: str, output_dir: str) -> str:
    """Download a hub id (`org/name`) once into `<output_dir>/_models/` and return the folder.

    The student is read by every Ray Train worker and exported from a folder, so it must be a
    folder; vLLM teachers download hub ids themselves and are left alone.
    """
    base = output_dir
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


def _fetch_models(data: dict[str, Any]) -> None:
    """Replace hub ids in the student, tokenizer, baseline and served model by local folders."""
    for section, key in MODEL_FIELDS:
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str) and is_hub_id(value):
            data[section][key] = _fetch_hub_model(value, f"{section}.{key}", data["run"]["output_dir"])


def fetch_hub_models(cfg: DistrayConfig) -> DistrayConfig:
    """`cfg` with hub ids in the model fields replaced by local folders (downloaded once)."""
    data = cfg.model_dump(mode="json")
    before = repr(data)
    _fetch_models(data)
    return DistrayConfig.model_validate(data) if repr(data) != before else cfg


def _resolve_aliases(data: dict[str, Any]) -> None:
    """Replace offline model aliases (`smollm2-135m-instruct`) by their fetched folders."""
    from distray.models.aliases import ALIASES, resolve_model

    places: list[tuple[dict[str, Any], str]] = [(t, "model") for _, t in _teacher_sections(data)]
    places += [(data[s], k) for s, k in MODEL_FIELDS if data.get(s)]
    for section, key in places:
        if section.get(key) in ALIASES:
            section[key] = resolve_model(section[key])


def _student_from_teacher(cfg: DistrayConfig) -> DistrayConfig:
    """Build `student.from_teacher`'s depth-pruned student once; point student.model at it.

    It goes into `<run>/student-init` (a machine-local cache for a run folder on a bucket, since
    Train workers load the student from a folder), and is rebuilt only when its teacher, layer
    count, selection or calibration file changed.

    Raises:
        ConfigError: the teacher is not a local model folder.
    """
    import json

    ft = cfg.student.from_teacher if cfg.student else None
    if ft is None or cfg.student is None:
        return cfg
    local = [t for t in cfg.all_teachers if t.kind != "openai" and Path(t.model, "config.json").is_file()]
    if not local:
        names = [t.model for t in cfg.all_teachers] or ["(none)"]
        raise ConfigError(
            f"`student.from_teacher` prunes the teacher's layers, but the teacher ({', '.join(names)}) "
            "is not a local model folder; point teacher.model at a folder or an alias "
            "(`distray models list`), or set student.model instead"
        )
    teacher = str(Path(local[0].model).resolve())
    if "://" in cfg.run_dir:
        out = Path("~/.cache/distray/students").expanduser() / cfg.run.name
    else:
        out = Path(cfg.run_dir) / "student-init"
    from distray.models import STUDENT_INFO, make_student

    info_path = out / STUDENT_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    calibration = str(Path(ft.calibration).resolve()) if ft.calibration else None
    wanted = {"teacher": teacher, "layers": ft.layers, "select": ft.select,
              "calibration": (calibration or "built-in") if ft.select == "block-influence" else None}
    if any(info.get(k) != v for k, v in wanted.items()):
        logger.info("student.from_teacher: pruning %s to %d layers (%s) into %s",
                    teacher, ft.layers, ft.select, out)
        make_student(teacher, ft.layers, str(out), ft.select, calibration)
    student = cfg.student.model_copy(update={"model": str(out)})
    return cfg.model_copy(update={"student": student})


def _builtin_data(data: dict[str, Any], run_dir: str) -> None:
    """Write a built-in task's splits into `<run>/data/` (once) and point `data.*` at them."""
    b = data["data"].get("builtin")
    if not b:
        return
    from distray.storage import exists
    from distray.tasks import make_task

    paths = RunPaths(run_dir)
    if not exists(paths.task_split("test")):
        make_task(b["name"], paths.data, b["n_train"], b["seed"],
                  n_validation=b["n_validation"], n_test=b["n_test"])
    data["data"]["train"] = paths.task_split("train")
    data["data"]["validation"] = paths.task_split("validation") if b["n_validation"] else None
    data["data"]["test"] = paths.task_split("test")


def run_dir_of(cfg: DistrayConfig) -> str:
    """The run folder as `prepare` will make it (a local output_dir made absolute)."""
    out = cfg.run.output_dir
    if "://" not in out:
        out = str(Path(out).expanduser().resolve())
    return f"{out.rstrip('/')}/{cfg.run.name}"


#: Every model a run may read; a stage names the ones it reads (`Stage.models`).
ALL_MODELS = ("teacher", "student", "baseline")


def _check_local_models(cfg: DistrayConfig, models: tuple[str, ...] = ALL_MODELS) -> None:
    """A model given as a path (absolute, `./`, `~`) that is not there stops the run at once,
    before Ray starts, instead of deep inside an engine actor. Only the `models` the stage reads
    are checked: generate labels prompts before the student exists.

    Raises:
        ConfigError: naming the field, the path, and how to get the model.
    """
    if cfg.demo.train_teacher:
        return  # the quickstart builds its stand-ins at these paths
    places = [(f"teachers.{i}.model" if cfg.teachers else "teacher.model", t.model)
              for i, t in enumerate(cfg.all_teachers) if t.kind != "openai" and "teacher" in models]
    if cfg.student is not None and not cfg.student.from_teacher and "student" in models:
        places.append(("student.model", cfg.student.model))
    if "baseline" in models:
        places.append(("evaluate.baseline", cfg.evaluate.baseline or ""))
    for field, value in places:
        if not value or "://" in value or is_hub_id(value) or not value.startswith(("/", ".", "~")):
            continue
        if not Path(value).expanduser().exists():
            raise ConfigError(
                f"`{field}` is `{value}`, which does not exist; point it at a Hugging Face model "
                "folder (config.json + safetensors), a hub id (org/name), or an offline alias "
                "(`distray models list`)"
            )


def prepare(cfg: DistrayConfig, *, demo: bool = True, baseline: bool = True,
            models: tuple[str, ...] = ALL_MODELS) -> DistrayConfig:
    """Prepare a run: the config every stage receives.

    Args:
        cfg: the loaded config.
        demo: build the quickstart's stand-in teacher and the student's initial weights when
            `demo.train_teacher` is on and they are missing (serve and bench build nothing).
        baseline: with `demo`, also train the demo baseline student (evaluate needs it).
        models: the models the stage reads (`Stage.models`): only those must exist.

    Returns:
        The prepared config: absolute paths, local model folders, built-in data written, demo
        parts built. Validated once.

    Raises:
        ConfigError: a model could not be fetched, or a setting contradicts another.
    """
    data = cfg.model_dump(mode="json")
    _resolve_aliases(data)
    _absolutize(data)
    _fetch_models(data)
    _builtin_data(data, run_dir_of(cfg))
    cfg = config_from_dict(data, "(prepared)")
    _check_local_models(cfg, models)
    cfg = _student_from_teacher(cfg)
    if demo and cfg.demo.train_teacher:
        from distray.demo import baseline_dir, prepare_demo

        prepare_demo(cfg, baseline=baseline)
        if cfg.evaluate.baseline is None and "baseline" in cfg.evaluate.models:
            ev = cfg.evaluate.model_copy(update={"baseline": baseline_dir(cfg)})
            cfg = cfg.model_copy(update={"evaluate": ev})
    return cfg


def write_record(cfg: DistrayConfig) -> str:
    """Write `config.resolved.yaml` into the run folder (secrets redacted); returns its path."""
    from distray.storage import write_text

    path = RunPaths(cfg.run_dir).resolved_config
    write_text(path, dump_config(cfg))
    return path


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

    from distray.train.vocab import check_vocab, teacher_tokenizers

    teachers = teacher_tokenizers(cfg)
    if not teachers:
        return
    problem = check_vocab(
        AutoTokenizer.from_pretrained(student, trust_remote_code=cfg.student.trust_remote_code),
        int(AutoConfig.from_pretrained(cfg.student.model, trust_remote_code=cfg.student.trust_remote_code).vocab_size),
        [], teachers, student_name=cfg.student.model,
    )
    if problem:
        raise ConfigError(
            f"{problem}. `train.loss: {cfg.train.loss}` distils the teacher's logits, which needs "
            "one tokenizer for teacher and student: pick a student of the teacher's family, or "
            "set train.loss=sft (sequence-level distillation on the teacher's text)"
        )
