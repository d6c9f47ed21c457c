"""Student training: Ray Train × DeepSpeed ZeRO, SFT and logit distillation, export.

    distray train --config jobs/configs/quickstart.yaml

`run(cfg)` is the stage (`variants`: off-policy here, on-policy rounds in distray.onpolicy);
`train_model(cfg, data, out_dir, answers=...)` trains on any teacher
data or on ground-truth references (no teacher).
"""

from distray.train.trainer import TrainResult, train_model
from distray.train.variants import run

__all__ = ["TrainResult", "run", "train_model"]
