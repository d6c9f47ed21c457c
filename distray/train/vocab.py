"""Do the teacher's token ids mean the same tokens for the student? Checked on the driver.

    .venv/bin/python -m pytest tests/unit/test_train_data.py -q -k vocab

Training on the teacher's `response_token_ids` and top-k logprobs only makes sense when both
models share one tokenizer. `check_vocab` compares local teacher tokenizers with the student's,
then looks at the teacher data: the smallest and largest token id of every shard
(`token_id_range`, from the Parquet statistics, read from the column where a file has none)
must lie inside the student's embedding table (a negative id would index it from the end, or
crash `gather`), and the student must decode the ids of a sample from every shard
(`sample_rows`) back to the teacher's text. `check_teacher_data` runs all of it on a folder.
"""

from __future__ import annotations

import os
from typing import Any

from distray.config import DistrayConfig
from distray.errors import DataError
from distray.formats import RESPONSE, RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS
from distray.storage import filesystem_for, list_files

__all__ = [
    "check_teacher_data", "check_vocab", "max_token_id", "sample_rows", "teacher_tokenizers", "token_id_range",
]

#: Columns holding teacher token ids.
TOKEN_ID_COLUMNS = (RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS)


def sample_rows(path: str, n: int = 64) -> list[dict[str, Any]]:
    """About `n` rows spread over every Parquet file under `path`: the first rows of each file
    (at least one per file), so a shard written by another teacher or run is not missed."""
    import pyarrow.parquet as pq

    files = list_files(path, (".parquet",))
    if not files:
        return []
    per_file = max(1, n // len(files))
    fs, _ = filesystem_for(path)
    rows: list[dict[str, Any]] = []
    for file in files:
        with fs.open_input_file(file) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in (RESPONSE, RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS, "teacher") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=per_file, columns=cols):
                rows.extend(batch.to_pylist())
                break
    return rows


def _file_token_range(pf: Any) -> tuple[int, int] | None:
    """The smallest and largest id in the token-id columns of one Parquet file; None when
    there is none.

    Row-group statistics answer without reading data; a row group without them (written with
    statistics off, or by another writer) has its columns read and reduced.
    """
    import pyarrow.compute as pc

    names = [c for c in TOKEN_ID_COLUMNS if c in pf.schema_arrow.names]
    lo: int | None = None
    hi: int | None = None

    def take(a: Any, b: Any) -> None:
        nonlocal lo, hi
        lo = int(a) if lo is None else min(lo, int(a))
        hi = int(b) if hi is None else max(hi, int(b))

    meta = pf.metadata
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for name in names:
            leaves = [
                group.column(j) for j in range(group.num_columns)
                if group.column(j).path_in_schema.split(".")[0] == name
            ]
            stats = [c.statistics for c in leaves]
            if leaves and all(s is not None and s.has_min_max for s in stats):
                for s in stats:
                    take(s.min, s.max)
                continue
            if leaves and all(s is not None and s.null_count == group.num_rows for s in stats):
                continue  # an all-null column
            col: Any = pf.read_row_group(rg, columns=[name]).column(0)
            while hasattr(col.type, "value_type"):
                col = pc.list_flatten(col)
            m = pc.min_max(col).as_py()
            if m["min"] is not None:
                take(m["min"], m["max"])
    return None if lo is None or hi is None else (lo, hi)


def token_id_range(path: str) -> tuple[tuple[int, str | None], tuple[int, str | None]]:
    """The smallest and the largest teacher token id in any Parquet file under `path`, each with
    the file holding it.

    Returns:
        `((min id, file), (max id, file))`, or `((0, None), (-1, None))` when the data has no
        token ids.
    """
    import pyarrow.parquet as pq

    fs, _ = filesystem_for(path)
    low: tuple[int, str | None] = (0, None)
    high: tuple[int, str | None] = (-1, None)
    for file in list_files(path, (".parquet",)):
        with fs.open_input_file(file) as f:
            r = _file_token_range(pq.ParquetFile(f))
        if r is None:
            continue
        if low[1] is None or r[0] < low[0]:
            low = (r[0], file)
        if r[1] > high[0]:
            high = (r[1], file)
    return low, high


def max_token_id(path: str) -> tuple[int, str | None]:
    """The largest teacher token id in any Parquet file under `path`, and the file holding it.

    Returns:
        `(max id, file)`, or `(-1, None)` when the data has no token ids.
    """
    return token_id_range(path)[1]


def check_teacher_data(
    path: str,
    student_tokenizer: Any,
    student_vocab_size: int,
    teacher_tokenizers: dict[str, Any] | None = None,
    *,
    student_name: str = "student",
) -> str | None:
    """`check_vocab` over the teacher data under `path`: every shard's smallest and largest
    token id, and a sample of rows from every shard.

    Returns:
        None when the vocabularies agree, else a message (naming the file of an out-of-range id).

    Raises:
        DataError: a negative token id (naming its file).
    """
    (low, low_file), (top, where) = token_id_range(path)
    return check_vocab(
        student_tokenizer,
        student_vocab_size,
        sample_rows(path),
        teacher_tokenizers,
        student_name=student_name,
        max_token_id=(top, where) if where else None,
        min_token_id=(low, low_file) if low_file else None,
    )


