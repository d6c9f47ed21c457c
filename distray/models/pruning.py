"""Depth pruning: a student made of N of the teacher's decoder layers (as in Minitron).

    distray make-student --from smollm2-135m-instruct --layers 8 --out runs/student \\
        [--select uniform|block-influence --calibration prompts.jsonl]

`uniform` keeps evenly spaced layers, first and last included. `block-influence` keeps the N
layers that change their hidden state most on calibration prompts, by ShortGPT's
1 − cos(h_in, h_out). The student keeps the teacher's tokenizer files, so logit distillation
applies, and `distray_student.json` beside it records what was kept::

    {"teacher": "/root/.cache/distray/models/smollm2-135m-instruct", "teacher_layers": 30,
     "layers": 4, "select": "block-influence", "kept_layers": [0, 1, 24, 29],
     "influence": [0.977, 0.188, ...], "calibration": "built-in", "parameters": 42472512, ...}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distray.errors import DataError, UsageError
from distray.models.aliases import ALIASES, resolve_model

__all__ = [
    "STUDENT_INFO",
    "SELECTIONS",
    "BUILTIN_CALIBRATION",
    "select_uniform",
    "select_by_influence",
    "layer_influence",
    "calibration_prompts",
    "prune_layers",
    "make_student",
]

logger = logging.getLogger(__name__)

STUDENT_INFO = "distray_student.json"
SELECTIONS = ("uniform", "block-influence")

# Files of a tokenizer (every format transformers writes or reads); the student copies these.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json",
)

# Used when make_student gets no calibration file: varied enough that each layer's role shows.
BUILTIN_CALIBRATION = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is and when to use one.",
    "Translate to French: The weather is nice today.",
    "List three differences between cats and dogs.",
    "Solve: if 3x + 5 = 20, what is x?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that reverses a string.",
    "Give me a recipe for a quick vegetarian dinner.",
    "Why is the sky blue?",
    "Classify the sentiment of this review: 'The film was long and dull.'",
    "What are the main causes of inflation?",
)


def select_uniform(total: int, n: int) -> list[int]:
    """`n` evenly spaced layer indices out of `total`, first and last always kept (n ≥ 2).

    >>> select_uniform(30, 4)
    [0, 10, 19, 29]
    """
    if not 1 <= n <= total:
        raise UsageError(f"layers ({n}) must be between 1 and the teacher's {total} layers")
    if n == 1:
        return [0]
    # (total-1)/(n-1) ≥ 1, so rounding never maps two picks to one layer.
    return [round(i * (total - 1) / (n - 1)) for i in range(n)]


def select_by_influence(scores: Sequence[float], n: int) -> list[int]:
    """The `n` most influential layers by score (ties: the earlier layer), in layer order."""
    if not 1 <= n <= len(scores):
        raise UsageError(f"layers ({n}) must be between 1 and the teacher's {len(scores)} layers")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:n])


def _decoder(model: Any) -> Any:
    """The module that holds the decoder layers as `.layers` (LlamaModel and its kin)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise UsageError(
            f"{type(model).__name__} keeps no `.layers` list of decoder layers; depth pruning "
            "supports decoder-only models laid out like Llama, Qwen, Mistral or Phi-3"
        )
    return inner


