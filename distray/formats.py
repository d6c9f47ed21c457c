"""The data contract between stages: column names, the teacher-data schema, input validation, I/O.

    distray data check prompts.jsonl --rejects rejects.jsonl

Input rows (JSONL or Parquet) are chat rows or prompt rows, each with an optional `id` and
`reference`::

    {"messages": [{"role": "user", "content": "rev abc="}, {"role": "assistant", "content": "cba"}]}
    {"prompt": "What is 2+3?", "reference": "5", "id": "q-17"}
    {"prompt": "Summarise: ...", "id": "doc-3"}

A final assistant turn in `messages` is the reference, not part of the prompt. `normalize_row`
turns either form into one layout (`id`, `messages` = prompt turns, `prompt`, `reference`) or a
reject reason; every input line ends in exactly one of the two.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from distray.errors import DataError

__all__ = [
    "ID",
    "INPUT_ID",
    "MESSAGES",
    "PROMPT",
    "REFERENCE",
    "RESPONSE",
    "RESPONSE_TOKEN_IDS",
    "TOPK_TOKEN_IDS",
    "TOPK_LOGPROBS",
    "FINISH_REASON",
    "PROMPT_TOKENS",
    "COMPLETION_TOKENS",
    "TEACHER",
    "SAMPLE_INDEX",
    "MESSAGE_TYPE",
    "TEACHER_DATA_SCHEMA",
    "REJECT_SCHEMA",
    "ROLES",
    "Reject",
    "content_hash",
    "input_id",
    "normalize_row",
    "parse_jsonl_line",
    "iter_input_file",
    "iter_input_rows",
    "filesystem_for",
    "list_files",
    "write_text",
    "read_text",
    "exists",
]

# ---- column names (the only place they are spelled) -----------------------------------------
ID = "id"
INPUT_ID = "input_id"
MESSAGES = "messages"
PROMPT = "prompt"
REFERENCE = "reference"
RESPONSE = "response"
RESPONSE_TOKEN_IDS = "response_token_ids"
TOPK_TOKEN_IDS = "topk_token_ids"
TOPK_LOGPROBS = "topk_logprobs"
FINISH_REASON = "finish_reason"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"
TEACHER = "teacher"
SAMPLE_INDEX = "sample_index"

ROLES = ("system", "user", "assistant")

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

#: Teacher data, one Parquet shard per block. `messages` holds the prompt turns only.
TEACHER_DATA_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (INPUT_ID, pa.string()),
        (MESSAGES, MESSAGE_TYPE),
        (PROMPT, pa.string()),
        (REFERENCE, pa.string()),
        (RESPONSE, pa.string()),
        (RESPONSE_TOKEN_IDS, pa.list_(pa.int32())),
        (TOPK_TOKEN_IDS, pa.list_(pa.list_(pa.int32()))),
        (TOPK_LOGPROBS, pa.list_(pa.list_(pa.float32()))),
        (FINISH_REASON, pa.string()),
        (PROMPT_TOKENS, pa.int32()),
        (COMPLETION_TOKENS, pa.int32()),
        (TEACHER, pa.string()),
        (SAMPLE_INDEX, pa.int32()),
    ]
)

#: Rejected rows: what came in (as JSON text), where it was rejected, and why.
REJECT_SCHEMA = pa.schema(
    [
        (ID, pa.string()),
        (INPUT_ID, pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("row", pa.string()),
    ]
)


@dataclass(frozen=True)
class Reject:
    """One rejected row: the stage that rejected it, a short reason code and a detail."""

    stage: str
    reason: str
    detail: str
    row: str
    line: int | None = None
    source: str | None = None
    input_id: str | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as written to the rejects file (REJECT_SCHEMA, plus `detail`)."""
        return {
            ID: self.id,
            INPUT_ID: self.input_id,
            "source": self.source,
            "line": self.line,
            "stage": self.stage,
            "reason": f"{self.reason}: {self.detail}" if self.detail else self.reason,
            "row": self.row,
        }


