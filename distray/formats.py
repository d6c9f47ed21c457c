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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from distray.errors import DataError
from distray.storage import write_bytes, write_jsonl

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
    "Reject",
    "content_hash",
    "input_id",
    "normalize_row",
    "render_row",
    "parse_jsonl_line",
    "write_rejects",
    "loads_json",
    "long_int_reject",
    "row_text",
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


def row_text(raw: Any) -> str:
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


def loads_json(text: str) -> tuple[Any, bool]:
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


def long_int_reject(raw: Any, text: str, line: int | None, source: str | None) -> Reject | None:
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
        # The row's own id, when it has a usable one, so the reject can be traced to it.
        rid = raw.get(ID) if isinstance(raw, dict) else None
        usable = isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip()
        return None, Reject("validate", reason, detail, row_text(raw), line, source,
                            input_id=str(rid) if usable else None)

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
        raw, long_ints = loads_json(text)
    except (json.JSONDecodeError, RecursionError) as e:
        detail = str(e)[:200] if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        return None, Reject("read", "invalid_json", detail, text[:2000], line, source)
    if long_ints:
        rej = long_int_reject(raw, text, line, source)
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