def layer_influence(model: Any, tokenizer: Any, prompts: Sequence[str], max_tokens: int = 256) -> list[float]:
    """Block influence of each decoder layer: mean over prompt tokens of 1 − cos(h_in, h_out).

    A layer that barely turns its hidden state (score near 0) can go with little loss
    (ShortGPT, Men et al. 2024). Prompts run one at a time, so no padding enters the mean.

    Args:
        model: a causal LM whose decoder keeps its layers in `.layers`.
        tokenizer: its tokenizer.
        prompts: rendered prompt texts (chat template already applied).
        max_tokens: prompts are cut to this many tokens.

    Returns:
        One score per layer, in layer order.
    """
    import torch

    layers = _decoder(model).layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    seen: dict[int, Any] = {}

    def hook(idx: int) -> Any:
        def run(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            seen[idx] = (1 - cos).sum().double()
        return run

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for text in prompts:
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                ids = ids[:, :max_tokens].to(model.device)
                seen.clear()
                model(input_ids=ids, use_cache=False)
                for i, s in seen.items():
                    sums[i] += s
                count += int(ids.shape[1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise DataError("block influence needs at least one non-empty calibration prompt")
    return [float(s) / count for s in sums]


def calibration_prompts(path: str | None, limit: int = 32) -> list[list[dict[str, str]]]:
    """Up to `limit` prompts (as chat turns) from a JSONL/Parquet input file, or built-in ones.

    Args:
        path: `{"prompt": ...}` or `{"messages": [...]}` rows (distray's input format); None
            gives `BUILTIN_CALIBRATION`.
        limit: rows to take from the start of the file.

    Raises:
        DataError: the file yields no valid rows (the first reject's reason is named).
    """
    from distray.formats import MESSAGES
    from distray.inputs import iter_input_rows

    if path is None:
        return [[{"role": "user", "content": p}] for p in BUILTIN_CALIBRATION[:limit]]
    turns: list[list[dict[str, str]]] = []
    first_reject = None
    for row, rej in iter_input_rows(path):
        if row is not None:
            turns.append(row[MESSAGES])
            if len(turns) >= limit:
                break
        elif first_reject is None:
            first_reject = rej
    if not turns:
        why = f" (line {first_reject.line}: {first_reject.detail})" if first_reject else ""
        raise DataError(
            f"calibration file `{path}` holds no valid rows{why}; give JSONL rows of "
            '{"prompt": ...} or {"messages": [{"role": "user", "content": ...}]}'
        )
    return turns


def prune_layers(model: Any, keep: Sequence[int]) -> Any:
    """Keep only the decoder layers `keep` (teacher indices, ascending), in place.

    Each kept layer is renumbered (`layer_idx`, which indexes the KV cache), and the config's
    `num_hidden_layers` and any per-layer list (`layer_types`) follow.

    Returns:
        `model`.
    """
    import torch

    decoder = _decoder(model)
    total = len(decoder.layers)
    if list(keep) != sorted(set(keep)) or not keep or keep[0] < 0 or keep[-1] >= total:
        raise UsageError(f"layers to keep {list(keep)} must be distinct, ascending, in 0..{total - 1}")
    kept = torch.nn.ModuleList([decoder.layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                setattr(mod, "layer_idx", new_idx)  # noqa: B010 (mypy types the attribute as Tensor)
    decoder.layers = kept
    for cfg in {id(c): c for c in (model.config, getattr(decoder, "config", model.config))}.values():
        cfg.num_hidden_layers = len(keep)
        for name, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == total and name.startswith("layer_"):
                setattr(cfg, name, [value[i] for i in keep])
    return model


def make_student(
    teacher: str,
    layers: int,
    out: str,
    select: str = "uniform",
    calibration: str | None = None,
    *,
    calibration_rows: int = 32,
) -> str:
    """Write a depth-pruned copy of `teacher` with `layers` decoder layers.

    Args:
        teacher: a local Hugging Face folder or a model alias (fetched on first use).
        layers: decoder layers the student keeps.
        out: folder to write (config.json with num_hidden_layers=N, model.safetensors,
            generation_config.json, the teacher's tokenizer files, `distray_student.json`).
        select: `uniform` (evenly spaced, first and last kept) or `block-influence` (drop the
            layers that change their hidden state least on the calibration prompts).
        calibration: JSONL/Parquet prompt rows for `block-influence`; None uses built-in prompts.
        calibration_rows: calibration rows used.

    Returns:
        `out` as a string.

    Raises:
        UsageError: bad `select` or `layers`, or `teacher` is neither a folder nor an alias.
        DataError: the calibration file holds no valid rows.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if select not in SELECTIONS:
        raise UsageError(f"--select `{select}` is unknown; choose one of {', '.join(SELECTIONS)}")
    teacher_dir = resolve_model(teacher)
    if not os.path.isdir(teacher_dir):
        raise UsageError(
            f"teacher `{teacher}` is neither a local model folder nor an alias "
            f"({', '.join(ALIASES)})"
        )
    total = int(AutoConfig.from_pretrained(teacher_dir).num_hidden_layers)
    if select == "uniform":
        keep = select_uniform(total, layers)  # checks the range before the model loads
    elif not 1 <= layers <= total:
        raise UsageError(f"layers ({layers}) must be between 1 and the teacher's {total} layers")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto")
    teacher_params = sum(p.numel() for p in model.parameters())
    scores: list[float] | None = None
    n_prompts = 0
    if select == "block-influence":
        from distray.prompts import render_prompt

        tok = AutoTokenizer.from_pretrained(teacher_dir)
        turns = calibration_prompts(calibration, calibration_rows)
        texts = [render_prompt(tok, t, apply_chat_template=True)[0] for t in turns]
        n_prompts = len(texts)
        scores = layer_influence(model, tok, texts)
        keep = select_by_influence(scores, layers)
    prune_layers(model, keep)
    dest = Path(out)
    if dest.is_dir() and any(dest.iterdir()) and not (dest / STUDENT_INFO).exists():
        raise UsageError(f"--out {dest} is a non-empty folder that is not a distray student")
    if dest.exists():
        shutil.rmtree(dest)  # a previous student: replaced whole, no stale shards left behind
    dest.mkdir(parents=True)
    with torch.no_grad():
        model.save_pretrained(str(dest), safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (Path(teacher_dir) / name).is_file():
            shutil.copy2(Path(teacher_dir) / name, dest / name)
    info = {
        "teacher": os.path.abspath(teacher_dir),
        "teacher_alias": teacher if teacher in ALIASES else None,
        "teacher_layers": total,
        "layers": len(keep),
        "select": select,
        "kept_layers": list(keep),
        "dropped_layers": [i for i in range(total) if i not in keep],
        "influence": scores,
        "calibration": (calibration or "built-in") if select == "block-influence" else None,
        "calibration_prompts": n_prompts,
        "teacher_parameters": teacher_params,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    # Written last: its presence says the folder is a finished student.
    (dest / STUDENT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    logger.info(
        "student: %d of %d layers (%s: %s), %s params → %s (%.1f s)", len(keep), total, select,
        keep, f"{info['parameters']:,}", dest, time.perf_counter() - t0,
    )
    return str(dest)
