"""The Python API: seed-shaped arguments build the same config as YAML; the public names are pinned."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml

import distray
from distray.api import DistillationJob
from distray.config import dump_config, load_config
from distray.errors import ConfigError

SEED_YAML = """
teacher: {kind: vllm, model: deepseek-ai/DeepSeek-V3}
student: {model: microsoft/Phi-4-mini-instruct}
data: {train: ./training_data.jsonl, validation: ./validation_data.jsonl}
task: {type: conversation}
train: {lr: 2.0e-5, micro_batch_size: 2, epochs: 3}
generate: {sampling: {temperature: 0.7}}
"""


def _seed_job() -> DistillationJob:
    return DistillationJob(
        teacher_model="deepseek-ai/DeepSeek-V3",
        student_model="microsoft/Phi-4-mini-instruct",
        training_data="./training_data.jsonl",
        validation_data="./validation_data.jsonl",
        task_type="conversation",
        hyperparameters={"learning_rate": 2e-5, "batch_size": 2, "num_epochs": 3, "temperature": 0.7},
    )


def test_seed_arguments_build_the_same_config_as_yaml(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_YAML)
    assert _seed_job().config == load_config(path)
    assert dump_config(_seed_job().config) == dump_config(load_config(path))


def test_preset_defaults_apply_and_stay_overridable():
    job = _seed_job()
    assert job.config.evaluate.scorers == ["bleu", "rouge_l", "teacher_agreement"]
    job2 = DistillationJob(student_model="s", task_type="conversation", evaluate={"scorers": ["exact_match"]})
    assert job2.config.evaluate.scorers == ["exact_match"]
    assert job2.config.task.system_prompt  # the preset's system prompt is still there


def test_from_config_round_trips(tmp_path):
    job = _seed_job()
    path = tmp_path / "job.yaml"
    job.to_yaml(path)
    again = DistillationJob.from_config(path)
    assert again.config == job.config
    assert yaml.safe_load(path.read_text())["train"]["lr"] == 2e-5


def test_unknown_hyperparameter_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="did you mean `learning_rate`"):
        DistillationJob(student_model="s", hyperparameters={"learning_rat": 1e-5})


def test_unknown_section_key_fails_as_the_cli_does():
    with pytest.raises(ConfigError, match=r"`train.lr_rate` is not a setting; did you mean `train.lr`"):
        DistillationJob(student_model="s", train={"lr_rate": 1e-5})


def test_dotted_hyperparameters_and_api_teacher():
    job = DistillationJob(teacher_model="gpt-4o", student_model="s", hyperparameters={"train.zero_stage": 3})
    assert job.config.teacher.kind == "openai"
    assert job.config.train.zero_stage == 3


def test_status_before_submit_is_a_usage_error():
    with pytest.raises(distray.errors.UsageError, match="submit"):
        _seed_job().status()


def test_public_api_is_pinned():
    assert sorted(distray.__all__) == sorted(
        ["__version__", "DistillationJob", "DistrayConfig", "load_config", "DistrayError", "ConfigError", "DataError"]
    )
    for name in distray.__all__:
        assert getattr(distray, name) is not None


# ---- evaluate(): metrics and baseline, with the evaluate stage replaced ---------------------


def test_accuracy_is_the_task_primary_scorer_and_preset_scorers_stay(tmp_path):
    conv = DistillationJob(student_model="s", task_type="conversation", output_dir=str(tmp_path))
    cfg = conv._evaluate_config(None, ["accuracy", "bleu_score", "inference_time", "exact_match"], None)
    # bleu is conversation's primary scorer; teacher_agreement is kept, exact_match added once.
    assert cfg.evaluate.scorers == ["bleu", "rouge_l", "teacher_agreement", "exact_match"]
    math = DistillationJob(student_model="s", task_type="math", output_dir=str(tmp_path))
    assert math._evaluate_config(None, ["accuracy", "rouge"], None).evaluate.scorers == ["numeric", "rouge_l"]
    nli = DistillationJob(student_model="s", task_type="nli", output_dir=str(tmp_path))
    assert nli._evaluate_config(None, None, None).evaluate.scorers == ["choice", "teacher_agreement"]


def test_unknown_metric_names_the_value_and_the_valid_names(tmp_path):
    job = DistillationJob(student_model="s", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"metric `accurcy` is unknown; did you mean `accuracy`.*valid names: accuracy, "):
        job.evaluate(metrics=["accurcy"])


def _demo_job(tmp_path) -> DistillationJob:
    return DistillationJob(
        teacher_model={"kind": "vllm", "model": str(tmp_path / "teacher")},
        student_model=str(tmp_path / "student-init"),
        name="demo",
        output_dir=str(tmp_path / "runs"),
        data={"builtin": {"name": "reverse", "n_train": 8, "n_validation": 2, "n_test": 4}},
        demo={"train_teacher": True},
    )


@pytest.fixture
def evaluated(monkeypatch):
    """The configs `DistillationJob.evaluate` hands the evaluate stage (which does not run)."""
    import distray.evaluate.runner

    seen: list = []

    def fake_run(cfg):
        seen.append(cfg)
        return {"metrics_path": "m.json", "models": {}, "comparison": {}}

    monkeypatch.setattr(distray.evaluate.runner, "run", fake_run)
    return seen


def test_evaluate_compares_against_the_baseline_run_built(tmp_path, evaluated):
    from distray.demo import baseline_dir

    job = _demo_job(tmp_path)
    base = baseline_dir(job.config)
    Path(base).mkdir(parents=True)
    Path(base, "model.safetensors").write_bytes(b"")
    assert job.evaluate(metrics=["accuracy"])["metrics_path"] == "m.json"
    assert evaluated[-1].evaluate.baseline == base
    assert evaluated[-1].data.test.endswith("/runs/demo/data/test.jsonl")  # the built-in split
    job.evaluate(test_data="mine.jsonl", baseline_model=str(tmp_path / "other"))
    assert evaluated[-1].evaluate.baseline == str(tmp_path / "other")  # the caller's wins
    assert evaluated[-1].data.test == str(Path("mine.jsonl").resolve())


def test_evaluate_before_run_warns_that_the_baseline_is_untrained(tmp_path, evaluated, caplog):
    _demo_job(tmp_path).evaluate()
    assert evaluated[-1].evaluate.baseline is None  # the runner falls back to student.model
    assert "demo baseline" in caplog.text and "not built yet" in caplog.text


# ---- submit(): a fake JobSubmissionClient, no cluster ---------------------------------------


@pytest.fixture
def job_client(monkeypatch):
    """Replaces ray.job_submission with a client that records what submit() sends."""
    calls: list[dict] = []

    class FakeClient:
        def __init__(self, address):
            calls.append({"address": address})

        def submit_job(self, entrypoint, runtime_env):
            work = Path(runtime_env["working_dir"])
            calls[-1].update(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                shipped=sorted(p.name for p in work.iterdir()),
                config_text=(work / "distray_config.yaml").read_text(),
            )
            return "raysubmit_fake"

    fake = types.ModuleType("ray.job_submission")
    fake.JobSubmissionClient = FakeClient
    monkeypatch.setitem(sys.modules, "ray.job_submission", fake)
    return calls


def test_submit_ships_config_and_package_then_removes_the_temp_dir(tmp_path, job_client, caplog):
    job = DistillationJob(student_model="s", training_data="train.jsonl", output_dir=str(tmp_path))
    assert job.submit(runtime_env={"env_vars": {"A": "1"}}, stages=["generate"]) == "raysubmit_fake"
    call = job_client[-1]
    assert call["shipped"] == ["distray", "distray_config.yaml"]
    assert call["runtime_env"]["env_vars"] == {"A": "1"}
    assert call["entrypoint"].endswith("--stages generate")
    assert not Path(call["runtime_env"]["working_dir"]).exists()
    assert "shared" not in caplog.text  # a local cluster sees this filesystem


def test_submit_to_a_remote_cluster_warns_about_local_paths(tmp_path, job_client, caplog):
    job = DistillationJob(student_model="s", training_data="train.jsonl", output_dir=str(tmp_path))
    job.submit("http://10.1.2.3:8265")
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1
    assert f"run.output_dir={tmp_path}" in warning[0] and "data.train=" in warning[0]
    assert "shared/NFS" in warning[0] and "s3://" in warning[0]
    caplog.clear()
    uris = DistillationJob(student_model="s", training_data="s3://b/train.jsonl", output_dir="s3://b/runs")
    uris.submit("http://10.1.2.3:8265")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_submit_refuses_a_user_working_dir(tmp_path, job_client):
    job = DistillationJob(student_model="s", output_dir=str(tmp_path))
    with pytest.raises(distray.errors.UsageError, match=r"working_dir.*set by distray.*py_modules"):
        job.submit(runtime_env={"working_dir": "."})
    assert job_client == []  # nothing was sent


def test_submit_ships_secrets_only_as_env_vars(tmp_path, job_client, caplog):
    job = DistillationJob(
        student_model="s", output_dir=str(tmp_path),
        resources={"env": {"HF_TOKEN": "hf_s3cret", "OMP_NUM_THREADS": "2"}},
    )
    job.submit(runtime_env={"env_vars": {"A": "1"}})
    call = job_client[-1]
    assert "hf_s3cret" not in call["config_text"]  # nothing secret in the uploaded working dir
    assert "OMP_NUM_THREADS" in call["config_text"]
    assert call["runtime_env"]["env_vars"] == {"HF_TOKEN": "hf_s3cret", "A": "1"}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_submit_warns_about_inline_credentials(tmp_path, job_client, caplog):
    job = DistillationJob(
        teacher_model={"kind": "openai", "model": "m", "base_url": "https://user:pw@api.example/v1"},
        student_model="s", output_dir=str(tmp_path),
    )
    job.submit()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("teacher.base_url" in w and "api_key_env" in w for w in warnings)
    assert all("pw@" not in w for w in warnings)


@pytest.mark.parametrize("stages", [["generate; rm -rf /"], ["train", "serve"]])
def test_submit_refuses_unknown_stage_names(tmp_path, job_client, stages):
    job = DistillationJob(student_model="s", output_dir=str(tmp_path))
    with pytest.raises(distray.errors.UsageError, match="choose from generate, train, evaluate, bench, report"):
        job.submit(stages=stages)
    assert len(job_client) == 0 or "entrypoint" not in job_client[-1]
