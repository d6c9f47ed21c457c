"""The Python API: seed-shaped arguments build the same config as YAML; the public names are pinned."""

from __future__ import annotations

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
