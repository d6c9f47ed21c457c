"""Reading and validating prompt files into Ray Data, rejects kept apart with their reasons.

    python -c "import ray; from distray.teacher import read_prompts; ..."

`read_prompts(path, cfg)` returns two lazy datasets over the same read: the valid rows in the
normalized layout (`formats.normalize_row`) and the rejected ones in REJECT_SCHEMA. The read is
one streaming Ray Data task that walks the files in sorted order, so duplicate ids are found
across files deterministically (first occurrence wins, as `formats.iter_input_rows` does) and a
10M-row set is never held whole: blocks of `BLOCK_ROWS` rows flow on as they are parsed. The
duplicate check keeps a set of ids in that task (~100 bytes per row).

Each reject gets a stable id, `hash(full source path or URI, line)`, so a rerun of the same
input recognises a reject it already wrote, and a bad line 3 of `train/part-0.jsonl` and of
`validation/part-0.jsonl` stay two rejects. The `source` column shows the path relative to the
input root (the file name for a single file). Moving the input changes the ids, so a rerun after
a move writes its input rejects again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from distray import formats as F
from distray import inputs, storage
from distray.config import DistrayConfig
from distray.errors import DataError

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "PROMPT_SCHEMA",
    "BLOCK_ROWS",
    "read_prompts",
    "read_raw",
    "valid_rows",
    "valid_table",
    "rejects_table",
    "iter_prompt_blocks",
    "reject_id",
]

#: Rows per block the reader emits.
BLOCK_ROWS = 512

#: What the reader emits: the normalized row, or a reject (valid rows have `_reject` null).
PROMPT_SCHEMA = pa.schema(
    [
        (F.ID, pa.string()),
        (F.MESSAGES, F.MESSAGE_TYPE),
        (F.PROMPT, pa.string()),
        (F.REFERENCE, pa.string()),
        ("_source", pa.string()),
        ("_line", pa.int64()),
        ("_reject_stage", pa.string()),
        ("_reject_reason", pa.string()),
        ("_reject_row", pa.string()),
        ("_reject_input_id", pa.string()),
    ]
)


def reject_id(source: str | None, line: int | None) -> str:
    """The stable id of an input-validation reject.

    Args:
        source: the file's full path (absolute locally, the filesystem's form for a URI), not
            the shortened `source` column: two inputs with a file of the same name must not
            share ids.
        line: the 1-based line (row) number in that file.
    """
    return F.content_hash("reject", source, line)


def _relative(source: str | None, root: str) -> str | None:
    if source is None:
        return None
    if source == root:
        return os.path.basename(source)
    if source.startswith(root.rstrip("/") + "/"):
        return source[len(root.rstrip("/")) + 1 :]
    return source


def iter_prompt_blocks(
    path: str, *, system_prompt: str | None, prompt_template: str, max_rows: int | None = None
) -> Iterator[pa.Table]:
    """Parse and validate every row under `path`, yielding PROMPT_SCHEMA tables.

    Args:
        path: a JSONL/JSON/Parquet file or folder, local or a URI.
        system_prompt: added to rows without a system turn.
        prompt_template: applied to prompt-form rows.
        max_rows: stop after this many valid rows (rejects seen before then are kept).

    Raises:
        DataError: the input does not exist or holds no input files.
    """
    _, root = storage.filesystem_for(path)
    buf: list[dict[str, Any]] = []
    n_valid = 0
    for row, rej in inputs.iter_input_rows(
        path, system_prompt=system_prompt, prompt_template=prompt_template
    ):
        if row is not None:
            buf.append(
                {
                    F.ID: row[F.ID],
                    F.MESSAGES: row[F.MESSAGES],
                    F.PROMPT: row.get(F.PROMPT),
                    F.REFERENCE: row.get(F.REFERENCE),
                    "_source": None,
                    "_line": None,
                    "_reject_stage": None,
                    "_reject_reason": None,
                    "_reject_row": None,
                    "_reject_input_id": None,
                }
            )
            n_valid += 1
        elif rej is not None:
            source = _relative(rej.source, root)
            buf.append(
                {
                    F.ID: reject_id(rej.source, rej.line),
                    F.MESSAGES: None,
                    F.PROMPT: None,
                    F.REFERENCE: None,
                    "_source": source,
                    "_line": rej.line,
                    "_reject_stage": rej.stage,
                    "_reject_reason": f"{rej.reason}: {rej.detail}" if rej.detail else rej.reason,
                    "_reject_row": rej.row,
                    "_reject_input_id": rej.input_id,
                }
            )
        if len(buf) >= BLOCK_ROWS:
            yield pa.Table.from_pylist(buf, schema=PROMPT_SCHEMA)
            buf = []
        if max_rows is not None and n_valid >= max_rows:
            break
    if buf:
        yield pa.Table.from_pylist(buf, schema=PROMPT_SCHEMA)


def _datasource(path: str, kwargs: dict[str, Any]) -> Any:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PromptDatasource(Datasource):
        """One read task over all files (see the module docstring for why one)."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list[ReadTask]:
            def read() -> Iterator[pa.Table]:
                yield from iter_prompt_blocks(path, **kwargs)

            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
            return [ReadTask(read, meta, schema=PROMPT_SCHEMA)]

        def get_name(self) -> str:
            return "ReadPrompts"

    return PromptDatasource()


