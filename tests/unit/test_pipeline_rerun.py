"""Pipeline bookkeeping without Ray: which settings make finished stages stale, hub-id students,
and `--force` clearing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distray import pipeline, prepare
from distray.config import config_from_dict
from distray.errors import ConfigError
from distray.paths import RunPaths


def _cfg(tmp_path: Path, **sections: Any) -> Any:
    data: dict[str, Any] = {
        "run": {"name": "r", "output_dir": str(tmp_path / "runs")},
        "data": {"builtin": {"name": "reverse", "n_train": 20, "n_validation": 0, "n_test": 5}},
        "teacher": {"kind": "vllm", "model": str(tmp_path / "teacher")},
        "student": {"model": str(tmp_path / "student")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def test_changed_settings_follow_what_each_stage_reads(tmp_path: Path) -> None:
    old = _cfg(tmp_path).model_dump(mode="json")
    lr = _cfg(tmp_path, train={"lr": 1e-5}).model_dump(mode="json")
    assert pipeline.changed_settings(old, lr, "generate") == []
    for stage in ("train", "evaluate", "bench"):
        assert [line.split(":")[0] for line in pipeline.changed_settings(old, lr, stage)] == ["train.lr"]
    temp = _cfg(tmp_path, generate={"sampling": {"temperature": 0.3}}).model_dump(mode="json")
    for stage in ("generate", "train", "evaluate", "bench"):
        assert any(line.startswith("generate.sampling.temperature:") for line in pipeline.changed_settings(old, temp, stage))
    # Scheduling settings make no output stale.
    cpus = _cfg(tmp_path, resources={"num_cpus": 7}).model_dump(mode="json")
    assert all(pipeline.changed_settings(old, cpus, s) == [] for s in ("generate", "train", "evaluate", "bench"))
    # evaluate's own settings: only evaluate.
    ev = _cfg(tmp_path, evaluate={"latency_samples": 3}).model_dump(mode="json")
    assert pipeline.changed_settings(old, ev, "train") == []
    assert pipeline.changed_settings(old, ev, "bench") == []
    assert pipeline.changed_settings(old, ev, "evaluate")


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
