"""The generation path as Ray Data transforms: prompt rows in, teacher rows out.

    python -c "from distray.teacher import generate_dataset; help(generate_dataset)"

`generate_dataset` is what `distray generate` runs per teacher, and what `distray evaluate`
reuses for teacher / student / baseline predictions, so both stages see the same prompts
(chat template, system prompt), the same sampling and the same token accounting.

Output rows follow TEACHER_DATA_SCHEMA plus `error` (null, or `code: detail` when the row got
no usable answer: prompt_too_long, engine_error, request_failed, ...)::

    id        input_id  messages                       prompt      reference response  finish_reason prompt_tokens completion_tokens teacher sample_index error
    9f2c…     q-1       [{user, "What is 2+3?"}]       What is 2+3? 5        "5"       stop          14            2                 big     0            null
    41ab…     q-2       [{user, "Spell cat back"}]     Spell …     tac       "tac"     stop          15            4                 big     0            null
    c07e…     q-3       [{user, "<9000 tokens>"}]      …           null      null      null          9012          null              big     0            prompt_too_long: 9012 tokens > …
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from distray import formats as F
from distray.config import DistrayConfig, SamplingConfig
from distray.engines.results import ERROR
from distray.teacher.rows import Teacher, expand_rows

if TYPE_CHECKING:
    import ray.data

__all__ = ["OUTPUT_SCHEMA", "generate_dataset", "expand", "answer", "to_output"]

#: generate_dataset's rows: the teacher-data schema plus `error`.
OUTPUT_SCHEMA = F.TEACHER_DATA_SCHEMA.append(pa.field(ERROR, pa.string()))


def expand(
    ds: ray.data.Dataset,
    teacher: Teacher,
    sampling: SamplingConfig,
    logprobs: int | None,
    *,
    with_cache_key: bool = False,
) -> ray.data.Dataset:
    """One teacher row per (prompt row, sample), with ids (see `rows.expand_rows`)."""

    def fn(batch: pa.Table) -> pa.Table:
        rows = expand_rows(
            batch.to_pylist(), teacher, sampling, logprobs, with_cache_key=with_cache_key
        )
        return pa.Table.from_pylist(rows)

    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None)


def answer(
    ds: ray.data.Dataset,
    teacher: Teacher,
    cfg: DistrayConfig,
    sampling: SamplingConfig,
    logprobs: int | None,
) -> ray.data.Dataset:
    """Send expanded teacher rows to the teacher's engine; keeps internal `_` columns."""
    from distray.engines import engine_for

    return engine_for(teacher).generate(
        ds, sampling, logprobs, max_prompt_tokens=cfg.generate.max_prompt_tokens
    )


def to_output(batch: pa.Table) -> pa.Table:
    """Cast a batch of answered rows to OUTPUT_SCHEMA (drops internal columns)."""
    rows = batch.to_pylist()
    cols = {f.name: [r.get(f.name) for r in rows] for f in OUTPUT_SCHEMA}
    return pa.Table.from_pydict(cols, schema=OUTPUT_SCHEMA)


def generate_dataset(
    ds: ray.data.Dataset,
    teacher: Teacher,
    cfg: DistrayConfig,
    *,
    sampling: SamplingConfig | None = None,
    logprobs: int | None = None,
) -> ray.data.Dataset:
    """Answer normalized prompt rows with a teacher (or any model given as a teacher config).

    Nothing is filtered and nothing is written: every input row (× `sampling.n`) comes out once,
    with `error` set when it got no answer. Lazy: the engines start when the result is consumed.

    Args:
        ds: rows with columns id, messages, prompt, reference (`read_prompts` or
            `formats.normalize_row` output; a `ray.data.from_items` of such dicts works).
        teacher: a VLLMTeacher, OpenAITeacher or HFTeacher (evaluate builds one for the student).
        cfg: the run config (`generate.max_prompt_tokens`; `resources` for Ray).
        sampling: sampling settings; default `cfg.generate.sampling`.
        logprobs: top-k logprobs to capture per answer position; None captures none (note:
            not `cfg.generate.logprobs`, which `distray generate` passes explicitly).

    Returns:
        A lazy dataset in OUTPUT_SCHEMA (TEACHER_DATA_SCHEMA + `error`).
    """
    sampling = sampling or cfg.generate.sampling
    expanded = expand(ds, teacher, sampling, logprobs)
    answered = answer(expanded, teacher, cfg, sampling, logprobs)
    return answered.map_batches(to_output, batch_format="pyarrow", batch_size=None)
