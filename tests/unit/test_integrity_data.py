"""Run integrity on the data path (issue 14): no poisoned row, no lost split row, durable and
recoverable shards, cache keys that follow every setting that changes an answer.

    pytest tests/unit/test_integrity_data.py -q
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distray import formats as F
from distray import inputs, storage
from distray.answers import numbers_equal
from distray.config import FilterConfig, HFTeacher, OpenAITeacher, SamplingConfig, VLLMTeacher
from distray.engines import common
from distray.engines.results import reject_row
from distray.errors import DataError
from distray.teacher import rows as R
from distray.teacher import writer as W
from distray.teacher.filters import check_response
from distray.teacher.reader import iter_prompt_blocks
from distray.teacher.rows import cache_key, expand_rows, model_fingerprint, sampling_key

HUGE = "1" * 5000  # over Python's 4,300-digit int-from-string limit
MSGS = [{"role": "user", "content": "What is 2+3?"}]

# A template in the style of Llama-2 / Mistral's: no system role, roles must alternate.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def strict_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A byte-level tokenizer folder whose chat template raises on a system turn."""
    from transformers import AutoTokenizer

    from distray.tiny import make_tokenizer

    out = make_tokenizer(tmp_path_factory.mktemp("strict-tok"))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = STRICT_TEMPLATE
    tok.save_pretrained(out)
    return out


# ---- §2 one row never crashes a run --------------------------------------------------------


