"""The stack works end to end on this machine: a local Ray runs a real vLLM engine on a tiny model.

    pytest tests/integration/test_stack.py -q -m integration

If this fails, nothing else in distray can work; the assertion messages say what to check.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "rev abc="}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 2+3?"}],
]
MAX_TOKENS = 8
TOPK = 5


def _generate_in_worker(model_dir: str, prompts: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    """Runs inside a Ray worker: load the model in vLLM, apply the chat template, generate."""
    import os

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        enforce_eager=True,  # CPU: no CUDA graphs to capture
        max_model_len=128,
        dtype="float32",
        seed=0,
    )
    tokenizer = llm.get_tokenizer()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    # ignore_eos: a random model may stop at once; fixed-length answers make the check exact.
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOPK, ignore_eos=True)
    outputs = llm.generate(texts, params)
    return [
        {
            "prompt_tokens": len(o.prompt_token_ids),
            "token_ids": list(o.outputs[0].token_ids),
            "text": o.outputs[0].text,
            "topk_sizes": [len(pos) for pos in (o.outputs[0].logprobs or [])],
            "finish_reason": o.outputs[0].finish_reason,
            "kv_cache_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        }
        for o in outputs
    ]


def test_vllm_cpu_engine_runs_in_a_ray_worker(ray_cluster: Any, tiny_model: str) -> None:
    ray = ray_cluster
    assert ray.cluster_resources().get("CPU", 0) >= 2, "the local Ray should have ≥ 2 logical CPUs"
    # pytest imports this file as a top-level module the workers cannot import, so the function
    # travels by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = ray.remote(num_cpus=1)(_generate_in_worker)
    results = ray.get(task.remote(tiny_model, PROMPTS), timeout=600)

    assert len(results) == len(PROMPTS)
    for r in results:
        assert r["prompt_tokens"] > 3, "the chat template should wrap the prompt"
        assert len(r["token_ids"]) == MAX_TOKENS
        assert r["finish_reason"] == "length"
        assert isinstance(r["text"], str)
        # top-k logprobs per position: what logit distillation stores
        assert len(r["topk_sizes"]) == MAX_TOKENS
        assert all(k >= TOPK for k in r["topk_sizes"])
        # the worker saw distray's env (runtime_env), or vLLM would reserve a huge KV cache
        assert r["kv_cache_gib"] == "1"


def test_tiny_model_loads_offline_with_transformers(tiny_model: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[:2] == ids.shape
    assert logits.shape[-1] >= len(tok)
    assert tok.eos_token and tok.bos_token and tok.pad_token
