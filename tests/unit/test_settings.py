"""The one classification of config fields (`distray.settings`), and what lineage makes of it."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
from _configs import small_config
from pydantic import BaseModel

from distray import lineage, pipeline, prepare, settings
from distray.config import DistrayConfig
from distray.errors import ConfigError


def _sections(ann: Any) -> list[type[BaseModel]]:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        args = typing.get_args(ann)
        return [s for a in (args[:1] if origin is typing.Annotated else args) for s in _sections(a)]
    return [ann] if isinstance(ann, type) and issubclass(ann, BaseModel) else []


def _leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, f in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        subs = _sections(f.annotation)
        out |= set().union(*(_leaves(s, path) for s in subs)) if subs else {path}
    return out


def test_every_config_field_is_classified_once() -> None:
    leaves = _leaves(DistrayConfig)
    assert len(leaves) > 150  # the walk reached the nested sections
    unclassified = sorted(p for p in leaves if not settings.classified(p))
    assert unclassified == [], f"classify these in distray/settings.py: {unclassified}"
    assert settings.SPEED_ONLY.isdisjoint(settings.ANSWER)
    stale = sorted((settings.SPEED_ONLY | settings.ANSWER) - leaves)
    assert stale == [], f"no such config field: {stale}"


def test_engine_kwargs_are_classified_by_key() -> None:
    assert settings.speed_only("teacher.engine_kwargs.gpu_memory_utilization")
    assert settings.speed_only("serve.engine_kwargs.max_num_seqs")
    assert not settings.speed_only("teacher.engine_kwargs.quantization")
    assert not settings.speed_only("train.lr")
    dump = {"teachers": [{"model": "m", "concurrency": 4, "engine_kwargs": {"dtype": "bf16", "max_num_seqs": 8}}]}
    assert settings.answer_only(dump) == {"teachers": [{"model": "m", "engine_kwargs": {"dtype": "bf16"}}]}


def test_row_ids_and_lineage_use_the_same_table() -> None:
    from distray.teacher import rows

    assert rows.ANSWER_NEUTRAL_ENGINE_KWARGS == settings.SPEED_ONLY_ENGINE_KWARGS
    for kind, neutral in rows.ANSWER_NEUTRAL_FIELDS.items():
        # `name` is the label: in the row id on its own, out of the cache key.
        assert neutral - {"name"} <= settings.teacher_speed_only_fields(), kind


def _cfg(tmp_path: Path, **sections: Any) -> Any:
    return prepare.prepare(small_config(tmp_path, **sections))


@pytest.mark.parametrize(("stage", "change"), [
    ("generate", {"teacher": {"engine_kwargs": {"gpu_memory_utilization": 0.5}}}),
    ("generate", {"teacher": {"concurrency": 3}}),
    ("generate", {"generate": {"rows_per_shard": 7, "cache_dir": "/tmp/elsewhere"}}),
    ("train", {"train": {"max_failures": 5, "keep_checkpoints": 4, "log_every_steps": 1}}),
])
def test_a_speed_only_change_never_blocks_a_resume(tmp_path: Path, stage: str, change: dict[str, Any]) -> None:
    lineage.write(_cfg(tmp_path), stage)
    lineage.check(_cfg(tmp_path, **change), stage, force_hint="x")  # no refusal


def test_data_max_rows_is_in_generates_lineage(tmp_path: Path) -> None:
    lineage.write(_cfg(tmp_path), "generate")
    with pytest.raises(ConfigError, match="data.max_rows"):
        lineage.check(_cfg(tmp_path, data={"max_rows": 3}), "generate", force_hint="x")


def test_a_refusal_names_the_change_and_the_ways_out_that_keep_the_outputs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    lineage.write(cfg, "train")
    with pytest.raises(ConfigError) as e:
        lineage.check(_cfg(tmp_path, train={"lr": 1e-4}), "train", force_hint="distray run X --force train")
    msg = str(e.value)
    assert "train.lr: 2e-05 → 0.0001" in msg
    assert "run.name=r-2" in msg and "train.lr=2e-05" in msg  # non-destructive ways first
    assert msg.index("run.name=r-2") < msg.index("--force train")
    assert "would DELETE" in msg and "training steps" in msg  # what --force costs


def test_a_same_size_edit_of_an_input_changes_its_digest(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "abc"}\n')
    cfg = _cfg(tmp_path, data={"train": str(prompts), "builtin": None})
    before = lineage.input_digests(cfg, "generate")
    prompts.write_text('{"prompt": "abd"}\n')  # same size
    assert lineage.input_digests(cfg, "generate") != before


def test_output_digest_ignores_stats_and_covers_shards(tmp_path: Path) -> None:
    from distray.paths import RunPaths

    cfg = _cfg(tmp_path)
    p = RunPaths(cfg.run_dir)
    Path(p.generate_data).mkdir(parents=True)
    Path(p.generate_data, "part-0.parquet").write_bytes(b"rows")
    Path(p.generate_stats).write_text('{"wall_s": 1}')
    before = lineage.output_digest(cfg, "generate")
    Path(p.generate_stats).write_text('{"wall_s": 2}')  # a rerun with nothing to do
    assert lineage.output_digest(cfg, "generate") == before
    Path(p.generate_data, "part-1.parquet").write_bytes(b"more")
    assert lineage.output_digest(cfg, "generate") != before


def test_force_of_a_finished_stage_asks_and_keeps_it_on_no(tmp_path: Path) -> None:
    from distray.errors import StageError
    from distray.paths import RunPaths

    cfg = _cfg(tmp_path)
    stats = Path(RunPaths(cfg.run_dir).generate_stats)
    stats.parent.mkdir(parents=True)
    stats.write_text("{}")
    asked: list[str] = []
    with pytest.raises(StageError, match="kept"):
        pipeline._clear_forced(cfg, pipeline.REGISTRY["generate"], lambda q: asked.append(q) or False)
    assert stats.exists() and "teacher rows" in asked[0]
    pipeline._clear_forced(cfg, pipeline.REGISTRY["generate"], lambda q: True)
    assert not stats.exists()


def test_an_s3_folder_is_digested_from_one_listing_of_its_etags(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards in a bucket are named by their ETags from one listing; a rewritten shard changes
    the digest, hidden files and excluded names do not."""
    moto = pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from distray.digest import tree_digest

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with moto.mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="runs")
        s3.put_object(Bucket="runs", Key="r/generate/data/train/part-1.parquet", Body=b"rows")
        s3.put_object(Bucket="runs", Key="r/generate/stats.json", Body=b'{"wall_s": 1}')
        before = tree_digest("s3://runs/r/generate", exclude=("stats.json",))
        s3.put_object(Bucket="runs", Key="r/generate/stats.json", Body=b'{"wall_s": 2}')
        s3.put_object(Bucket="runs", Key="r/generate/.tmp/x", Body=b"in flight")
        assert tree_digest("s3://runs/r/generate", exclude=("stats.json",)) == before
        s3.put_object(Bucket="runs", Key="r/generate/data/train/part-1.parquet", Body=b"rowz")
        assert tree_digest("s3://runs/r/generate", exclude=("stats.json",)) != before
        assert tree_digest("s3://runs/r/nothing") == "missing"