def content_hash(*parts: Any) -> str:
    """A stable 16-byte hex hash of JSON-serialisable parts (sorted keys, no whitespace)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def input_id(messages: list[dict[str, str]], prompt: str | None) -> str:
    """The id of an input row without an `id`: a hash of its prompt content."""
    return content_hash("input", messages, prompt)


def _row_text(raw: Any) -> str:
    try:
        return json.dumps(raw, ensure_ascii=False, default=str)[:10_000]
    except Exception:  # noqa: BLE001 - a reject must never fail to be written
        return repr(raw)[:10_000]


def normalize_row(
    raw: Any,
    *,
    line: int | None = None,
    source: str | None = None,
    system_prompt: str | None = None,
    prompt_template: str = "{prompt}",
) -> tuple[dict[str, Any] | None, Reject | None]:
    """Validate one decoded input row and bring it into the common layout.

    Args:
        raw: the decoded row (anything JSON can produce).
        line: 1-based line number, for the reject record.
        source: file the row came from.
        system_prompt: added as the first turn when the row has no system turn.
        prompt_template: applied to `prompt`-form rows (`{prompt}` is the text).

    Returns:
        `(row, None)` with keys id, messages, prompt, reference; or `(None, reject)`.
    """

    def bad(reason: str, detail: str) -> tuple[None, Reject]:
        return None, Reject("validate", reason, detail, _row_text(raw), line, source)

    if not isinstance(raw, dict):
        return bad("not_an_object", f"row is a {type(raw).__name__}, expected a JSON object")
    has_messages = "messages" in raw and raw["messages"] is not None
    has_prompt = "prompt" in raw and raw["prompt"] is not None
    if not has_messages and not has_prompt:
        return bad(
            "missing_prompt",
            f"row has neither `messages` nor `prompt` (keys present: {sorted(raw)})",
        )
    reference = raw.get("reference")
    if reference is not None and not isinstance(reference, (str, int, float)):
        return bad("bad_reference", f"`reference` must be a string, got {type(reference).__name__}")
    reference = None if reference is None else str(reference)
    prompt: str | None = None
    if has_messages:
        msgs = raw["messages"]
        if not isinstance(msgs, list) or not msgs:
            return bad("empty_prompt", "`messages` must be a non-empty list of {role, content}")
        turns: list[dict[str, str]] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return bad("bad_message", f"messages[{i}] is a {type(m).__name__}, expected an object")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                return bad("bad_role", f"messages[{i}].role is {role!r}; allowed: {', '.join(ROLES)}")
            if not isinstance(content, str):
                return bad(
                    "non_string_content",
                    f"messages[{i}].content is {type(content).__name__}, expected a string",
                )
            turns.append({"role": role, "content": content})
        if turns[-1]["role"] == "assistant":
            if reference is None:
                reference = turns[-1]["content"]
            turns = turns[:-1]
        if not any(t["role"] == "user" and t["content"].strip() for t in turns):
            return bad("empty_prompt", "`messages` has no non-empty user turn before the answer")
    else:
        p = raw["prompt"]
        if not isinstance(p, str):
            return bad("non_string_content", f"`prompt` is {type(p).__name__}, expected a string")
        if not p.strip():
            return bad("empty_prompt", "`prompt` is empty")
        prompt = p
        turns = [{"role": "user", "content": prompt_template.replace("{prompt}", p)}]
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    rid = raw.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        return bad("bad_id", f"`id` must be a string or integer, got {type(rid).__name__}")
    row_id = str(rid) if rid is not None else input_id(turns, prompt)
    return {ID: row_id, MESSAGES: turns, PROMPT: prompt, REFERENCE: reference}, None


def parse_jsonl_line(
    data: bytes, *, line: int, source: str | None = None, **kwargs: Any
) -> tuple[dict[str, Any] | None, Reject | None]:
    """Decode and validate one JSONL line (bytes, without the newline).

    Blank lines are the caller's to skip. `kwargs` go to `normalize_row`.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, Reject(
            "read", "invalid_utf8", f"byte {e.start} is not UTF-8", data[:2000].decode("utf-8", "replace"), line, source
        )
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        return None, Reject("read", "invalid_json", str(e)[:200], text[:2000], line, source)
    return normalize_row(raw, line=line, source=source, **kwargs)


# ---- filesystems ----------------------------------------------------------------------------


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for local paths and URIs (s3://, gs://, ...)."""
    if "://" not in path:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec  # noqa: PLC0415 - only for schemes pyarrow lacks

        fs, inner = fsspec.core.url_to_fs(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def exists(path: str) -> bool:
    """True when the file or folder exists."""
    fs, p = filesystem_for(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def list_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files under `path` (a file or a folder, recursively) with one of `suffixes`, sorted.

    Returns paths in the filesystem's own form (no scheme for cloud URIs; absolute locally).
    """
    fs, p = filesystem_for(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input `{path}` does not exist")
    if info.type == pafs.FileType.File:
        return [p]
    found = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    return sorted(
        f.path
        for f in found
        if f.type == pafs.FileType.File
        and f.path.endswith(suffixes)
        and not os.path.basename(f.path).startswith((".", "_"))
    )


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (temp name, then rename) on any filesystem."""
    fs, p = filesystem_for(path)
    parent = os.path.dirname(p)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, p)


def read_text(path: str) -> str:
    """Read a whole text file from any filesystem."""
    fs, p = filesystem_for(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode("utf-8")


# ---- reading inputs -------------------------------------------------------------------------

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")


def iter_input_file(
    path: str, fs: pafs.FileSystem | None = None, **kwargs: Any
) -> Iterator[tuple[dict[str, Any] | None, Reject | None]]:
    """Yield `(row, None)` or `(None, reject)` for every line/row of one JSONL or Parquet file.

    Streams: JSONL line by line, Parquet batch by batch. Blank JSONL lines are skipped (they are
    not rows). `kwargs` go to `normalize_row`.
    """
    if fs is None:
        fs, path = filesystem_for(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            n = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for raw in batch.to_pylist():
                    n += 1
                    yield normalize_row(raw, line=n, source=path, **kwargs)
        return
    with fs.open_input_stream(path) as f:
        buf = b""
        n = 0
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for ln in lines:
                n += 1
                if ln.strip():
                    yield parse_jsonl_line(ln.rstrip(b"\r"), line=n, source=path, **kwargs)
        if buf.strip():
            n += 1
            yield parse_jsonl_line(buf.rstrip(b"\r"), line=n, source=path, **kwargs)


def iter_input_rows(
    path: str, **kwargs: Any
) -> Iterator[tuple[dict[str, Any] | None, Reject | None]]:
    """Like `iter_input_file` over a file or a folder of them, rejecting duplicate ids.

    The duplicate check keeps a set of ids seen; for a data set too big for that, the Ray Data
    path in `distray.teacher` deduplicates per shard by id instead.
    """
    seen: set[str] = set()
    fs, _ = filesystem_for(path)
    for f in list_files(path, INPUT_SUFFIXES):
        for row, rej in iter_input_file(f, fs=fs, **kwargs):
            if row is not None:
                if row[ID] in seen:
                    yield None, Reject(
                        "validate", "duplicate_id", f"id {row[ID]!r} appeared earlier", _row_text(row), None, f
                    )
                    continue
                seen.add(row[ID])
            yield row, rej
