"""The data contract between stages: column names, the teacher-data schema, input validation, I/O.

    distray data check prompts.jsonl --rejects rejects.jsonl

Input rows (JSONL or Parquet) are chat rows or prompt rows, each with an optional `id` and
`reference`::

    {"messages": [{"role": "user", "content": "rev abc="}, {"role": "assistant", "content": "cba"}]}
    {"prompt": "What is 2+3?", "reference": "5", "id": "q-17"}
    {"prompt": "Summarise: ...", "id": "doc-3"}

A final assistant turn in `messages` is the reference, not part of the prompt. `normalize_row`
turns either form into one layout (`id`, `messages` = prompt turns, `prompt`, `reference`) or a
reject with a reason code (`REJECT_REASONS`); every non-blank input line ends in exactly one of
the two. Paths may be local or any URI pyarrow or fsspec opens (s3://, gs://, memory://, ...).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import pyarrow as pa
import pyarrow.fs as pafs

from distray.errors import DataError
from distray.storage import filesystem_for, list_files, write_bytes, write_jsonl

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
    "REJECT_REASONS",
    "INPUT_SUFFIXES",
    "Reject",
    "InputCheck",
    "content_hash",
    "input_id",
    "normalize_row",
    "render_row",
    "parse_jsonl_line",
    "iter_input_file",
    "iter_input_rows",
    "check_input",
    "write_rejects",
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

#: Reason codes a reject carries (the text before the first ":" of its `reason` column).
REJECT_REASONS = (
    "invalid_utf8",  # bytes that are not UTF-8, or a JSON \\u escape that is a lone surrogate
    "invalid_json",  # the line does not parse as JSON
    "number_too_long",  # a JSON integer longer than Python reads (sys.get_int_max_str_digits)
    "not_an_object",  # valid JSON, but not a {...} row
    "missing_prompt",  # neither `messages` nor `prompt`
    "empty_prompt",  # empty `prompt`, empty `messages`, or no non-empty user turn
    "bad_message",  # `messages` that is not a list, or an entry of it that is not an object
    "bad_role",  # a role outside system/user/assistant
    "non_string_content",  # content or prompt that is not a string
    "bad_reference",  # `reference` that is not a string or number
    "bad_id",  # `id` that is not a non-empty string or an integer
    "duplicate_id",  # an id seen earlier in the same input
    "chat_template",  # the teacher's chat template refuses the turns (`data check --tokenizer`)
)

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
    """One rejected row: the stage that rejected it, a reason code and a detail.

    `reason` is one of `REJECT_REASONS` (other stages add their own codes, e.g. generate's
    filters); `detail` says what was wrong in words, naming the field and the value.
    """

    stage: str
    reason: str
    detail: str
    row: str
    line: int | None = None
    source: str | None = None
    input_id: str | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as written to the rejects file (REJECT_SCHEMA; `reason` is `code: detail`)."""
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
    """A stable hash (32 hex chars, 128 bits) of JSON-serialisable parts (sorted keys, no spaces).

    Stable across processes, machines and Python versions, so it can key caches and ids.
    """
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    # surrogatepass: a lone surrogate must hash, not crash (rows carrying one are rejected anyway).
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def input_id(messages: list[dict[str, str]], prompt: str | None) -> str:
    """The id of an input row without an `id`: a hash of its prompt content."""
    return content_hash("input", messages, prompt)


def _encodable(text: str) -> bool:
    # json.loads turns "\ud800" into a lone surrogate, which no UTF-8 writer (Parquet, JSONL)
    # accepts; such a row must be rejected here rather than crash a writer later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _row_text(raw: Any) -> str:
    """The row as JSON text for a reject record: always writable as UTF-8, at most 10k chars."""
    try:
        text = json.dumps(raw, ensure_ascii=False, default=str)
        if not _encodable(text):
            text = json.dumps(raw, ensure_ascii=True, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(raw)
        if not _encodable(text):
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:10_000]


class _LongInt:
    """A JSON integer too long for Python's `int(str)` (`sys.get_int_max_str_digits`): its text.

    `json.loads` raises ValueError on the first such integer, which would take a whole file or
    batch down with it; decoded as this, only the row that holds it is rejected.
    """

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits

    def __str__(self) -> str:
        return self.digits


