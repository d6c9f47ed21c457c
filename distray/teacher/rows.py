"""Row ids, cache keys and the per-sample expansion of prompt rows (no Ray, no engines).

    python -c "from distray.teacher.rows import row_id; help(row_id)"

One input row becomes `len(teachers) × sampling.n` teacher rows. Each gets an id that is a hash
of what determines its answer, so a rerun computes the same ids and can skip the finished ones:

    id        = hash(input id, prompt turns, teacher label + model, sampling, logprobs k, sample index)
    cache key = hash(prompt turns, teacher kind + model + weights fingerprint, sampling, k, sample index)

The cache key leaves out the input id and the teacher's label, so another run (or another
input file) asking the same teacher the same question reuses the answer; it adds a fingerprint
of a local model folder, so retrained weights under the same path do not.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

from distray import formats as F
from distray.config import HFTeacher, OpenAITeacher, SamplingConfig, VLLMTeacher

__all__ = [
    "Teacher",
    "ERROR",
    "sampling_key",
    "row_id",
    "cache_key",
    "model_fingerprint",
    "sample_seed",
    "expand_rows",
    "reject_row",
]

Teacher = VLLMTeacher | OpenAITeacher | HFTeacher

#: Extra column beside TEACHER_DATA_SCHEMA while rows are in flight: why the row failed
#: (`code: detail`), or null. Rows with an error end in rejects/.
ERROR = "error"


def sampling_key(sampling: SamplingConfig, logprobs: int | None) -> dict[str, Any]:
    """The sampling settings that change an answer (everything but `n`, which the sample index
    covers), plus the logprobs k that changes the stored columns."""
    key = sampling.model_dump(mode="json")
    key.pop("n", None)
    key["logprobs"] = logprobs
    return key


def sample_seed(sampling: SamplingConfig, sample_index: int) -> int | None:
    """The engine seed of one sample: `seed + sample_index`, so n samples differ but reruns
    repeat; None when sampling is unseeded."""
    return None if sampling.seed is None else sampling.seed + sample_index


@lru_cache(maxsize=64)
def model_fingerprint(model: str) -> str:
    """A cheap fingerprint of a local model folder (file names, sizes, mtimes; config.json
    content), or the name itself for hub ids and API model names."""
    if not os.path.isdir(model):
        return model
    parts: list[Any] = []
    for name in sorted(os.listdir(model)):
        path = os.path.join(model, name)
        if os.path.isfile(path):
            st = os.stat(path)
            parts.append([name, st.st_size, st.st_mtime_ns])
    cfg = os.path.join(model, "config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            parts.append(f.read())
    return F.content_hash("model", parts)


def _teacher_ident(teacher: Teacher) -> dict[str, Any]:
    ident: dict[str, Any] = {"kind": teacher.kind, "model": teacher.model}
    if isinstance(teacher, OpenAITeacher):
        ident["base_url"] = teacher.base_url.rstrip("/")
    return ident


def row_id(
    input_id: str,
    messages: list[dict[str, str]],
    teacher: Teacher,
    skey: dict[str, Any],
    sample_index: int,
) -> str:
    """The id of one teacher row (see the module docstring)."""
    return F.content_hash(
        "row", input_id, messages, teacher.label, _teacher_ident(teacher), skey, sample_index
    )


def cache_key(
    messages: list[dict[str, str]], teacher: Teacher, skey: dict[str, Any], sample_index: int
) -> str:
    """The content-addressed cache key of one answer (see the module docstring)."""
    ident = _teacher_ident(teacher)
    ident["fingerprint"] = model_fingerprint(teacher.model)
    return F.content_hash("cache", messages, ident, skey, sample_index)


def expand_rows(
    rows: list[dict[str, Any]],
    teacher: Teacher,
    sampling: SamplingConfig,
    logprobs: int | None,
    *,
    with_cache_key: bool = False,
) -> list[dict[str, Any]]:
    """Turn normalized prompt rows (id, messages, prompt, reference) into teacher rows, one per
    sample, with `id`, `input_id`, `teacher`, `sample_index` (and `_cache_key`) set."""
    skey = sampling_key(sampling, logprobs)
    out: list[dict[str, Any]] = []
    for r in rows:
        messages = r[F.MESSAGES]
        for k in range(sampling.n):
            row = {
                F.ID: row_id(r[F.ID], messages, teacher, skey, k),
                F.INPUT_ID: r[F.ID],
                F.MESSAGES: messages,
                F.PROMPT: r.get(F.PROMPT),
                F.REFERENCE: r.get(F.REFERENCE),
                F.TEACHER: teacher.label,
                F.SAMPLE_INDEX: k,
            }
            if with_cache_key:
                row["_cache_key"] = cache_key(messages, teacher, skey, k)
            out.append(row)
    return out


def reject_row(row: dict[str, Any], stage: str, reason: str, detail: str) -> dict[str, Any]:
    """A rejects-file record (REJECT_SCHEMA) for a teacher row that failed `stage`."""
    keep = {k: v for k, v in row.items() if not k.startswith("_") and k != ERROR}
    return {
        F.ID: row.get(F.ID),
        F.INPUT_ID: row.get(F.INPUT_ID),
        "source": row.get("_source"),
        "line": row.get("_line"),
        "stage": stage,
        "reason": f"{reason}: {detail}" if detail else reason,
        "row": json.dumps(keep, ensure_ascii=False, default=str)[:10_000],
    }
