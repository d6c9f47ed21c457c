"""Consolidate a DeepSpeed checkpoint into a Hugging Face folder that vLLM and from_pretrained load.

    python -c "from distray.train.export import export_checkpoint; \
        export_checkpoint('runs/x/train/checkpoints/checkpoint_00000100', 'models/student', 'out')"

Consolidation uses DeepSpeed's own `zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`,
which merges the fp32 master weights of ZeRO stage 1, 2 and 3 shards (stage 0 checkpoints hold the
whole module already). It runs after training, in one process, from the checkpoint in storage:
the worker group (and its GPU memory) is gone by then, any checkpoint of a run can be exported the
same way, and fp32 master weights are exported rather than a bf16 copy. It needs CPU memory for
the fp32 weights plus one rank's optimizer partition at a time.

The weights are loaded into the student's own architecture (LoRA adapters are merged first), cast
to the student's dtype, and written with `save_pretrained` (one model.safetensors),
next to the student's tokenizer files and chat template. The token training ended answers with
(the chat template's end of turn, e.g. `<|im_end|>`) joins `generation_config.eos_token_id`, so
vLLM and `generate` stop where the trained student stops, not only at the base model's eos.

The folder is complete when its marker (`distray.cluster.EXPORT_MARKER`, the files and sizes
written) exists: locally the finished folder is renamed into place, on an object store the old
marker is removed first and the new one written after every file (`pipeline.stage_done`).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from typing import Any

from distray.cluster import EXPORT_MARKER
from distray.errors import StageError
from distray.lease import Fence

__all__ = ["checkpoint_uri", "export_checkpoint", "export_source", "latest_tag", "load_checkpoint_state_dict"]

logger = logging.getLogger(__name__)


def export_source(result: Any) -> Any:
    """The checkpoint of a Ray Train result to export: the best one when early stopping ended
    the run (its `best_step`), else the latest.

    Args:
        result: a `ray.train.Result` (`metrics`, `checkpoint`, `best_checkpoints`).

    Returns:
        A `ray.train.Checkpoint`; the latest when the best one has been deleted.
    """
    m = result.metrics or {}
    if not m.get("early_stopped") or m.get("best_step") is None:
        return result.checkpoint
    name = f"checkpoint_{int(m['best_step']):08d}"
    for ckpt, _ in result.best_checkpoints or []:
        if ckpt.path.rstrip("/").endswith(name):
            logger.info("early stopping: exporting the best checkpoint, %s", name)
            return ckpt
    logger.warning("early stopping: best checkpoint %s is gone; exporting the latest", name)
    return result.checkpoint


def checkpoint_uri(checkpoint: Any, out_dir: str) -> str:
    """Where a Ray Train checkpoint is, as a path or URI any process can open.

    Ray Train gives a checkpoint's path inside its own filesystem: on a bucket that is
    `bucket/runs/x/train/checkpoints/checkpoint_00000004`, without the scheme, which would
    read as a local path; the scheme of the train folder `out_dir` is put back.
    """
    path = str(checkpoint.path)
    if "://" in out_dir and "://" not in path:
        return f"{out_dir.split('://', 1)[0]}://{path.lstrip('/')}"
    return path


def latest_tag(checkpoint_dir: str) -> str:
    """The DeepSpeed tag (sub-folder) named by the checkpoint's `latest` file.

    Raises:
        StageError: no `latest` file (not a DeepSpeed checkpoint folder).
    """
    path = os.path.join(checkpoint_dir, "latest")
    if not os.path.isfile(path):
        raise StageError(
            f"`{checkpoint_dir}` is not a DeepSpeed checkpoint (no `latest` file); pass a "
            "folder under <run>/train/checkpoints/"
        )
    with open(path) as f:
        return f.read().strip()


def load_checkpoint_state_dict(checkpoint_dir: str, tag: str | None = None) -> dict[str, Any]:
    """The full fp32 state dict of a DeepSpeed checkpoint (any ZeRO stage), keys as in the module.

    Args:
        checkpoint_dir: folder holding `latest` and the tag sub-folder.
        tag: the tag; default the one in `latest`.
    """
    import torch

    tag = tag or latest_tag(checkpoint_dir)
    tag_dir = os.path.join(checkpoint_dir, tag)
    stage0 = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    optim_files = [f for f in os.listdir(tag_dir) if f.endswith("optim_states.pt")]
    if os.path.isfile(stage0) and not optim_files:
        # ZeRO stage 0: the module is saved whole, and everything in the file is tensors and
        # plain containers, so it is loaded as data: a file carrying code is refused, not run.
        try:
            sd = torch.load(stage0, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as e:
            raise StageError(
                f"`{stage0}` holds objects other than tensors and plain data; distray does not "
                "unpickle it. Export only checkpoints this run (or another you trust) wrote"
            ) from e
        return {k: v.float() for k, v in sd.items()}
    # ZeRO 1-3: DeepSpeed's own loader unpickles its optimizer-state files (they hold DeepSpeed
    # objects, which `weights_only=True` rejects), so a checkpoint folder is trusted code, as
    # DeepSpeed's format requires; the same holds for `engine.load_checkpoint` on resume.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    # DeepSpeed may hand back lazy tensors; materialise them for load_state_dict.
    return {k: (v.contiguous() if hasattr(v, "contiguous") else v) for k, v in sd.items()}


def export_checkpoint(
    checkpoint_dir: str,
    base_model: str,
    out_dir: str,
    *,
    tokenizer: str | None = None,
    lora: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    fence: Fence | None = None,
    record: dict[str, Any] | None = None,
) -> str:
    """Write a DeepSpeed checkpoint of `base_model` as a Hugging Face model folder.

    Args:
        checkpoint_dir: the DeepSpeed checkpoint (local path, or a URI Ray Train can download).
        base_model: the student folder training started from (architecture, dtype, config).
        out_dir: folder to (re)write; local path or cloud URI.
        tokenizer: tokenizer folder; default `base_model`.
        lora: the LoRA settings used in training (`LoraConfig` fields r/alpha/dropout/
            target_modules), or None; adapters are merged into the weights.
        trust_remote_code: allow model code from the model folder.
        fence: the run folder lease's fence, checked before the old student is replaced.
        record: how the student was made (`train.records.export_record`), written as
            `distray_export.json` in the folder, before its marker.

    Returns:
        `out_dir`.

    Raises:
        StageError: the checkpoint does not fit the base model's architecture, or `fence` is no
            longer the lease's (another run took the folder over; nothing is replaced).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local_ckpt = checkpoint_dir
    tmp_ckpt = None
    if "://" in checkpoint_dir:
        import ray.train

        tmp_ckpt = tempfile.mkdtemp(prefix="distray-export-ckpt-")
        local_ckpt = ray.train.Checkpoint(checkpoint_dir).to_directory(tmp_ckpt)
    try:
        state_dict = load_checkpoint_state_dict(local_ckpt)
    finally:
        if tmp_ckpt:
            shutil.rmtree(tmp_ckpt, ignore_errors=True)

    base_cfg = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    dtype = getattr(base_cfg, "dtype", None) or getattr(base_cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model: Any = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora["r"],
                lora_alpha=lora["alpha"],
                lora_dropout=lora.get("dropout", 0.0),
                target_modules=lora["target_modules"],
                task_type="CAUSAL_LM",
            ),
        )
    result = model.load_state_dict(state_dict, strict=False)
    # Tied weights (lm_head = embeddings) are stored once; their second name may be absent.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    tie_embeddings = bool(getattr(base_cfg, "tie_word_embeddings", False))
    missing = [
        k
        for k in result.missing_keys
        if k not in tied and not (tie_embeddings and k.endswith("lm_head.weight"))
    ]
    if missing or result.unexpected_keys:
        raise StageError(
            f"checkpoint `{checkpoint_dir}` does not match the student `{base_model}`: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}; export with the "
            "student.model (and student.lora) the run trained"
        )
    if lora is not None:
        model = model.merge_and_unload()
    model = model.to(dtype)

    tok = AutoTokenizer.from_pretrained(tokenizer or base_model, trust_remote_code=trust_remote_code)
    _add_end_of_turn_eos(model, tok)
    remote = "://" in out_dir
    local_out = tempfile.mkdtemp(prefix="distray-export-") if remote else out_dir + ".tmp-export"
    shutil.rmtree(local_out, ignore_errors=True)
    os.makedirs(local_out, exist_ok=True)
    # One model.safetensors, whatever the size: the file later stages and vLLM look for.
    model.save_pretrained(local_out, safe_serialization=True, max_shard_size="1000GB")
    tok.save_pretrained(local_out)
    if record is not None:
        import json

        from distray.train.records import EXPORT_RECORD

        with open(os.path.join(local_out, EXPORT_RECORD), "w") as f:
            json.dump(record, f, indent=2, default=str)
            f.write("\n")
    marker = _marker_text(local_out, checkpoint_dir)
    if fence is not None:
        try:
            fence.check(f"student export {out_dir}")
        except StageError:
            shutil.rmtree(local_out, ignore_errors=True)
            raise
    if remote:
        _publish_remote(local_out, out_dir, marker)
    else:
        with open(os.path.join(local_out, EXPORT_MARKER), "w") as f:
            f.write(marker)
        # Replace the folder only once the new one is complete.
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(local_out, out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("exported %s parameters (%s) → %s", f"{n_params:,}", str(dtype).removeprefix("torch."), out_dir)
    return out_dir


def _marker_text(folder: str, checkpoint_dir: str) -> str:
    """The export marker: the checkpoint exported, and every file with its size."""
    import json

    files = {
        name: os.path.getsize(os.path.join(folder, name))
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    }
    return json.dumps({"checkpoint": checkpoint_dir, "files": files}, indent=1) + "\n"


def _publish_remote(local_out: str, out_dir: str, marker: str) -> None:
    """Upload a finished export to an object store so that no reader takes a partial one.

    An object store has no folder rename: the old marker goes first (the folder is no longer
    complete), then the old files, then the new files, and the marker last
    (`pipeline.stage_done` and `distray.cluster.localize_model` trust only the marker).
    """
    import pyarrow.fs as pafs

    from distray.storage import filesystem_for, write_text

    fs, inner = filesystem_for(out_dir)
    marker_path = f"{inner.rstrip('/')}/{EXPORT_MARKER}"
    if fs.get_file_info(marker_path).type != pafs.FileType.NotFound:
        fs.delete_file(marker_path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir_contents(inner, missing_dir_ok=True)
    pafs.copy_files(local_out, inner, destination_filesystem=fs)
    shutil.rmtree(local_out, ignore_errors=True)
    write_text(f"{out_dir.rstrip('/')}/{EXPORT_MARKER}", marker)


def _add_end_of_turn_eos(model: Any, tok: Any) -> None:
    """Add the end-of-turn token training appended (`ChatEncoder.end_of_turn_id`) to the
    model's generation_config eos ids (a list when there are several)."""
    from transformers import GenerationConfig

    from distray.train.data import ChatEncoder

    eot = ChatEncoder(tok, max_seq_len=1).end_of_turn_id
    if eot is None:
        return
    gen = getattr(model, "generation_config", None)
    if gen is None:
        gen = model.generation_config = GenerationConfig.from_model_config(model.config)
    eos = gen.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.eos_token_id
    ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if eot not in ids:
        gen.eos_token_id = ids + [eot]
        logger.info(
            "generation_config.eos_token_id %s + end of turn %d (%s)",
            ids,
            eot,
            tok.convert_ids_to_tokens(eot),
        )
