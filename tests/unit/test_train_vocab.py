"""The vocabulary check covers every shard of the teacher data, not the first rows of one file.

    .venv/bin/python -m pytest tests/unit/test_train_vocab.py -q
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distray import formats as F
from distray.errors import DataError
from distray.train import vocab


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from distray.tiny import make_tokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


def _rows(tok, n: int, tag: str, bad_at: int | None = None) -> list[dict]:
    ids = tok("cba", add_special_tokens=False)["input_ids"]
    rows = []
    for i in range(n):
        topk = [[t, 7] for t in ids]
        if i == bad_at:
            topk[1][1] = len(tok) + 737  # one id beyond the student's table, deep in the shard
        rows.append({F.ID: f"{tag}-{i}", F.RESPONSE: "cba", F.RESPONSE_TOKEN_IDS: ids, F.TOPK_TOKEN_IDS: topk, F.TEACHER: tag})
    return rows


def _write(folder: Path, shards: list[list[dict]], row_group_size: int = 16) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([F.TEACHER_DATA_SCHEMA.field(c) for c in (F.ID, F.RESPONSE, F.RESPONSE_TOKEN_IDS, F.TOPK_TOKEN_IDS, F.TEACHER)])
    for j, rows in enumerate(shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / f"part-{j}.parquet", row_group_size=row_group_size)
    return str(folder)


def test_the_sample_spans_every_shard(tok, tmp_path):
    path = _write(tmp_path / "d", [_rows(tok, 40, "a"), _rows(tok, 40, "b"), _rows(tok, 3, "c")])
    assert {r[F.TEACHER] for r in vocab.sample_rows(path)} == {"a", "b", "c"}


def test_an_out_of_vocabulary_id_deep_in_a_later_shard_is_caught(tok, tmp_path):
    path = _write(tmp_path / "d", [_rows(tok, 40, "a"), _rows(tok, 40, "b", bad_at=35)])
    problem = vocab.check_teacher_data(path, tok, len(tok))
    assert problem and str(len(tok) + 737) in problem and "part-1.parquet" in problem
    # The same data within the vocabulary passes.
    ok = _write(tmp_path / "ok", [_rows(tok, 40, "a"), _rows(tok, 40, "b")])
    assert vocab.check_teacher_data(ok, tok, len(tok)) is None


def test_max_token_id_reads_every_shard_with_or_without_statistics(tok, tmp_path):
    path = _write(tmp_path / "d", [_rows(tok, 40, "a"), _rows(tok, 40, "b", bad_at=35)])
    assert vocab.max_token_id(path)[0] == len(tok) + 737
    nostats = tmp_path / "nostats"
    nostats.mkdir()
    table = pa.Table.from_pylist(_rows(tok, 20, "x", bad_at=19))
    pq.write_table(table, nostats / "part-0.parquet", write_statistics=False)
    assert vocab.max_token_id(str(nostats)) == (len(tok) + 737, str(nostats / "part-0.parquet"))


def test_a_negative_token_id_deep_in_a_shard_is_caught_before_training(tok, tmp_path):
    rows = _rows(tok, 40, "b")
    rows[33][F.TOPK_TOKEN_IDS][1][1] = -5  # past the rows the sample reads: only the range sees it
    path = _write(tmp_path / "d", [_rows(tok, 40, "a"), rows])
    with pytest.raises(DataError, match=r"token id -5 \(in .*part-1\.parquet\).*bad_token_id"):
        vocab.check_teacher_data(path, tok, len(tok))
    assert vocab.token_id_range(path)[0] == (-5, str(Path(path) / "part-1.parquet"))
    nostats = tmp_path / "nostats"
    nostats.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), nostats / "part-0.parquet", write_statistics=False)
    assert vocab.token_id_range(str(nostats))[0][0] == -5
