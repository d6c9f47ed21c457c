"""The one typed config every stage and every Ray worker receives.

    distray config show jobs/configs/quickstart.yaml train.lr=3e-5

A config is a YAML file of sections (`run`, `task`, `data`, `teacher`/`teachers`, `generate`,
`student`, `train`, `evaluate`, `serve`, `bench`, `resources`, `demo`). It is loaded and validated
once on the driver (`load_config`), written into the run folder as `config.resolved.yaml`, and
passed unchanged to the stages. Dotted overrides (`train.lr=1e-5`) are applied before validation.
Unknown keys fail with their path and the closest valid names; cross-field checks fail at load.
"""

from distray.config.base import (
    BuiltinTaskData,
    DataConfig,
    HFTeacher,
    OpenAITeacher,
    RunConfig,
    Section,
    TaskConfig,
    TaskType,
    TeacherConfig,
    VLLMTeacher,
)
from distray.config.load import (
    apply_overrides,
    config_from_dict,
    dump_config,
    is_secret_name,
    load_config,
    parse_overrides,
    redact,
    secret_env,
)
from distray.config.root import DistrayConfig, deep_merge
from distray.config.stages import (
    BenchConfig,
    DemoConfig,
    EndpointConfig,
    EvaluateConfig,
    FilterConfig,
    FromTeacherConfig,
    GenerateConfig,
    LoraConfig,
    LossName,
    MLflowConfig,
    ResourcesConfig,
    SamplingConfig,
    ScorerName,
    ServeConfig,
    StudentConfig,
    TrackingConfig,
    TrainConfig,
    Verifier,
)

__all__ = [
    "DistrayConfig",
    "RunConfig",
    "TaskConfig",
    "DataConfig",
    "VLLMTeacher",
    "OpenAITeacher",
    "HFTeacher",
    "TeacherConfig",
    "SamplingConfig",
    "FilterConfig",
    "FromTeacherConfig",
    "GenerateConfig",
    "LoraConfig",
    "StudentConfig",
    "TrainConfig",
    "EvaluateConfig",
    "ServeConfig",
    "EndpointConfig",
    "BenchConfig",
    "ResourcesConfig",
    "DemoConfig",
    "MLflowConfig",
    "TrackingConfig",
    "load_config",
    "config_from_dict",
    "parse_overrides",
    "apply_overrides",
    "dump_config",
    "deep_merge",
    "BuiltinTaskData",
    "Section",
    "TaskType",
    "LossName",
    "ScorerName",
    "Verifier",
    "is_secret_name",
    "redact",
    "secret_env",
]
