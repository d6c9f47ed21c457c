"""Reading input prompt files: JSONL, JSON arrays and Parquet, local or on a bucket, row by row.

    distray data check prompts.jsonl --rejects rejects.jsonl

    from distray.inputs import iter_input_rows
    for row, reject in iter_input_rows("prompts.jsonl"):
        ...

Each row comes back normalised (`distray.formats.normalize_row`) or as a reject with its reason;
one bad line never stops a file. `check_input` counts both without keeping the rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

from distray.errors import DataError
from distray.formats import (
    ID,
    MESSAGES,
    Reject,
    loads_json,
    long_int_reject,
    normalize_row,
    parse_jsonl_line,
    render_row,
    row_text,
    write_rejects,
)
from distray.storage import filesystem_for, list_files

__all__ = [
    "INPUT_SUFFIXES", "READ_CHUNK_BYTES", "InputCheck", "check_input", "iter_file_rows", "iter_input_file",
    "iter_input_rows",
]


INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")

_BOM = b"\xef\xbb\xbf"
READ_CHUNK_BYTES = 1 << 20

Result = tuple[dict[str, Any] | None, Reject | None]


def _jsonl_lines(stream: IO[bytes] | Any) -> Iterator[tuple[int, bytes]]:
    """`(line_number, bytes)` for every non-blank line of a binary stream, `\\r\\n` or `\\n`.

    Reads fixed-size chunks, so a file is never held whole; a UTF-8 byte-order mark on the
    first line is dropped (editors on Windows write one).
    """
    pending: list[bytes] = []
    n = 0
    first = True
    while True:
        chunk = stream.read(READ_CHUNK_BYTES)
        if not chunk:
            break
        chunk = bytes(chunk)
        cut = chunk.rfind(b"\n")
        if cut < 0:
            pending.append(chunk)
            continue
        block = b"".join([*pending, chunk[:cut]])
        pending = [chunk[cut + 1 :]]
        for ln in block.split(b"\n"):
            n += 1
            if first:
                ln, first = ln.removeprefix(_BOM), False
            if ln.strip():
                yield n, ln.rstrip(b"\r")
    tail = b"".join(pending)
    if first:
        tail = tail.removeprefix(_BOM)
    if tail.strip():
        yield n + 1, tail.rstrip(b"\r")


def iter_file_rows(path: str, fs: pafs.FileSystem, **kwargs: Any) -> Iterator[tuple[int, Result]]:
    """`(line_or_row_number, (row, reject))` for every non-blank line or row of one file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            with fs.open_input_file(path) as f:
                n = 0
                for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                    for raw in batch.to_pylist():
                        n += 1
                        yield n, normalize_row(raw, line=n, source=path, **kwargs)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"cannot read Parquet file `{path}`: {e}") from e
        return
    if path.endswith(".json"):
        # A .json file may be one JSON array (or object) rather than JSONL; try that first.
        with fs.open_input_stream(path) as f:
            data = f.read()
        try:
            whole, long_ints = loads_json(data.removeprefix(_BOM).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            whole, long_ints = None, False
        if isinstance(whole, (list, dict)):
            for i, raw in enumerate(whole if isinstance(whole, list) else [whole], start=1):
                rej = long_int_reject(raw, row_text(raw), i, path) if long_ints else None
                yield i, (None, rej) if rej is not None else normalize_row(
                    raw, line=i, source=path, **kwargs
                )
            return
        import io

        for n, ln in _jsonl_lines(io.BytesIO(data)):
            yield n, parse_jsonl_line(ln, line=n, source=path, **kwargs)
        return
    with fs.open_input_stream(path) as f:
        for n, ln in _jsonl_lines(f):
            yield n, parse_jsonl_line(ln, line=n, source=path, **kwargs)


def iter_input_file(
    path: str, fs: pafs.FileSystem | None = None, **kwargs: Any
) -> Iterator[Result]:
    """Yield `(row, None)` or `(None, reject)` for every line/row of one JSONL, JSON or Parquet file.

    Streams: JSONL line by line, Parquet batch by batch (a `.json` file holding one array is read
    whole). Blank JSONL lines are skipped: they are not rows. `kwargs` go to `normalize_row`.

    Raises:
        DataError: the file cannot be opened or is not Parquet although named so.
    """
    if fs is None:
        fs, path = filesystem_for(path)
    try:
        for _, result in iter_file_rows(path, fs, **kwargs):
            yield result
    except FileNotFoundError as e:
        raise DataError(f"input `{path}` does not exist") from e


def iter_input_rows(path: str, **kwargs: Any) -> Iterator[Result]:
    """Like `iter_input_file` over a file or a folder of them, rejecting duplicate ids.

    The duplicate check keeps a set of ids seen; for a data set too big for that, the Ray Data
    path in `distray.teacher` deduplicates per shard by id instead.

    Raises:
        DataError: `path` does not exist, or a folder holds no input files.
    """
    seen: set[str] = set()
    fs, _ = filesystem_for(path)
    files = list_files(path, INPUT_SUFFIXES)
    if not files:
        raise DataError(f"input folder `{path}` holds no {', '.join(INPUT_SUFFIXES)} files")
    for f in files:
        for n, (row, rej) in iter_file_rows(f, fs, **kwargs):
            if row is not None:
                if row[ID] in seen:
                    yield (
                        None,
                        Reject(
                            "validate",
                            "duplicate_id",
                            f"id {row[ID]!r} appeared earlier; give each row a distinct id",
                            row_text(row),
                            n,
                            f,
                        ),
                    )
                    continue
                seen.add(row[ID])
            yield row, rej


@dataclass
class InputCheck:
    """What `check_input` found: valid and rejected counts, by reason code."""

    path: str
    valid: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    rejects_path: str | None = None

    @property
    def total(self) -> int:
        """Rows read (valid + rejected)."""
        return self.valid + self.rejected

    def summary(self) -> str:
        """Human-readable lines: totals, then one line per reason with a first example."""
        lines = [f"{self.path}: {self.valid} valid, {self.rejected} rejected ({self.total} rows)"]
        for reason, count in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<20} {count:>8}   e.g. {self.examples[reason]}")
        if self.rejects_path:
            lines.append(f"rejects written to {self.rejects_path}")
        return "\n".join(lines)


