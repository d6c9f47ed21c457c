"""Do the teacher's token ids mean the same tokens for the student? Checked on the driver.

    .venv/bin/python -m pytest tests/unit/test_train_data.py -q -k vocab

Training on the teacher's `response_token_ids` and top-k logprobs only makes sense when both
models share one tokenizer. `check_vocab` compares local teacher tokenizers with the student's,
then looks at a small sample of teacher-data rows (`sample_rows`): every id must fit the
student's embedding table, and the student must decode the ids back to the teacher's text.
"""

from __future__ import annotations

import os
from typing import Any

from distray.config import DistrayConfig
from distray.formats import RESPONSE, RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS
from distray.storage import filesystem_for, list_files

__all__ = ["check_vocab", "sample_rows", "teacher_tokenizers"]


def sample_rows(path: str, n: int = 32) -> list[dict[str, Any]]:
    """The first `n` rows of the first Parquet file under `path` (nothing more is read)."""
    import pyarrow.parquet as pq

    files = list_files(path, (".parquet",))
    if not files:
        return []
    fs, _ = filesystem_for(path)
    with fs.open_input_file(files[0]) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in (RESPONSE, RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS, "teacher") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=n, columns=cols):
            return batch.to_pylist()
    return []


def check_vocab(
    student_tokenizer: Any,
    student_vocab_size: int,
    rows: list[dict[str, Any]],
    teacher_tokenizers: dict[str, Any] | None = None,
    *,
    student_name: str = "student",
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

    Returns:
        None when the vocabularies agree, else a message naming both sizes and a mismatch.
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
    max_id = -1
    for r in rows:
        for t in r.get(RESPONSE_TOKEN_IDS) or []:
            max_id = max(max_id, int(t))
        for pos in r.get(TOPK_TOKEN_IDS) or []:
            for t in pos or []:
                max_id = max(max_id, int(t))
    if max_id >= student_vocab_size:
        return (
            f"teacher data holds token id {max_id}, outside student `{student_name}`'s "
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
