"""The student inside a training worker: loading it (LoRA, ZeRO-3 partitioned), a forward pass,
and the configured loss of a micro-batch.

    (used by distray.train.loop.TrainWorker)
"""

from __future__ import annotations

from typing import Any

from distray.config import DistrayConfig
from distray.train.plan import WorkerPlan

__all__ = ["batch_loss", "batch_to", "forward", "load_model"]


def load_model(plan: WorkerPlan, cfg: DistrayConfig, dtype: Any) -> tuple[Any, Any]:
    """The student (LoRA-wrapped when configured). Returns (model, keepalive).

    Under ZeRO-3 a live `HfDeepSpeedConfig` makes `from_pretrained` partition the weights while
    loading (deepspeed.zero.Init), so no worker ever holds the whole model; it must stay alive
    until `deepspeed.initialize`, hence the keepalive.
    """
    from transformers import AutoModelForCausalLM

    keepalive = None
    if plan.ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(plan.ds_config)
    model: Any = AutoModelForCausalLM.from_pretrained(
        plan.model, dtype=dtype, trust_remote_code=cfg.student.trust_remote_code if cfg.student else False
    )
    model.config.use_cache = False
    lora = cfg.student.lora if cfg.student else None
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model, keepalive


def batch_to(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def forward(engine: Any, batch: dict[str, Any]) -> Any:
    # use_cache=False matters beyond memory: with a cache object transformers does not read
    # packed `position_ids` as sequence boundaries.
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return engine(**kwargs).logits


def batch_loss(engine: Any, batch: dict[str, Any], tc: Any) -> Any:
    """The configured loss of one micro-batch (training and validation use the same)."""
    from distray.train.losses import compute_loss

    return compute_loss(
        forward(engine, batch),
        batch["labels"],
        loss=tc.loss,
        alpha=tc.alpha,
        temperature=tc.temperature,
        topk_ids=batch.get("topk_ids"),
        topk_logprobs=batch.get("topk_logprobs"),
    )