def _parse_int(text: str) -> int | _LongInt:
    try:
        return int(text)
    except ValueError:
        return _LongInt(text)


def _loads(text: str) -> tuple[Any, bool]:
    """`(json.loads(text), holds_long_int)`; over-long integers decode as `_LongInt`.

    Raises:
        json.JSONDecodeError, RecursionError: as json.loads.
    """
    try:
        return json.loads(text), False
    except json.JSONDecodeError:
        raise
    except ValueError:
        # Only the int-digits limit raises a plain ValueError; the slower hook runs only then.
        return json.loads(text, parse_int=_parse_int), True


def _long_int_reject(raw: Any, text: str, line: int | None, source: str | None) -> Reject | None:
    """A `number_too_long` reject when `raw` holds a `_LongInt` anywhere, else None."""
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, _LongInt):
            n = len(v.digits.lstrip("-"))
            field = f"`{where}`" if where else "the row"
            return Reject(
                "read",
                "number_too_long",
                f"{field} holds an integer of {n} digits, more than Python reads "
                f"({sys.get_int_max_str_digits()}); quote it as a string",
                text[:2000],
                line,
                source,
            )
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None


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
        raw: the decoded row (anything JSON or Parquet can produce).
        line: 1-based line (JSONL) or row (Parquet, JSON array) number, for the reject record.
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
    has_messages = raw.get(MESSAGES) is not None
    has_prompt = raw.get(PROMPT) is not None
    if not has_messages and not has_prompt:
        nulls = [k for k in (MESSAGES, PROMPT) if k in raw]
        if nulls:
            return bad(
                "missing_prompt",
                " and ".join(f"`{k}` is null" for k in nulls) + "; give the prompt as a string "
                "(`prompt`) or a list of {role, content} turns (`messages`)",
            )
        keys = sorted(str(k) for k in raw)[:20]
        return bad(
            "missing_prompt",
            f"row has neither `messages` nor `prompt` (keys present: {keys})",
        )
    reference = raw.get(REFERENCE)
    if isinstance(reference, bool):
        reference = "true" if reference else "false"
    elif reference is not None and not isinstance(reference, (str, int, float)):
        return bad("bad_reference", f"`reference` must be a string, got {type(reference).__name__}")
    reference = None if reference is None else str(reference)
    prompt: str | None = None
    if has_messages:
        msgs = raw[MESSAGES]
        if not isinstance(msgs, list):
            return bad(
                "bad_message",
                f"`messages` is a {type(msgs).__name__}, expected a list of {{role, content}}",
            )
        if not msgs:
            return bad("empty_prompt", "`messages` must be a non-empty list of {role, content}")
        turns: list[dict[str, str]] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return bad(
                    "bad_message", f"messages[{i}] is a {type(m).__name__}, expected an object"
                )
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                shown = (
                    role if isinstance(role, (str, int, float, type(None))) else type(role).__name__
                )
                return bad(
                    "bad_role", f"messages[{i}].role is {shown!r}; allowed: {', '.join(ROLES)}"
                )
            if not isinstance(content, str):
                return bad(
                    "non_string_content",
                    f"messages[{i}].content is {type(content).__name__}, expected a string",
                )
            turns.append({"role": str(role), "content": content})
        if turns[-1]["role"] == "assistant":
            if reference is None:
                reference = turns[-1]["content"]
            turns = turns[:-1]
        if not any(t["role"] == "user" and t["content"].strip() for t in turns):
            return bad("empty_prompt", "`messages` has no non-empty user turn before the answer")
    else:
        p = raw[PROMPT]
        if not isinstance(p, str):
            return bad("non_string_content", f"`prompt` is {type(p).__name__}, expected a string")
        if not p.strip():
            return bad("empty_prompt", "`prompt` is empty")
        prompt = p
        turns = [{"role": "user", "content": prompt_template.replace("{prompt}", p)}]
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    rid = raw.get(ID)
    if rid is not None and (
        isinstance(rid, bool) or not isinstance(rid, (str, int)) or not str(rid).strip()
    ):
        got = repr(rid) if isinstance(rid, (str, bool)) else type(rid).__name__
        return bad("bad_id", f"`id` must be a non-empty string or an integer, got {got}")
    texts = [t["content"] for t in turns] + [
        s for s in (prompt, reference, rid) if isinstance(s, str)
    ]
    if not all(_encodable(t) for t in texts):
        return bad("invalid_utf8", "a string holds a lone surrogate escape (\\ud800-\\udfff)")
    row_id = str(rid) if rid is not None else input_id(turns, prompt)
    return {ID: row_id, MESSAGES: turns, PROMPT: prompt, REFERENCE: reference}, None


