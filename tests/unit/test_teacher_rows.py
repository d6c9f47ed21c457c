"""Ids, cache keys, shards, resume sets and engine-output helpers of the generate stage (no Ray)."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distray import formats as F
from distray.config import OpenAITeacher, SamplingConfig, VLLMTeacher
from distray.engines import common
from distray.engines.openai import parse_logprobs
from distray.http_retry import backoff_s, retry_after_s, retryable_status
from distray.teacher import writer as W
from distray.teacher.reader import iter_prompt_blocks
from distray.teacher.rows import cache_key, expand_rows, sampling_key

MSGS = [{"role": "user", "content": "What is 2+3?"}]


def teacher(name: str | None = None, model: str = "big-model") -> VLLMTeacher:
    return VLLMTeacher(model=model, name=name)


def test_ids_are_stable_and_depend_on_what_changes_the_answer() -> None:
    s = SamplingConfig(n=2)
    rows = expand_rows([{"id": "q1", "messages": MSGS, "prompt": "What is 2+3?"}], teacher(), s, None)
    again = expand_rows([{"id": "q1", "messages": MSGS, "prompt": "What is 2+3?"}], teacher(), s, None)
    assert [r["id"] for r in rows] == [r["id"] for r in again]
    assert len(rows) == 2 and rows[0]["id"] != rows[1]["id"]
    assert [r["sample_index"] for r in rows] == [0, 1]
    assert all(r["input_id"] == "q1" and r["teacher"] == "big-model" for r in rows)
    base = rows[0]["id"]
    other = [
        expand_rows([{"id": "q1", "messages": MSGS}], teacher("other"), s, None)[0]["id"],
        expand_rows([{"id": "q1", "messages": MSGS}], teacher(), SamplingConfig(temperature=0.7), None)[0]["id"],
        expand_rows([{"id": "q1", "messages": MSGS}], teacher(), s, 5)[0]["id"],
        expand_rows([{"id": "q2", "messages": MSGS}], teacher(), s, None)[0]["id"],
    ]
    assert base not in other and len(set(other)) == len(other)
    # n itself is not part of the id: sample 0 of n=1 and of n=2 is the same row.
    assert expand_rows([{"id": "q1", "messages": MSGS}], teacher(), SamplingConfig(n=1), None)[0]["id"] == base


def test_cache_key_ignores_label_and_input_id_but_not_model() -> None:
    sk = sampling_key(SamplingConfig(), None)
    assert cache_key(MSGS, teacher("a"), sk, 0) == cache_key(MSGS, teacher("b"), sk, 0)
    assert cache_key(MSGS, teacher(model="m1"), sk, 0) != cache_key(MSGS, teacher(model="m2"), sk, 0)
    api = OpenAITeacher(model="big-model", base_url="http://a/v1")
    assert cache_key(MSGS, api, sk, 0) != cache_key(MSGS, teacher(), sk, 0)


def test_cache_key_follows_local_weights(tmp_path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(b"x" * 10)
    sk = sampling_key(SamplingConfig(), None)
    k1 = cache_key(MSGS, teacher(model=str(d)), sk, 0)
    (d / "model.safetensors").write_bytes(b"y" * 11)
    assert cache_key(MSGS, teacher(model=str(d)), sk, 0) != k1


def test_write_shard_is_atomic_and_idempotent(tmp_path) -> None:
    rows = [{"id": f"{i:032x}", "input_id": str(i), "response": "r"} for i in range(3)]
    out, tmp = str(tmp_path / "data"), str(tmp_path / ".tmp")
    p1 = W.write_shard(rows, out, tmp, schema=F.TEACHER_DATA_SCHEMA)
    p2 = W.write_shard(rows, out, tmp, schema=F.TEACHER_DATA_SCHEMA)
    assert p1 == p2 and os.listdir(out) == [os.path.basename(p1)]
    assert os.listdir(tmp) == []  # nothing half-written left behind
    assert pq.read_table(p1).schema.equals(F.TEACHER_DATA_SCHEMA)
    assert W.write_shard([], out, tmp, schema=F.TEACHER_DATA_SCHEMA) is None
    rej = W.write_shard([{"id": "x", "reason": "empty"}], str(tmp_path / "rej"), tmp, schema=F.REJECT_SCHEMA, fmt="jsonl", prefix="rejects")
    assert json.loads(open(rej).read())["reason"] == "empty"


def test_done_ids_skip_exactly_the_written_rows(tmp_path) -> None:
    ids = [f"{random.getrandbits(128):032x}" for _ in range(50)]
    out, tmp, rej = str(tmp_path / "data"), str(tmp_path / ".tmp"), str(tmp_path / "rej")
    W.write_shard([{"id": i} for i in ids[:20]], out, tmp, schema=F.TEACHER_DATA_SCHEMA)
    W.write_shard([{"id": i} for i in ids[20:25]] + [{"id": "user-id-7"}], rej, tmp, schema=F.REJECT_SCHEMA, fmt="jsonl")
    done = W.load_done_ids([out, rej, str(tmp_path / "missing")])
    assert len(done) == 26
    batch = pa.table({"id": ids + ["user-id-7", "user-id-8"]})
    left = W.keep_not_done(batch, done).column("id").to_pylist()
    assert left == ids[25:] + ["user-id-8"]
    assert W.keep_not_done(batch, W.load_done_ids([])).num_rows == 52


def test_reader_rejects_have_stable_ids(tmp_path) -> None:
    p = tmp_path / "in.jsonl"
    p.write_text('{"prompt": "hi"}\nnot json\n\n{"prompt": ""}\n{"prompt": "hi"}\n')
    kw = {"system_prompt": None, "prompt_template": "{prompt}"}
    t1 = pa.concat_tables(iter_prompt_blocks(str(p), **kw)).to_pylist()
    t2 = pa.concat_tables(iter_prompt_blocks(str(p), **kw)).to_pylist()
    assert [r["id"] for r in t1] == [r["id"] for r in t2]
    reasons = [r["_reject_reason"].split(":")[0] for r in t1 if r["_reject_reason"]]
    assert reasons == ["invalid_json", "empty_prompt", "duplicate_id"]
    assert [r["_line"] for r in t1 if r["_reject_reason"]] == [2, 4, 5]
    assert sum(1 for _ in iter_prompt_blocks(str(p), max_rows=1, **kw)) == 1


def test_reject_ids_differ_across_files_of_the_same_name(tmp_path) -> None:
    """train/part-0.jsonl and validation/part-0.jsonl with a bad line 2 are two rejects, each
    shown by its file name."""
    kw = {"system_prompt": None, "prompt_template": "{prompt}"}
    rejects = []
    for split in ("train", "validation"):
        (tmp_path / split).mkdir()
        f = tmp_path / split / "part-0.jsonl"
        f.write_text('{"prompt": "hi"}\nnot json\n')
        rows = pa.concat_tables(iter_prompt_blocks(str(f), **kw)).to_pylist()
        rejects += [r for r in rows if r["_reject_reason"]]
    assert [(r["_source"], r["_line"]) for r in rejects] == [("part-0.jsonl", 2)] * 2
    assert rejects[0]["id"] != rejects[1]["id"]


def test_finish_reason_from_ids() -> None:
    eos = frozenset({2})
    kw = {"eos": eos, "prompt_tokens": 10, "max_model_len": 100}
    assert common.finish_reason([5, 6, 2], max_tokens=3, **kw) == "stop"
    assert common.finish_reason([5, 6, 7], max_tokens=3, **kw) == "length"
    assert common.finish_reason([5, 6], max_tokens=3, **kw) == "stop"  # a stop string
    assert common.finish_reason([5] * 90, max_tokens=200, **kw) == "length"  # context full


def test_topk_from_vllm_drops_sampled_token_outside_topk() -> None:
    pos = {7: {"logprob": -0.1, "rank": 1}, 9: {"logprob": -2.0, "rank": 2}, 3: {"logprob": -9.0, "rank": 40}}
    ids, lps = common.topk_from_vllm([pos], 2)
    assert ids == [[7, 9]] and lps == [[-0.1, -2.0]]


def test_backoff_has_jitter_caps_and_honours_retry_after() -> None:
    random.seed(0)
    waits = [backoff_s(a, 0.5, 4.0, None) for a in range(10) for _ in range(20)]
    assert all(0 <= w <= 4.0 for w in waits) and len(set(waits)) > 100
    assert backoff_s(0, 0.5, 4.0, retry_after_s=7.0) == 7.0
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({}) is None
    assert [c for c in (400, 401, 404, 408, 409, 429, 500, 503) if retryable_status(c)] == [408, 409, 429, 500, 503]
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0


def test_openai_logprobs_need_token_ids() -> None:
    content = [
        {"token": "token_id:5", "logprob": -0.1, "top_logprobs": [{"token": "token_id:9", "logprob": -3.0}, {"token": "token_id:5", "logprob": -0.1}]},
    ]
    assert parse_logprobs(content, 2) == ([5], [[5, 9]], [[-0.1, -3.0]])
    assert parse_logprobs([{"token": "Hello", "logprob": -0.1, "top_logprobs": []}], 2) == (None, None, None)
    assert parse_logprobs(None, 2) == (None, None, None)


@pytest.mark.parametrize("k", [1, 3])
def test_expand_keeps_reference_and_prompt(k: int) -> None:
    rows = expand_rows([{"id": "q", "messages": MSGS, "prompt": "p", "reference": "5"}], teacher(), SamplingConfig(n=k), None, with_cache_key=True)
    assert len(rows) == k and all(r["reference"] == "5" and r["prompt"] == "p" and r["_cache_key"] for r in rows)


def test_public_api_is_pinned() -> None:
    import distray.teacher as T

    assert sorted(T.__all__) == sorted(
        ["run", "GenerateResult", "generate_dataset", "read_prompts", "OUTPUT_SCHEMA", "teacher_ident"]
    )
    assert [f.name for f in T.OUTPUT_SCHEMA] == F.TEACHER_DATA_SCHEMA.names + ["error"]