def check_input(
    path: str,
    rejects_path: str | None = None,
    *,
    tokenizer: str | None = None,
    apply_chat_template: bool = True,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> InputCheck:
    """Validate every row of an input file or folder without keeping the rows.

    Args:
        path: JSONL/JSON/Parquet file or folder, local or a URI.
        rejects_path: where to write the rejects (JSONL, or Parquet if it ends in .parquet).
        tokenizer: a model or tokenizer folder whose chat template every valid row is rendered
            with, as a local teacher would (`chat_template` rejects); None skips that check.
        apply_chat_template: as the teacher's setting of that name.
        trust_remote_code: allow tokenizer code from the folder.
        **kwargs: passed to `normalize_row` (system_prompt, prompt_template).

    Returns:
        Counts of valid and rejected rows by reason code, with the first example of each reason.

    Raises:
        DataError: the input does not exist or cannot be read, or the template does not compile.
    """
    check = InputCheck(path=path)
    rejects: list[Reject] = []
    tok = None
    if tokenizer is not None:
        from distray.prompts import load_tokenizer

        tok = load_tokenizer(tokenizer, trust_remote_code)
    for row, rej in iter_input_rows(path, **kwargs):
        if rej is None and row is not None and tok is not None:
            error = render_row(tok, row[MESSAGES], apply_chat_template)[2]
            if error is not None:
                _, _, detail = error.partition(": ")
                rej = Reject(
                    "prepare", "chat_template", detail, row_text(row), input_id=row[ID]
                )
        if rej is None:
            check.valid += 1
            continue
        check.rejected += 1
        check.reasons[rej.reason] = check.reasons.get(rej.reason, 0) + 1
        if rej.reason not in check.examples:
            where = (
                f"line {rej.line}" if rej.line is not None
                else f"id {rej.input_id!r}" if rej.input_id else "row"
            )
            check.examples[rej.reason] = f"{where}: {rej.detail}"[:160]
        if rejects_path is not None:
            rejects.append(rej)
    if rejects_path is not None:
        write_rejects(rejects_path, rejects)
        check.rejects_path = rejects_path
    return check
