"""Model fingerprints follow the whole content of a model, cheaply on a second look (no Ray)."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from distray import fingerprint
from distray.fingerprint import model_fingerprint
from distray.teacher import rows

OLD_S = 1_000_000_000  # an mtime long before the hashing: the digest may be cached


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTRAY_FINGERPRINT_CACHE", str(tmp_path / "cache" / "fingerprints.json"))


def _model(root: Path, n_tensors: int = 3, numel: int = 4096) -> Path:
    """A sharded safetensors folder: an index, two shards of `n_tensors` F32 tensors each."""
    root.mkdir()
    (root / "config.json").write_text('{"hidden_size": 8}')
    weight_map = {}
    for s in range(2):
        name = f"model-0000{s + 1}-of-00002.safetensors"
        header, off = {}, 0
        for t in range(n_tensors):
            header[f"l{s}.w{t}"] = {"dtype": "F32", "shape": [numel], "data_offsets": [off, off + 4 * numel]}
            weight_map[f"l{s}.w{t}"] = name
            off += 4 * numel
        h = json.dumps(header).encode()
        (root / name).write_bytes(len(h).to_bytes(8, "little") + h + bytes([s + 1]) * off)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in root.iterdir():
        os.utime(f, (OLD_S, OLD_S))
    return root


def test_a_change_deep_inside_a_tensor_changes_the_fingerprint(tmp_path: Path) -> None:
    d = _model(tmp_path / "m")
    fp = model_fingerprint(str(d))
    shard = d / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # the last tensor, 3,996 bytes past its first 64: same size, same header
    shard.write_bytes(bytes(data))
    os.utime(shard, (OLD_S + 5, OLD_S + 5))  # a rewrite gets a new mtime
    assert model_fingerprint(str(d)) != fp
    assert rows.model_fingerprint is model_fingerprint  # the row ids use the same one


def test_a_copied_folder_keeps_its_fingerprint_and_an_edited_index_changes_it(tmp_path: Path) -> None:
    d = _model(tmp_path / "m")
    fp = model_fingerprint(str(d))
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)  # new paths, inodes and mtimes
    assert model_fingerprint(str(copy)) == fp
    index = copy / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("l1.w2", "l1.w9"))
    assert model_fingerprint(str(copy)) != fp


def test_a_second_call_reads_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _model(tmp_path / "m")
    fp = model_fingerprint(str(d))
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    assert model_fingerprint(str(d)) == fp
    assert not [p for p in opened if str(d) in p], opened  # a stat per file, no reads
    # A file written just now is hashed again each time: a same-size rewrite within the
    # filesystem's timestamp granularity would keep its mtime.
    (d / "config.json").write_text('{"hidden_size": 9}')
    model_fingerprint(str(d))
    model_fingerprint(str(d))
    assert sum(p.endswith("config.json") and str(d) in p for p in opened) == 2


def test_an_unreadable_cache_costs_only_a_rehash(tmp_path: Path) -> None:
    d = _model(tmp_path / "m")
    fp = model_fingerprint(str(d))
    Path(fingerprint.cache_path()).write_text("{not json")
    assert model_fingerprint(str(d)) == fp


def test_hub_ids_use_the_cached_revision_else_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_fingerprint("org/tiny") == "org/tiny"
    assert model_fingerprint("gpt-4o-mini") == "gpt-4o-mini"  # an API model name
    refs = tmp_path / "hub" / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert model_fingerprint("org/tiny") == "org/tiny@" + "a" * 40
    (refs / "main").write_text("b" * 40)  # the hub cache moved to a new commit
    assert model_fingerprint("org/tiny") == "org/tiny@" + "b" * 40


def test_an_s3_object_rewritten_in_place_changes_the_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    for k, v in {
        "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="m/config.json", Body=b"{}")
        s3.put_object(Bucket="models", Key="m/model.safetensors", Body=b"\1" * 4096)
        s3.put_object(Bucket="models", Key="m/sub/other.bin", Body=b"x")  # not part of the folder
        fp = model_fingerprint("s3://models/m")
        assert fp == model_fingerprint("s3://models/m/")
        s3.put_object(Bucket="models", Key="m/sub/other.bin", Body=b"y")
        assert model_fingerprint("s3://models/m") == fp
        s3.put_object(Bucket="models", Key="m/model.safetensors", Body=b"\1" * 4000 + b"\2" * 96)
        assert model_fingerprint("s3://models/m") != fp


def test_an_api_teacher_is_keyed_by_its_name_not_a_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    from distray.config import OpenAITeacher, VLLMTeacher

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = tmp_path / "hub" / "models--org--tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    api = OpenAITeacher(model="org/tiny", base_url="http://127.0.0.1:9/v1", api_key_env=None)
    # The endpoint serves its own weights: a local copy's revision says nothing about them.
    assert rows.teacher_ident(api, model_fingerprint(api.model))["model"] == "org/tiny"
    assert rows.teacher_ident(VLLMTeacher(model="org/tiny"))["model"] == "org/tiny@" + "a" * 40