def render_row(
    tok: Any, messages: list[dict[str, str]], apply_chat_template: bool
) -> tuple[str, list[int], str | None]:
    """Render one row's turns as an engine will (`prompts.render_prompt`), or say why not.

    Chat templates refuse some turns by raising (Llama-2 and Mistral style: "roles must
    alternate", "system role not supported"); that is one row's problem, not its batch's.

    Returns:
        `(text, ids, None)`, or `("", [], "chat_template: <the template's message>")`.

    Raises:
        DataError: the template itself does not compile (every row would fail the same way).
    """
    from distray.prompts import render_prompt

    try:
        import jinja2  # transformers renders templates with it; a plain prompt needs none

        syntax_errors: tuple[type[Exception], ...] = (jinja2.TemplateSyntaxError,)
        refusals: tuple[type[Exception], ...] = (jinja2.TemplateError,)
    except ImportError:
        syntax_errors, refusals = (), ()
    row_errors: tuple[type[Exception], ...] = (*refusals, TypeError, ValueError, KeyError, IndexError)
    try:
        text, ids = render_prompt(tok, messages, apply_chat_template)
    except syntax_errors as e:
        name = getattr(tok, "name_or_path", "the model")
        raise DataError(
            f"the chat template of `{name}` does not compile ({e}); fix chat_template in its "
            "tokenizer files, or set teacher.apply_chat_template: false"
        ) from e
    except row_errors as e:
        roles = "/".join(m.get("role", "?") for m in messages)
        return "", [], f"chat_template: the chat template refuses these turns ({roles}): {e}"[:500]
    return text, ids, None


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
            "read",
            "invalid_utf8",
            f"byte {e.start} (0x{data[e.start]:02x}) is not UTF-8; re-encode the file as UTF-8",
            data[:2000].decode("utf-8", "replace"),
            line,
            source,
        )
    try:
        raw, long_ints = _loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        detail = str(e)[:200] if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        return None, Reject("read", "invalid_json", detail, text[:2000], line, source)
    if long_ints:
        rej = _long_int_reject(raw, text, line, source)
        if rej is not None:
            return None, rej
    return normalize_row(raw, line=line, source=source, **kwargs)


def write_rejects(path: str, rejects: Iterable[Reject]) -> int:
    """Write rejects to `path`: Parquet (REJECT_SCHEMA) when it ends in .parquet, else JSONL.

    Returns:
        The number of rejects written.
    """
    rows = [r.to_dict() for r in rejects]
    if path.endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        # Through write_bytes: atomic (a temp name, then a rename), as every other output.
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=REJECT_SCHEMA), buf)
        write_bytes(path, [buf.getvalue()])
        return len(rows)
    return write_jsonl(path, rows)


# ---- reading inputs -------------------------------------------------------------------------

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")

_BOM = b"\xef\xbb\xbf"
_READ_CHUNK_BYTES = 1 << 20

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
        chunk = stream.read(_READ_CHUNK_BYTES)
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


def _iter_file(path: str, fs: pafs.FileSystem, **kwargs: Any) -> Iterator[tuple[int, Result]]:
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
            whole, long_ints = _loads(data.removeprefix(_BOM).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            whole, long_ints = None, False
        if isinstance(whole, (list, dict)):
            for i, raw in enumerate(whole if isinstance(whole, list) else [whole], start=1):
                rej = _long_int_reject(raw, _row_text(raw), i, path) if long_ints else None
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
        for _, result in _iter_file(path, fs, **kwargs):
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
        for n, (row, rej) in _iter_file(f, fs, **kwargs):
            if row is not None:
                if row[ID] in seen:
                    yield (
                        None,
                        Reject(
                            "validate",
                            "duplicate_id",
                            f"id {row[ID]!r} appeared earlier; give each row a distinct id",
                            _row_text(row),
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
                    "prepare", "chat_template", detail, _row_text(row), input_id=row[ID]
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