def valid_table(batch: pa.Table) -> pa.Table:
    """The valid rows of a raw read batch, in the normalized layout."""
    import pyarrow.compute as pc

    keep = batch.filter(pc.is_null(batch["_reject_reason"]))
    return keep.select([F.ID, F.MESSAGES, F.PROMPT, F.REFERENCE])


def rejects_table(batch: pa.Table) -> pa.Table:
    """The rejected rows of a raw read batch, in REJECT_SCHEMA."""
    import pyarrow.compute as pc

    rej = batch.filter(pc.is_valid(batch["_reject_reason"]))
    return pa.table(
        {
            F.ID: rej[F.ID],
            F.INPUT_ID: rej["_reject_input_id"],
            "source": rej["_source"],
            "line": rej["_line"],
            "stage": rej["_reject_stage"],
            "reason": rej["_reject_reason"],
            "row": rej["_reject_row"],
        },
        schema=F.REJECT_SCHEMA,
    )


def read_raw(path: str, cfg: DistrayConfig, *, max_rows: int | None = None) -> ray.data.Dataset:
    """The raw read (PROMPT_SCHEMA: valid rows and rejects together), lazily.

    Raises:
        DataError: `path` does not exist or holds no input files (checked now, not lazily).
    """
    import ray.data

    from distray.tasks import task_prompts

    files = storage.list_files(path, inputs.INPUT_SUFFIXES)
    if not files:
        raise DataError(
            f"input `{path}` holds no {', '.join(inputs.INPUT_SUFFIXES)} files; point data.train at a "
            "JSONL or Parquet file or folder"
        )
    system_prompt, template = task_prompts(cfg.task)
    kwargs = {"system_prompt": system_prompt, "prompt_template": template, "max_rows": max_rows}
    return ray.data.read_datasource(_datasource(path, kwargs))


def valid_rows(raw: ray.data.Dataset) -> ray.data.Dataset:
    """The valid rows of a raw read."""
    return raw.map_batches(valid_table, batch_format="pyarrow", batch_size=None)


def read_prompts(
    path: str, cfg: DistrayConfig, *, max_rows: int | None = None
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Read and validate a prompt file or folder into Ray Data.

    The system prompt and prompt template of `cfg.task` (`tasks.task_prompts`) are applied as
    rows are normalized. Both datasets are lazy; each one you consume runs the read.

    Args:
        path: JSONL/JSON/Parquet file or folder, local or a URI.
        cfg: the run config (task section).
        max_rows: use at most this many valid rows.

    Returns:
        `(valid, rejects)`: valid rows with columns id, messages, prompt, reference; rejects in
        REJECT_SCHEMA (id, input_id, source, line, stage, reason, row).

    Raises:
        DataError: `path` does not exist or holds no input files (checked now, not lazily).
    """
    raw = read_raw(path, cfg, max_rows=max_rows)
    rejects = raw.map_batches(rejects_table, batch_format="pyarrow", batch_size=None)
    return valid_rows(raw), rejects