def test_jsonl_row_with_a_huge_integer_is_a_reject(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_text(
        '{"prompt": "ok"}\n'
        f'{{"prompt": "big meta", "meta": {HUGE}}}\n'
        f'{{"prompt": "big id", "id": -{HUGE}}}\n'
        '{"prompt": "ok too"}\n'
    )
    check = inputs.check_input(str(p))
    assert (check.valid, check.rejected) == (2, 2)
    assert check.reasons == {"number_too_long": 2}
    assert "5000 digits" in check.examples["number_too_long"]
    kw = {"system_prompt": None, "prompt_template": "{prompt}"}
    rows = pa.concat_tables(iter_prompt_blocks(str(p), **kw)).to_pylist()
    assert [r["_line"] for r in rows if r["_reject_reason"]] == [2, 3]


def test_json_array_with_a_huge_integer_rejects_only_that_row(tmp_path: Path) -> None:
    p = tmp_path / "in.json"
    p.write_text(f'[{{"prompt": "a"}}, {{"prompt": "b", "reference": {HUGE}}}, {{"prompt": "c"}}]')
    rows = list(inputs.iter_input_file(str(p)))
    assert [r[F.PROMPT] for r, _ in rows if r is not None] == ["a", "c"]
    rejects = [rej for _, rej in rows if rej is not None]
    assert [(rej.reason, rej.line) for rej in rejects] == [("number_too_long", 2)]
    assert rejects[0].row.encode("utf-8")  # the reject record itself is writable


def test_require_json_rejects_a_huge_integer_answer() -> None:
    row = {"response": HUGE, "finish_reason": "stop"}
    rej = check_response(row, FilterConfig(require_json=True))
    assert rej is not None and rej.reason == "not_json" and "5000 digits" in rej.detail


def test_a_raising_chat_template_rejects_the_row_not_the_batch(strict_tokenizer: str) -> None:
    rows: list[dict[str, Any]] = [
        {F.ID: "a", F.MESSAGES: [{"role": "system", "content": "be brief"}, *MSGS], F.PROMPT: None},
        {F.ID: "b", F.MESSAGES: MSGS, F.PROMPT: "What is 2+3?"},
        {F.ID: "c", F.MESSAGES: [*MSGS, {"role": "user", "content": "again"}], F.PROMPT: None},
    ]
    out = common.prepare_rows(
        rows, model=strict_tokenizer, trust_remote_code=False, apply_chat_template=True,
        max_prompt_tokens=None, max_model_len=None,
    )
    errors = [r["error"] for r in out]
    assert errors[1] is None and out[1]["_prompt_token_ids"]
    assert errors[0].startswith("chat_template: ") and "System role not supported" in errors[0]
    assert errors[2].startswith("chat_template: ") and "alternate" in errors[2]
    # A final reject (not an engine_error a rerun would retry), and not sent to the engine.
    assert common.is_prepare_error(errors[0]) and not common.is_prepare_error("engine_error: x")
    assert check_response(out[0], FilterConfig()).reason == "chat_template"


def test_data_check_reports_chat_template_rejects(tmp_path: Path, strict_tokenizer: str) -> None:
    p = tmp_path / "in.jsonl"
    p.write_text(
        json.dumps({"messages": [{"role": "system", "content": "s"}, *MSGS]}) + "\n"
        + json.dumps({"prompt": "fine"}) + "\n"
    )
    assert inputs.check_input(str(p)).valid == 2  # without the template, nothing to see
    check = inputs.check_input(str(p), tokenizer=strict_tokenizer)
    assert (check.valid, check.rejected) == (1, 1)
    assert "System role not supported" in check.examples["chat_template"]
    # A system prompt the config adds fails every row under this template, as generate would.
    check = inputs.check_input(str(p), tokenizer=strict_tokenizer, system_prompt="Be brief.")
    assert check.reasons == {"chat_template": 2}


# ---- §4 splits -----------------------------------------------------------------------------


def test_a_prompt_in_train_and_validation_gets_a_row_in_each() -> None:
    t, s = VLLMTeacher(model="big-model"), SamplingConfig()
    row = {F.ID: "q1", F.MESSAGES: MSGS, F.PROMPT: "What is 2+3?"}
    train = expand_rows([row], t, s, None, split="train", with_cache_key=True)[0]
    val = expand_rows([row], t, s, None, split="validation", with_cache_key=True)[0]
    assert train[F.ID] != val[F.ID]
    assert train["_cache_key"] == val["_cache_key"]  # the answer itself is shared
    assert expand_rows([row], t, s, None)[0][F.ID] == train[F.ID]  # train is the default


# ---- §5 durability ---------------------------------------------------------------------------


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Log ('fsync', kind) and ('replace', dest) events in order."""
    import stat

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_write_shard_fsyncs_file_before_rename_and_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _record_fsyncs(monkeypatch)
    rows = [{"id": f"{i:032x}", "response": "r"} for i in range(3)]
    path = W.write_shard(rows, str(tmp_path / "data"), str(tmp_path / ".tmp"), schema=F.TEACHER_DATA_SCHEMA)
    assert path is not None and pq.read_table(path).num_rows == 3
    i = events.index(("replace", path))
    assert ("fsync", "file") in events[:i] and ("fsync", "dir") in events[i + 1 :]
    events.clear()
    W.write_shard([{"id": "x", "reason": "empty"}], str(tmp_path / "rej"), str(tmp_path / ".tmp"),
                  schema=F.REJECT_SCHEMA, fmt="jsonl", prefix="rejects")
    assert [e[1] for e in events if e[0] == "fsync"] == ["file", "dir"]


def test_storage_write_bytes_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _record_fsyncs(monkeypatch)
    target = tmp_path / "sub" / "stats.json"
    storage.write_text(str(target), "{}")
    assert target.read_text() == "{}"
    i = events.index(("replace", str(target)))
    assert ("fsync", "file") in events[:i] and ("fsync", "dir") in events[i + 1 :]
    assert not [p for p in target.parent.iterdir() if p.name != "stats.json"]  # no temp left


def test_unreadable_shards_are_quarantined_and_their_rows_redone(tmp_path: Path) -> None:
    gen = tmp_path / "generate"
    data, rej, tmp, quarantine = gen / "data", gen / "rejects", gen / ".tmp", gen / "quarantine"
    good = W.write_shard([{"id": f"{i:032x}"} for i in range(3)], str(data / "train"), str(tmp),
                         schema=F.TEACHER_DATA_SCHEMA)
    bad = W.write_shard([{"id": f"{i:032x}"} for i in range(3, 6)], str(data / "train"), str(tmp),
                        schema=F.TEACHER_DATA_SCHEMA)
    assert good and bad
    blob = Path(bad).read_bytes()
    Path(bad).write_bytes(blob[: len(blob) // 2])  # truncated
    (data / "train" / "part-empty.parquet").write_bytes(b"")  # zero bytes
    rej_shard = W.write_shard([{"id": "r1"}, {"id": "r2"}], str(rej), str(tmp),
                              schema=F.REJECT_SCHEMA, fmt="jsonl", prefix="rejects")
    assert rej_shard
    Path(rej_shard).write_text(Path(rej_shard).read_text()[:-8])  # cut mid-line
    folders = [str(data), str(rej)]
    with pytest.raises(DataError, match="quarantine"):
        W.load_done_ids(folders)  # a clear error, not pyarrow's
    moved = W.quarantine_unreadable(folders, str(quarantine))
    assert len(moved) == 3
    assert sorted(p.name for p in quarantine.rglob("*") if p.is_file()) == sorted(
        [Path(bad).name, "part-empty.parquet", Path(rej_shard).name]
    )
    done = W.load_done_ids(folders)
    assert len(done) == 3  # only the good shard's rows: the others are asked for again
    batch = pa.table({"id": [f"{i:032x}" for i in range(6)] + ["r1"]})
    assert W.keep_not_done(batch, done).num_rows == 4
    assert W.quarantine_unreadable(folders, str(quarantine)) == []  # idempotent


# ---- §9 cache keys and ids -------------------------------------------------------------------


def _ids(t: Any) -> tuple[str, str]:
    sk = sampling_key(SamplingConfig(), None)
    row = expand_rows([{F.ID: "q", F.MESSAGES: MSGS}], t, SamplingConfig(), None)[0]
    return row[F.ID], cache_key(MSGS, t, sk, 0)


def test_ids_follow_settings_that_change_the_answer() -> None:
    base = _ids(VLLMTeacher(model="m"))
    changed = [
        VLLMTeacher(model="m", engine_kwargs={"dtype": "float16"}),
        VLLMTeacher(model="m", engine_kwargs={"quantization": "fp8"}),
        VLLMTeacher(model="m", engine_kwargs={"max_model_len": 2048}),
        VLLMTeacher(model="m", apply_chat_template=False),
    ]
    for t in changed:
        got = _ids(t)
        assert got[0] != base[0] and got[1] != base[1], t
    api = _ids(OpenAITeacher(model="m", base_url="http://h/v1"))
    api2 = _ids(OpenAITeacher(model="m", base_url="http://h/v1", extra_body={"top_k": 5}))
    assert api[0] != api2[0] and api[1] != api2[1]
    assert _ids(HFTeacher(model="m")) != _ids(HFTeacher(model="m", dtype="float16"))


def test_ids_ignore_settings_that_only_change_speed() -> None:
    """A rerun after an OOM with less memory, or on other hardware, resumes its rows."""
    base = _ids(VLLMTeacher(model="m", engine_kwargs={"dtype": "bfloat16"}))
    faster = VLLMTeacher(model="m", concurrency=4, batch_size=8, engine_kwargs={
        "dtype": "bfloat16", "gpu_memory_utilization": 0.5, "tensor_parallel_size": 2,
        "max_num_seqs": 16, "enforce_eager": True,
    })
    assert _ids(faster) == base
    api = OpenAITeacher(model="m", base_url="http://h/v1")
    assert _ids(api) == _ids(api.model_copy(update={"max_in_flight": 2, "timeout_s": 5.0}))


def test_every_teacher_field_is_classified() -> None:
    """A new teacher setting changes ids unless it is listed as answer-neutral here on purpose."""
    for cls in (VLLMTeacher, OpenAITeacher, HFTeacher):
        neutral = R.ANSWER_NEUTRAL_FIELDS[cls.model_fields["kind"].default]
        assert neutral <= set(cls.model_fields), (cls.__name__, neutral - set(cls.model_fields))
    assert {"dtype", "quantization", "max_model_len"}.isdisjoint(R.ANSWER_NEUTRAL_ENGINE_KWARGS)


def _model_dir(root: Path, weights: bytes) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 8}')
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(weights) // 4], "data_offsets": [0, len(weights)]}}).encode()
    (root / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + weights)
    return root


def test_model_fingerprint_follows_content_not_mtimes(tmp_path: Path) -> None:
    d = _model_dir(tmp_path / "m", b"\1" * 4096)
    fp = model_fingerprint(str(d))
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    for f in copy.iterdir():
        os.utime(f, (1, 1))
    assert model_fingerprint(str(d)) == fp  # same folder, rerun: same ids (resume works)
    t_a, t_b = VLLMTeacher(model=str(d), name="t"), VLLMTeacher(model=str(copy), name="t")
    assert cache_key(MSGS, t_a, {}, 0) == cache_key(MSGS, t_b, {}, 0)  # copied elsewhere
    # Retrained in place: same size, same header, other values.
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes().replace(b"\1", b"\2"))
    assert model_fingerprint(str(d)) != fp
    (copy / "config.json").write_text('{"hidden_size": 9}')
    assert model_fingerprint(str(copy)) != fp


# ---- §10 small ones --------------------------------------------------------------------------


def test_numbers_equal_does_not_overflow() -> None:
    big = "1" + "0" * 400
    assert not numbers_equal(big, "5")
    assert not numbers_equal("5", "-" + big)
    assert numbers_equal(big, big + ".0")
    assert numbers_equal("1" + "0" * 399 + "1", big)  # within rel_tol
    assert not numbers_equal("1" + "0" * 4000, "2" + "0" * 4000)
    assert numbers_equal("0.1", "0.1000000001") and not numbers_equal("0.1", "0.2")


def test_a_null_prompt_is_named_as_null() -> None:
    _, rej = F.normalize_row({"prompt": None})
    assert rej is not None and rej.reason == "missing_prompt"
    assert "`prompt` is null" in rej.detail
    _, rej = F.normalize_row({"messages": None, "id": "x"})
    assert rej is not None and "`messages` is null" in rej.detail
    _, rej = F.normalize_row({"text": "hi"})
    assert rej is not None and "neither" in rej.detail and "['text']" in rej.detail


# ---- the same classes of defect, found nearby --------------------------------------------------


def test_an_answer_with_a_lone_surrogate_is_a_reject_that_writes(tmp_path: Path) -> None:
    """An API teacher may send "\\ud800" in JSON; no Parquet writer takes it, so the row (not
    the batch) must go, and its reject record must itself be writable."""
    row = {F.ID: "a" * 32, "response": "ok \ud800", "finish_reason": "stop", "reference": None}
    rej = check_response(row, FilterConfig())
    assert rej is not None and rej.reason == "invalid_utf8"
    record = reject_row(row, "filter", rej.reason, rej.detail)
    path = W.write_shard([record], str(tmp_path / "rej"), str(tmp_path / ".tmp"),
                         schema=F.REJECT_SCHEMA, fmt="parquet", prefix="rejects")
    assert path is not None and "\\ud800" in pq.read_table(path).column("row")[0].as_py()


def test_messages_that_are_not_a_list_are_named() -> None:
    _, rej = F.normalize_row({"messages": "What is 2+3?"})
    assert rej is not None and rej.reason == "bad_message" and "is a str" in rej.detail


def test_data_check_parquet_rejects_are_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _record_fsyncs(monkeypatch)
    p = tmp_path / "in.jsonl"
    p.write_text('not json\n{"prompt": "ok"}\n')
    out = tmp_path / "rejects.parquet"
    inputs.check_input(str(p), rejects_path=str(out))
    assert pq.read_table(out).column("reason").to_pylist()[0].startswith("invalid_json")
    assert ("replace", str(out)) in events


def test_a_row_arrow_cannot_store_is_set_apart_not_the_batch() -> None:
    """An answer column of the wrong type (an engine quirk: a count as text, a token count over
    int32) fails only its own row."""
    good = {F.ID: "a", F.RESPONSE: "fine", F.PROMPT_TOKENS: 3}
    rows = [good, {F.ID: "b", F.RESPONSE: "x", F.PROMPT_TOKENS: "12"},
            {F.ID: "c", F.RESPONSE: "y", F.COMPLETION_TOKENS: 2**40}]
    ok, bad = W.split_writable(rows, F.TEACHER_DATA_SCHEMA)
    assert ok == [good] and [r[F.ID] for r, _ in bad] == ["b", "c"]
    assert all(err for _, err in bad)
    assert W.split_writable([good], F.TEACHER_DATA_SCHEMA) == ([good], [])
