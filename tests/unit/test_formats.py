"""The data contract: input forms, reject reasons, stable ids, filesystems, schemas.

    pytest tests/unit/test_formats.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distray import formats, inputs, storage
from distray.errors import DataError
from distray.formats import (
    ID,
    MESSAGES,
    PROMPT,
    REFERENCE,
    REJECT_REASONS,
    REJECT_SCHEMA,
    TEACHER_DATA_SCHEMA,
    normalize_row,
    parse_jsonl_line,
    write_rejects,
)
from distray.inputs import check_input, iter_input_file, iter_input_rows


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _split(path: str, **kwargs: Any) -> tuple[list[dict[str, Any]], list[formats.Reject]]:
    valid, rejects = [], []
    for row, rej in iter_input_rows(path, **kwargs):
        assert (row is None) != (rej is None)
        if row is not None:
            valid.append(row)
        else:
            assert rej is not None
            rejects.append(rej)
    return valid, rejects


# ---- the acceptance case -------------------------------------------------------------------


def test_100_lines_3_corrupt_gives_97_valid_3_rejected(tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": f"question {i}?", "reference": str(i)}) for i in range(100)]
    lines[10] = '{"prompt": "cut off'  # truncated JSON
    lines[40] = json.dumps({"messages": [{"role": "robot", "content": "hi"}]})
    lines[70] = json.dumps({"text": "no prompt here"})
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rejects_path = tmp_path / "out" / "rejects.jsonl"

    check = check_input(str(path), rejects_path=str(rejects_path))

    assert (check.valid, check.rejected) == (97, 3)
    assert check.reasons == {"invalid_json": 1, "bad_role": 1, "missing_prompt": 1}
    written = [json.loads(x) for x in rejects_path.read_text().splitlines()]
    assert [r["line"] for r in written] == [11, 41, 71]
    assert all(r["reason"].split(":")[0] in REJECT_REASONS for r in written)
    assert "robot" in written[1]["reason"] and "robot" in written[1]["row"]
    assert "97 valid, 3 rejected" in check.summary()


# ---- one row per reject reason -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"prompt": "caf\xe9"}', "invalid_utf8"),
        (b'{"prompt": "\\ud800 lone surrogate"}', "invalid_utf8"),
        (b'{"prompt": "x",}', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'["a list"]', "not_an_object"),
        (b'"a string"', "not_an_object"),
        (b'{"id": "a"}', "missing_prompt"),
        (b'{"prompt": "   "}', "empty_prompt"),
        (b'{"messages": []}', "empty_prompt"),
        (b'{"messages": [{"role": "system", "content": "be brief"}]}', "empty_prompt"),
        (b'{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}', "empty_prompt"),
        (b'{"messages": ["hello"]}', "bad_message"),
        (b'{"messages": [{"role": "tool", "content": "x"}]}', "bad_role"),
        (b'{"messages": [{"content": "x"}]}', "bad_role"),
        (b'{"messages": [{"role": "user", "content": ["x"]}]}', "non_string_content"),
        (b'{"messages": [{"role": "user", "content": null}]}', "non_string_content"),
        (b'{"prompt": 42}', "non_string_content"),
        (b'{"prompt": "x", "reference": {"a": 1}}', "bad_reference"),
        (b'{"prompt": "x", "id": [1]}', "bad_id"),
        (b'{"prompt": "x", "id": ""}', "bad_id"),
        (b'{"prompt": "x", "id": true}', "bad_id"),
    ],
)
def test_each_bad_row_is_rejected_with_its_reason(line: bytes, reason: str) -> None:
    row, rej = parse_jsonl_line(line, line=7, source="in.jsonl")
    assert row is None and rej is not None
    assert rej.reason == reason
    assert rej.reason in REJECT_REASONS
    assert rej.line == 7 and rej.source == "in.jsonl"
    assert rej.detail
    # every reject can be written as UTF-8, whatever it held
    json.dumps(rej.to_dict(), ensure_ascii=False).encode("utf-8")


def test_duplicate_ids_are_rejected_with_their_line(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "a", "id": "q1"},
            {"prompt": "b", "id": "q1"},
            {"prompt": "same text"},
            {"prompt": "same text"},  # same content, so the same content-hash id
        ],
    )
    valid, rejects = _split(str(path))
    assert [r[PROMPT] for r in valid] == ["a", "same text"]
    assert [(r.reason, r.line) for r in rejects] == [("duplicate_id", 2), ("duplicate_id", 4)]
    assert "q1" in rejects[0].detail


# ---- the two input forms -------------------------------------------------------------------


def test_chat_row_final_assistant_turn_is_the_reference() -> None:
    raw = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "rev abc="},
            {"role": "assistant", "content": "cba"},
        ]
    }
    row, rej = normalize_row(raw)
    assert rej is None and row is not None
    assert row[MESSAGES] == raw["messages"][:2]
    assert row[REFERENCE] == "cba"
    assert row[PROMPT] is None
    # an explicit reference wins over the assistant turn
    row, _ = normalize_row({**raw, "reference": "ABC"})
    assert row is not None and row[REFERENCE] == "ABC"


def test_prompt_row_gets_template_and_system_prompt() -> None:
    row, _ = normalize_row(
        {"prompt": "2+3", "reference": 5, "id": 17},
        system_prompt="Answer with a number.",
        prompt_template="Q: {prompt}\nA:",
    )
    assert row == {
        ID: "17",
        MESSAGES: [
            {"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": "Q: 2+3\nA:"},
        ],
        PROMPT: "2+3",
        REFERENCE: "5",
    }
    # a row with its own system turn keeps it
    row, _ = normalize_row(
        {"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "hi"}]},
        system_prompt="default",
    )
    assert row is not None and row[MESSAGES][0]["content"] == "mine"


def test_ids_are_stable_content_hashes() -> None:
    a, _ = normalize_row({"prompt": "hello"})
    b, _ = normalize_row({"prompt": "hello", "reference": "ignored by the id"})
    c, _ = normalize_row({"prompt": "hello!"})
    assert a is not None and b is not None and c is not None
    assert a[ID] == b[ID] != c[ID]
    assert len(a[ID]) == 32 and int(a[ID], 16) >= 0
    # Pinned literals: an id must not change between releases, or caches and resumes break.
    # The scheme: sha256 of the parts as compact JSON, first 32 hex digits.
    assert formats.content_hash("x", 1) == "59402b0471b497c05ad760c869c511f9"
    assert hashlib.sha256(b'["x",1]').hexdigest()[:32] == "59402b0471b497c05ad760c869c511f9"
    assert a[ID] == "c3b030ac5077012516c37adacace2f2e"
    assert a[ID] == formats.input_id([{"role": "user", "content": "hello"}], "hello")


# ---- files, folders, filesystems -----------------------------------------------------------


def test_bom_crlf_blank_lines_and_no_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n   \n{"prompt": "b"}\r\n{"prompt": "c"}')
    valid, rejects = _split(str(path))
    assert [r[PROMPT] for r in valid] == ["a", "b", "c"]
    assert rejects == []


def test_lines_split_across_read_chunks(tmp_path: Path) -> None:
    rows = [{"prompt": f"prompt number {i} " + "x" * i} for i in range(30)]
    path = _jsonl(tmp_path / "c.jsonl", rows)
    with mock.patch.object(inputs, "READ_CHUNK_BYTES", 7):
        valid, rejects = _split(str(path))
    assert [r[PROMPT] for r in valid] == [r["prompt"] for r in rows]
    assert rejects == []


def test_parquet_input_both_forms(tmp_path: Path) -> None:
    table = pa.Table.from_pylist(
        [
            {"messages": [{"role": "user", "content": "hi"}], "prompt": None, "id": "a"},
            {"messages": None, "prompt": "hello", "id": "b"},
            {"messages": None, "prompt": None, "id": "c"},
        ]
    )
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    valid, rejects = _split(str(path))
    assert [r[ID] for r in valid] == ["a", "b"]
    assert [(r.reason, r.line) for r in rejects] == [("missing_prompt", 3)]


def test_not_really_parquet_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet"):
        list(iter_input_file(str(path)))


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}, {"prompt": "c"}], indent=2))
    valid, rejects = _split(str(path))
    assert [r[PROMPT] for r in valid] == ["a", "c"]
    assert [(r.reason, r.line) for r in rejects] == [("empty_prompt", 2)]


def test_folder_of_files(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", [{"prompt": "1"}, {"prompt": "2"}])
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "sub" / "b.jsonl", [{"prompt": "3"}])
    _jsonl(tmp_path / "_SUCCESS.jsonl", [{"prompt": "hidden"}])
    _jsonl(tmp_path / ".tmp.jsonl", [{"prompt": "hidden"}])
    (tmp_path / "notes.txt").write_text("not input")
    valid, _ = _split(str(tmp_path))
    assert sorted(r[PROMPT] for r in valid) == ["1", "2", "3"]


def test_missing_and_empty_inputs_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        check_input(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        check_input(str(tmp_path / "empty"))


def test_fsspec_uri_is_readable() -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    with fs.open("/distray-test/in.jsonl", "wb") as f:
        f.write(b'{"prompt": "from memory"}\nnot json\n')
    try:
        check = check_input("memory://distray-test/in.jsonl")
        assert (check.valid, check.rejected) == (1, 1)
    finally:
        fs.rm("/distray-test", recursive=True)


# ---- writing rejects and the teacher-data schema ---------------------------------------------


def test_rejects_parquet_follows_reject_schema(tmp_path: Path) -> None:
    _, rej = parse_jsonl_line(b"{oops", line=3, source="x.jsonl")
    assert rej is not None
    path = tmp_path / "rejects" / "part-0.parquet"
    assert write_rejects(str(path), [rej]) == 1
    table = pq.read_table(path)
    assert table.schema.equals(REJECT_SCHEMA)
    assert table.column("line").to_pylist() == [3]


def test_teacher_data_schema_round_trips_three_rows(tmp_path: Path) -> None:
    rows = [
        {
            "id": f"h{i}",
            "input_id": f"in{i}",
            "messages": [{"role": "user", "content": f"rev abc{i}="}],
            "prompt": None,
            "reference": None if i == 2 else f"{i}cba",
            "response": f"{i}cba",
            "response_token_ids": [5, 6, 7] if i else None,
            "topk_token_ids": [[5, 9], [6, 1], [7, 2]] if i else None,
            "topk_logprobs": [[-0.1, -2.5], [-0.2, -3.0], [-0.05, -4.0]] if i else None,
            "finish_reason": "stop",
            "prompt_tokens": 9,
            "completion_tokens": 3,
            "teacher": "tiny-teacher",
            "sample_index": 0,
        }
        for i in range(3)
    ]
    table = pa.Table.from_pylist(rows, schema=TEACHER_DATA_SCHEMA)
    pq.write_table(table, tmp_path / "part.parquet")
    back = pq.read_table(tmp_path / "part.parquet")
    assert back.schema.equals(TEACHER_DATA_SCHEMA)
    assert back.to_pylist()[1]["topk_token_ids"] == [[5, 9], [6, 1], [7, 2]]
    assert set(TEACHER_DATA_SCHEMA.names) >= {ID, MESSAGES, PROMPT, REFERENCE, formats.RESPONSE}


# ---- property: the reader never crashes and accounts for every line ---------------------------


def _expected_lines(blob: bytes) -> list[int]:
    """1-based numbers of the lines a reader must account for: the non-blank ones."""
    out = []
    for n, line in enumerate(blob.split(b"\n"), start=1):
        if n == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if line.strip():
            out.append(n)
    return out


_valid_row = st.builds(
    lambda p, i: json.dumps({"prompt": p, "id": i}).encode(),
    st.text(min_size=1).filter(str.strip),
    st.one_of(st.none(), st.integers(0, 5), st.text(max_size=3)),
)
_line = st.one_of(
    _valid_row,
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"", b"  ", b"\r", b"{}", b"null", b'{"prompt": ""}', b"\xef\xbb\xbf"]),
)
# tmp_path is shared by the examples on purpose: each one overwrites the same file.
_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _check_accounting(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(blob)
    expected = _expected_lines(blob)
    with mock.patch.object(inputs, "READ_CHUNK_BYTES", 16):  # lines straddle reads
        seen = [n for n, _ in inputs.iter_file_rows(str(path), storage.filesystem_for(str(path))[0])]
        valid, rejects = _split(str(path))
    assert seen == expected  # each non-blank line exactly once, in order
    assert len(valid) + len(rejects) == len(expected)
    assert len({r[ID] for r in valid}) == len(valid)
    for rej in rejects:
        assert rej.line in expected
        json.dumps(rej.to_dict(), ensure_ascii=False).encode("utf-8")


@_SETTINGS
@given(blob=st.binary(max_size=300))
def test_reader_accounts_for_arbitrary_bytes(tmp_path: Path, blob: bytes) -> None:
    _check_accounting(tmp_path, blob)


@_SETTINGS
@given(lines=st.lists(_line, max_size=25), crlf=st.booleans(), final_newline=st.booleans())
def test_reader_accounts_for_mixed_lines(
    tmp_path: Path, lines: list[bytes], crlf: bool, final_newline: bool
) -> None:
    sep = b"\r\n" if crlf else b"\n"
    blob = sep.join(lines) + (sep if final_newline and lines else b"")
    _check_accounting(tmp_path, blob)


def test_a_rejected_row_keeps_its_own_id_for_tracing(tmp_path: Path) -> None:
    """A row rejected at validation names the input id it carried (null when it has none or an
    unusable one), in the reject record and in the rejects table generate writes."""
    from distray.teacher.reader import iter_prompt_blocks, rejects_table

    rows = [
        {"id": "bad-role", "messages": [{"role": "robot", "content": "x"}]},
        {"id": 7, "prompt": ""},
        {"id": True, "prompt": "fine but a boolean id"},
        {"messages": [{"role": "robot", "content": "no id"}]},
        {"id": "ok", "prompt": "a good row"},
    ]
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa.concat_tables(iter_prompt_blocks(str(p), system_prompt=None, prompt_template="{prompt}"))
    rej = rejects_table(table).to_pylist()
    assert [(r["line"], r["input_id"]) for r in rej] == [(1, "bad-role"), (2, "7"), (3, None), (4, None)]
    assert all(r["reason"] for r in rej)
