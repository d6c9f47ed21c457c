"""Pipeline bookkeeping without Ray: which settings make finished stages stale, hub-id students,
and `--force` clearing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _configs import small_config

from distray import pipeline, prepare
from distray.errors import ConfigError
from distray.paths import RunPaths

_cfg = small_config


def test_settings_follow_what_each_stage_makes_its_outputs_from(tmp_path: Path) -> None:
    from distray import lineage

    def diff(stage: str, **sections: Any) -> list[str]:
        old, new = lineage.settings(_cfg(tmp_path), stage), lineage.settings(_cfg(tmp_path, **sections), stage)
        return [line.split(":")[0] for line in lineage.changed_settings(old, new)]

    assert diff("generate", train={"lr": 1e-5}) == []
    assert diff("train", train={"lr": 1e-5}) == ["train.lr"]
    assert diff("generate", generate={"sampling": {"temperature": 0.3}}) == ["generate.sampling.temperature"]
    # Upstream settings reach train through generate's outputs (their digest), not as settings.
    assert diff("train", generate={"sampling": {"temperature": 0.3}}) == []
    # Scheduling settings, and settings a stage does not read, make no output stale.
    assert all(diff(s, resources={"num_cpus": 7}) == [] for s in ("generate", "train", "evaluate", "bench"))
    assert diff("generate", data={"test": str(tmp_path / "other.jsonl")}) == []
    assert diff("evaluate", data={"test": str(tmp_path / "other.jsonl")}) == ["data.test"]
    assert diff("generate", demo={"teacher_steps": 5}) == []  # not a demo run
    assert diff("train", evaluate={"latency_samples": 3}) == [] and diff("evaluate", evaluate={"latency_samples": 3})


def test_secrets_change_the_fingerprint_without_being_written(tmp_path: Path) -> None:
    from distray import lineage

    key1 = _cfg(tmp_path, teacher={"engine_kwargs": {"hf_token": "sk-one"}})
    key2 = _cfg(tmp_path, teacher={"engine_kwargs": {"hf_token": "sk-two"}})
    s1, s2 = lineage.settings(key1, "generate"), lineage.settings(key2, "generate")
    assert s1 != s2 and "sk-one" not in repr(s1)


def test_a_partial_generate_refuses_new_settings_and_a_rerun_train_marks_evaluate_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []
    monkeypatch.setattr("distray.ray_utils.init_ray", lambda cfg: None)

    def fake(self: Any) -> Any:
        def stage(cfg: Any, **kw: Any) -> None:
            ran.append(self.name)
            p = RunPaths(cfg.run_dir)
            done = {"generate": p.generate_stats, "train": p.train_metrics, "evaluate": p.eval_metrics,
                    "bench": p.bench_results}.get(self.name)
            if done:
                Path(done).parent.mkdir(parents=True, exist_ok=True)
                Path(done).write_text(json.dumps({"stage": self.name, "run": len(ran)}))
            if self.name == "train":
                Path(p.student).mkdir(parents=True, exist_ok=True)
                Path(p.student, "model.safetensors").write_text(f"weights {len(ran)}")
                Path(p.student, "_distray_export.json").write_text("{}")
        return stage

    monkeypatch.setattr(pipeline.Stage, "fn", fake)
    cfg = _cfg(tmp_path)
    # An interrupted generate: its record exists, its outputs are partial (no stats.json).
    prepared = prepare.prepare(cfg)
    from distray import lineage

    lineage.write(prepared, "generate")
    hot = _cfg(tmp_path, generate={"sampling": {"temperature": 0.7}})
    with pytest.raises(ConfigError, match=r"generate.sampling.temperature: 0.0 → 0.7"):
        pipeline.run(hot, stages=["generate"])
    assert ran == []

    pipeline.run(cfg, stages=["generate", "train", "evaluate"])
    assert ran == ["generate", "train", "evaluate"]
    pipeline.run(cfg, stages=["generate", "train", "evaluate"])
    assert ran == ["generate", "train", "evaluate"]  # all current: skipped
    # --force --stages train gives a new student: evaluate is stale and runs again.
    pipeline.run(cfg, stages=["train"], force=True)
    with caplog.at_level("WARNING", logger="distray.pipeline"):
        result = pipeline.run(cfg, stages=["generate", "train", "evaluate"])
    assert ran == ["generate", "train", "evaluate", "train", "evaluate"]
    assert result.stages_skipped == ["generate", "train"]
    assert any("stage evaluate: its inputs changed" in r.getMessage() for r in caplog.records)


def _finish_generate(cfg: Any) -> None:
    p = RunPaths(cfg.run_dir)
    Path(p.generate_stats).parent.mkdir(parents=True, exist_ok=True)
    Path(p.generate_stats).write_text("{}")


def test_run_refuses_a_finished_stage_made_with_other_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr("distray.ray_utils.init_ray", lambda cfg: None)
    monkeypatch.setattr(pipeline.Stage, "fn", lambda self: (lambda cfg, **kw: ran.append(self.name)))

    first = _cfg(tmp_path)
    pipeline.run(first, stages=["generate"])  # writes config.resolved.yaml
    assert ran == ["generate"]
    _finish_generate(prepare.prepare(first))

    # Same settings: skipped.
    result = pipeline.run(first, stages=["generate"])
    assert result.stages_skipped == ["generate"] and ran == ["generate"]

    changed = _cfg(tmp_path, generate={"sampling": {"max_tokens": 7}})
    with pytest.raises(ConfigError) as e:
        pipeline.run(changed, stages=["generate"])
    msg = str(e.value)
    assert "stage generate" in msg and "generate.sampling.max_tokens" in msg and "--force" in msg
    assert ran == ["generate"]

    # --force reruns it with the new settings, and the new config is what the run folder keeps.
    pipeline.run(changed, stages=["generate"], force=True)
    assert ran == ["generate", "generate"]
    assert "max_tokens: 7" in Path(RunPaths(changed.run_dir).run_dir, "config.resolved.yaml").read_text()


def test_hub_student_is_downloaded_once_or_fails_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, student={"model": "some-org/tiny-student"})
    calls: list[str] = []

    def fake_download(repo_id: str, local_dir: str, **kw: Any) -> str:
        calls.append(repo_id)
        Path(local_dir).mkdir(parents=True)
        Path(local_dir, "config.json").write_text("{}")
        return local_dir

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    out = prepare.fetch_hub_models(cfg)
    assert Path(out.student.model, "config.json").is_file()
    assert Path(out.student.model).parent.name == "_models"
    assert prepare.fetch_hub_models(cfg).student.model == out.student.model
    assert calls == ["some-org/tiny-student"]  # the second call found the folder

    def offline(repo_id: str, local_dir: str, **kw: Any) -> str:
        raise OSError("offline")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    other = _cfg(tmp_path, student={"model": "some-org/other"})
    with pytest.raises(ConfigError) as e:
        prepare.fetch_hub_models(other)
    msg = str(e.value)
    assert "student.model" in msg and "some-org/other" in msg and "--local-dir" in msg

    # Local folders and missing local paths are left to the stages.
    local = _cfg(tmp_path, student={"model": "./not/here"})
    assert prepare.fetch_hub_models(local).student.model == local.student.model


def test_force_clears_the_stage_folder(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _finish_generate(cfg)
    assert pipeline.stage_done(cfg, "generate")
    pipeline.clear_stage(cfg, "generate")
    assert not pipeline.stage_done(cfg, "generate")
    pipeline.clear_stage(cfg, "generate")  # nothing left: no error


def test_logit_kd_with_another_tokenizer_stops_before_generate(tmp_path: Path) -> None:
    from distray.tiny import make_tiny

    student = make_tiny(tmp_path / "student", layers=1)
    same = make_tiny(tmp_path / "teacher", layers=1)
    other = make_tiny(tmp_path / "other", layers=1, vocab_size=300)
    kd = {"loss": "kd"}
    gen = {"logprobs": 5}
    ok = _cfg(tmp_path, teacher={"model": same}, student={"model": student}, train=kd, generate=gen)
    prepare.check_vocabularies(ok)  # same tokenizer: passes
    bad = _cfg(tmp_path, teacher={"model": other}, student={"model": student}, train=kd, generate=gen)
    with pytest.raises(ConfigError) as e:
        prepare.check_vocabularies(bad)
    assert "train.loss=sft" in str(e.value) and "300" in str(e.value)
    # Sequence-level distillation does not need one tokenizer.
    prepare.check_vocabularies(_cfg(tmp_path, teacher={"model": other}, student={"model": student}))


def test_skipped_generate_says_when_transient_failures_wait_for_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("distray.ray_utils.init_ray", lambda cfg: None)
    monkeypatch.setattr(pipeline.Stage, "fn", lambda self: (lambda cfg, **kw: None))
    cfg = _cfg(tmp_path)
    _finish_generate(prepare.prepare(cfg))
    rejects = Path(RunPaths(cfg.run_dir).generate_rejects)
    rejects.mkdir(parents=True)
    (rejects / "rejects-abc.parquet").write_bytes(b"")
    with caplog.at_level("WARNING", logger="distray.pipeline"):
        pipeline.run(cfg, stages=["generate"])
    assert not [r for r in caplog.records if "transient" in r.getMessage()]
    (rejects / "retry-run1-abc.parquet").write_bytes(b"")
    with caplog.at_level("WARNING", logger="distray.pipeline"):
        pipeline.run(cfg, stages=["generate"])
    assert [r for r in caplog.records if "transient" in r.getMessage() and "distray generate" in r.getMessage()]


def test_is_hub_id_only_for_org_slash_name_that_is_not_a_path(tmp_path: Path) -> None:
    from distray.paths import is_hub_id

    (tmp_path / "org").mkdir()
    assert is_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert not any(is_hub_id(v) for v in (
        "./org/x", "/models/x", "~/x", "s3://b/m", "a/b/c", "gpt-4o", str(tmp_path / "org"),
    ))


def test_a_setting_added_later_at_its_default_does_not_mark_a_stage_stale(tmp_path: Path) -> None:
    from distray import lineage

    cfg = prepare.prepare(_cfg(tmp_path))
    path = lineage.write(cfg, "train")
    record = json.loads(Path(path).read_text())
    del record["settings"]["train.mode"]  # as a record written before train.mode existed
    Path(path).write_text(json.dumps(record))
    lineage.check(cfg, "train", force_hint="x")  # no refusal
    on_policy = prepare.prepare(_cfg(tmp_path, train={"mode": "on_policy", "loss": "kd"}, generate={"logprobs": 5}))
    with pytest.raises(ConfigError, match=r"(?s)stage train: .* other settings:.*generate.logprobs: None → 5"):
        lineage.check(on_policy, "train", force_hint="x")