def check_vocab(
    student_tokenizer: Any,
    student_vocab_size: int,
    rows: list[dict[str, Any]],
    teacher_tokenizers: dict[str, Any] | None = None,
    *,
    student_name: str = "student",
    max_token_id: tuple[int, str] | None = None,
    min_token_id: tuple[int, str] | None = None,
) -> str | None:
    """Check that teacher token ids mean the same tokens for the student.

    Three checks, cheapest first: each local teacher tokenizer maps every token to the same id
    as the student's; every teacher token id is inside the student's embedding table; the
    student tokenizer decodes the teacher's `response_token_ids` back to the teacher's text.

    Args:
        student_tokenizer: the student's tokenizer.
        student_vocab_size: rows of the student's embedding table (`config.vocab_size`).
        rows: a sample of teacher-data rows (response, response_token_ids, topk_token_ids).
        teacher_tokenizers: {teacher folder: tokenizer} for teachers available locally.
        student_name: for messages.
        max_token_id: `(id, file)`, the largest token id of the whole data and where it is
            (`token_id_range()`); checked beside the ids of `rows`.
        min_token_id: `(id, file)`, the smallest, likewise.

    Returns:
        None when the vocabularies agree, else a message naming both sizes and a mismatch.

    Raises:
        DataError: a token id is negative (broken data, whatever the student).
    """
    s_vocab = student_tokenizer.get_vocab()
    for name, ttok in (teacher_tokenizers or {}).items():
        t_vocab = ttok.get_vocab()
        if t_vocab == s_vocab:
            continue
        for tok, tid in sorted(t_vocab.items(), key=lambda kv: kv[1]):
            if s_vocab.get(tok) != tid:
                where = s_vocab.get(tok)
                return (
                    f"teacher `{name}` has a {len(t_vocab)}-token vocabulary and student "
                    f"`{student_name}` {len(s_vocab)}: token {tok!r} is id {tid} for the teacher "
                    f"but {'absent' if where is None else f'id {where}'} for the student"
                )
        return (
            f"student `{student_name}` vocabulary ({len(s_vocab)} tokens) has tokens the teacher "
            f"`{name}` ({len(t_vocab)} tokens) lacks"
        )
    max_id, min_id = -1, 0
    for r in rows:
        seen = [int(t) for t in r.get(RESPONSE_TOKEN_IDS) or []]
        seen += [int(t) for pos in r.get(TOPK_TOKEN_IDS) or [] for t in pos or []]
        max_id, min_id = max([max_id, *seen]), min([min_id, *seen])
    low_where = ""
    if min_token_id is not None and min_token_id[0] < min_id:
        min_id, low_where = min_token_id[0], f" (in {min_token_id[1]})"
    if min_id < 0:
        # Not a vocabulary mismatch (another student would not help): the data is broken.
        raise DataError(
            f"teacher data holds token id {min_id}{low_where}: a negative id is no token of any "
            "vocabulary (a teacher endpoint returned a bad `token_id:`). Delete that shard and "
            "rerun `distray generate`: its rows are asked again, and ids like it are now "
            "rejected as `bad_token_id`"
        )
    where = ""
    if max_token_id is not None and max_token_id[0] > max_id:
        max_id, where = max_token_id[0], f" (in {max_token_id[1]})"
    if max_id >= student_vocab_size:
        return (
            f"teacher data holds token id {max_id}{where}, outside student `{student_name}`'s "
            f"vocabulary of {student_vocab_size} ids (student tokenizer: {len(s_vocab)} tokens)"
        )
    checked = bad = 0
    example = ""
    for r in rows:
        ids, text = r.get(RESPONSE_TOKEN_IDS), r.get(RESPONSE)
        if not ids or not text or not text.strip():
            continue
        checked += 1
        decoded = student_tokenizer.decode(ids, skip_special_tokens=True).strip()
        want = text.strip()
        head = min(len(want), 32)
        if not (decoded[:head] == want[:head] or want.startswith(decoded[:head])):
            bad += 1
            example = example or f"{want[:40]!r} decodes as {decoded[:40]!r}"
    if checked and bad * 2 > checked:
        return (
            f"the student tokenizer of `{student_name}` ({len(s_vocab)} tokens) does not decode "
            f"the teacher's response_token_ids to the teacher's text in {bad} of {checked} sampled "
            f"rows (e.g. {example})"
        )
    return None


def teacher_tokenizers(cfg: DistrayConfig) -> dict[str, Any]:
    """{teacher folder: tokenizer} for every teacher of the run whose tokenizer is a local folder.

    API teachers (and hub ids) have no local tokenizer; `check_vocab` then relies on the
    token ids in the data.
    """
    from transformers import AutoTokenizer

    out = {}
    for t in cfg.all_teachers:
        if os.path.isdir(t.model) and any(
            os.path.isfile(os.path.join(t.model, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            remote_code = bool(getattr(t, "trust_remote_code", False))
            out[t.model] = AutoTokenizer.from_pretrained(t.model, trust_remote_code=remote_code)
    return out
