"""The engine layer every stage shares, one module per `teacher.kind`: vllm (ray.data.llm),
openai (HTTP), hf (transformers generate). Each exposes `generate(ds, teacher, cfg, sampling, logprobs) -> ds`
that fills `engines.common.RESULT_COLUMNS` on teacher rows and keeps the row's own columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distray.config import DistrayConfig, HFTeacher, OpenAITeacher, SamplingConfig, VLLMTeacher

if TYPE_CHECKING:
    import ray.data

__all__ = ["generate"]


def generate(
    ds: ray.data.Dataset,
    teacher: VLLMTeacher | OpenAITeacher | HFTeacher,
    cfg: DistrayConfig,
    sampling: SamplingConfig,
    logprobs: int | None,
) -> ray.data.Dataset:
    """Dispatch to the engine of `teacher.kind`."""
    if isinstance(teacher, VLLMTeacher):
        from distray.engines.vllm import generate as vllm_generate

        return vllm_generate(ds, teacher, cfg, sampling, logprobs)
    if isinstance(teacher, OpenAITeacher):
        from distray.engines.openai import generate as openai_generate

        return openai_generate(ds, teacher, cfg, sampling, logprobs)
    if isinstance(teacher, HFTeacher):
        from distray.engines.hf import generate as hf_generate

        return hf_generate(ds, teacher, cfg, sampling, logprobs)
    raise TypeError(f"unknown teacher type {type(teacher).__name__}")
