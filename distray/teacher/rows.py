"""Row ids, cache keys and the per-sample expansion of prompt rows (no Ray, no engines).

    python -c "from distray.teacher.rows import row_id; help(row_id)"

One input row becomes `len(teachers) × sampling.n` teacher rows. Each gets an id that is a hash
of what determines its answer, so a rerun computes the same ids and can skip the finished ones:

    id        = hash(split, input id, prompt turns, teacher label, ident, sampling, k, sample)
    cache key = hash(prompt turns, ident, sampling, logprobs k, sample index)
    ident     = kind, model (a local folder: its content fingerprint), and every teacher setting
                that may change the answer (engine_kwargs such as dtype / quantization /
                max_model_len, apply_chat_template, extra_body, the hf dtype, base_url, ...)

Settings that only change speed or cost (`ANSWER_NEUTRAL_FIELDS`, `ANSWER_NEUTRAL_ENGINE_KWARGS`)
are left out, so a rerun with less GPU memory or more replicas resumes its rows; settings at
their default are left out too, so a new optional setting does not change existing ids. Any
other setting is in: an unknown one costs a recomputation, never a stale answer.

The split is in the id: a prompt in both train and validation is two rows. The cache key leaves
out the split, the input id and the teacher's label, so another run (or split, or input file)
asking the same teacher the same question reuses the answer. A local model folder is keyed by
its content (`distray.fingerprint.model_fingerprint`, re-exported here), not its path or
mtimes: retrained weights under the same path get new ids, a copy of the folder elsewhere
keeps them.
"""

from __future__ import annotations

import os
from typing import Any

from distray import formats as F
from distray.config import HFTeacher, OpenAITeacher, SamplingConfig, VLLMTeacher
from distray.engines import engine_for
from distray.fingerprint import model_fingerprint
from distray.settings import SPEED_ONLY_ENGINE_KWARGS, teacher_speed_only_fields

__all__ = [
    "Teacher",
    "ANSWER_NEUTRAL_FIELDS",
    "ANSWER_NEUTRAL_ENGINE_KWARGS",
    "sampling_key",
    "teacher_ident",
    "row_id",
    "cache_key",
    "model_fingerprint",
    "expand_rows",
]

Teacher = VLLMTeacher | OpenAITeacher | HFTeacher

#: Teacher settings, per kind, that change how an answer is obtained but not what it says:
#: the speed-only teacher fields of `distray.settings` (the one classification lineage uses
#: too) that the kind has. `name` is the label: in the row id on its own, out of the cache key.
ANSWER_NEUTRAL_FIELDS: dict[str, frozenset[str]] = {
    cls.model_fields["kind"].default: frozenset(
        {"name"} | (teacher_speed_only_fields() & set(cls.model_fields))
    )
    for cls in (VLLMTeacher, OpenAITeacher, HFTeacher)
}

#: vLLM engine_kwargs that size, place or speed up an engine without changing its answers.
ANSWER_NEUTRAL_ENGINE_KWARGS = SPEED_ONLY_ENGINE_KWARGS


def sampling_key(sampling: SamplingConfig, logprobs: int | None) -> dict[str, Any]:
    """The sampling settings that change an answer (everything but `n`, which the sample index
    covers), plus the logprobs k that changes the stored columns."""
    key = sampling.model_dump(mode="json")
    key.pop("n", None)
    key["logprobs"] = logprobs
    return key


def teacher_ident(teacher: Teacher, fingerprint: str | None = None) -> dict[str, Any]:
    """What about a teacher decides its answers (see the module docstring).

    Args:
        teacher: the teacher config.
        fingerprint: `model_fingerprint(teacher.model)`, computed once where the model folder
            is sure to be (the driver); None computes it here.
    """
    neutral = ANSWER_NEUTRAL_FIELDS.get(teacher.kind, frozenset())
    ident = {
        k: v
        for k, v in teacher.model_dump(mode="json", exclude_defaults=True).items()
        if k not in neutral
    }
    ident["kind"] = teacher.kind
    # A local folder by its content alone: moved or copied, its answers are the same.
    ident["model"] = fingerprint if fingerprint is not None else model_fingerprint(teacher.model)
    if isinstance(ident.get("engine_kwargs"), dict):
        kw = {k: v for k, v in ident["engine_kwargs"].items() if k not in ANSWER_NEUTRAL_ENGINE_KWARGS}
        ident["engine_kwargs"] = kw
        if not kw:
            del ident["engine_kwargs"]
    endpoint = engine_for(teacher).endpoint()
    if endpoint is not None:
        # An HTTP teacher is its endpoint too, even at the default URL (left out above).
        ident["base_url"] = endpoint.base_url.rstrip("/")
        if not os.path.isdir(teacher.model):
            # The endpoint's weights, not a local hub cache's revision of the same name.
            ident["model"] = teacher.model
    return ident


def row_id(
    input_id: str,
    messages: list[dict[str, str]],
    teacher: Teacher,
    skey: dict[str, Any],
    sample_index: int,
    *,
    split: str = "train",
    ident: dict[str, Any] | None = None,
) -> str:
    """The id of one teacher row (see the module docstring); `ident` is `teacher_ident`."""
    ident = ident if ident is not None else teacher_ident(teacher)
    return F.content_hash(
        "row", split, input_id, messages, teacher.label, ident, skey, sample_index
    )


def cache_key(
    messages: list[dict[str, str]],
    teacher: Teacher,
    skey: dict[str, Any],
    sample_index: int,
    *,
    ident: dict[str, Any] | None = None,
) -> str:
    """The content-addressed cache key of one answer (see the module docstring)."""
    ident = ident if ident is not None else teacher_ident(teacher)
    return F.content_hash("cache", messages, ident, skey, sample_index)


def expand_rows(
    rows: list[dict[str, Any]],
    teacher: Teacher,
    sampling: SamplingConfig,
    logprobs: int | None,
    *,
    with_cache_key: bool = False,
    split: str = "train",
    fingerprint: str | None = None,
) -> list[dict[str, Any]]:
    """Turn normalized prompt rows (id, messages, prompt, reference) into teacher rows, one per
    sample, with `id`, `input_id`, `teacher`, `sample_index` (and `_cache_key`) set.

    Args:
        rows: normalized prompt rows.
        teacher: the teacher config.
        sampling: the sampling settings (`n` rows per prompt).
        logprobs: top-k logprobs captured per position, or None.
        with_cache_key: add `_cache_key` for the answer cache.
        split: the split the rows belong to (in the id: one prompt in two splits is two rows).
        fingerprint: `model_fingerprint(teacher.model)` computed on the driver; None computes
            it in this process.
    """
    skey = sampling_key(sampling, logprobs)
    ident = teacher_ident(teacher, fingerprint)
    out: list[dict[str, Any]] = []
    for r in rows:
        messages = r[F.MESSAGES]
        for k in range(sampling.n):
            row = {
                F.ID: row_id(r[F.ID], messages, teacher, skey, k, split=split, ident=ident),
                F.INPUT_ID: r[F.ID],
                F.MESSAGES: messages,
                F.PROMPT: r.get(F.PROMPT),
                F.REFERENCE: r.get(F.REFERENCE),
                F.TEACHER: teacher.label,
                F.SAMPLE_INDEX: k,
            }
            if with_cache_key:
                row["_cache_key"] = cache_key(messages, teacher, skey, k, ident=ident)
            out.append(row)
    return out
