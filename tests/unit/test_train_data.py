"""Training examples: chat template, prompt masking, teacher ids kept, truncation, packing, and the
DeepSpeed batch arithmetic.

    .venv/bin/python -m pytest tests/unit/test_train_data.py -q
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from distray.config import TrainConfig
from distray.errors import ConfigError, DataError
from distray.train.data import ChatEncoder, Collator, holdout_flags, in_holdout, pack_examples
from distray.train.losses import IGNORE_INDEX, MISSING_LOGPROB
from distray.train.plan import build_deepspeed_config, lr_lambda, plan_steps
from distray.train.vocab import check_vocab

MSGS = [{"role": "user", "content": "rev abc"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from distray.tiny import make_tokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok")))


def _text(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


def test_prompt_is_masked_and_targets_are_the_answer_plus_end_of_turn(tok):
    enc = ChatEncoder(tok, max_seq_len=64).encode(MSGS, "cba")
    assert _text(tok, enc.input_ids) == "<s><|user|>rev abc<|assistant|>cba</s>"
    targets = enc.labels[enc.labels != IGNORE_INDEX]
    assert _text(tok, targets) == "cba</s>"
    # pre-shifted: the target at t is the input token at t + 1
    t = np.nonzero(enc.labels != IGNORE_INDEX)[0]
    assert (enc.labels[t] == enc.input_ids[t + 1]).all()
    assert not enc.truncated


def test_teacher_ids_are_kept_and_topk_aligned(tok):
    ids = tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    topk = [[i, 7] for i in ids]
    lps = [[-0.1, -2.5] for _ in ids]
    enc = ChatEncoder(tok, 64).encode(MSGS, "ignored text", ids, topk, lps, "stop")
    # eos already in the teacher's ids: not appended twice
    assert list(enc.labels[enc.labels != IGNORE_INDEX]) == ids
    rows = np.nonzero(enc.labels != IGNORE_INDEX)[0]
    assert (enc.topk_ids[rows, 0] == enc.labels[rows]).all()
    assert (enc.topk_logprobs[enc.labels == IGNORE_INDEX] == np.float32(MISSING_LOGPROB)).all()
    assert np.isfinite(enc.topk_logprobs[rows]).all()


def test_rows_with_different_k_are_padded_with_a_finite_missing_logprob(tok):
    ids = tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = [
        {"messages": MSGS, "response": "cba", "response_token_ids": ids,
         "topk_token_ids": [[i, 7, 8] for i in ids], "topk_logprobs": [[-0.1, -2.5, -3.0] for _ in ids]},
        {"messages": MSGS, "response": "cba", "response_token_ids": ids,
         "topk_token_ids": [[i] for i in ids], "topk_logprobs": [[-0.1] for _ in ids]},
    ]
    b = Collator(ChatEncoder(tok, 64), tok.pad_token_id, with_topk=True)(rows)
    lp = b["topk_logprobs"]
    assert lp.shape[-1] == 3 and torch.isfinite(lp).all()
    answer = b["labels"][1] != IGNORE_INDEX
    assert (lp[1][answer][:, 1:] == MISSING_LOGPROB).all() and (lp[1][answer][:, 0] == -0.1).all()


def test_student_without_chat_template_gets_the_prompt_generation_used(tok):
    from distray.prompts import render_prompt

    base = copy.deepcopy(tok)
    base.chat_template = None
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev abc"}]
    enc = ChatEncoder(base, 64)
    prompt_ids = render_prompt(base, turns, apply_chat_template=False)[1]
    assert enc.prompt_ids(turns) == prompt_ids
    ex = enc.encode(turns, "cba")
    # The prompt generate/evaluate send, then the answer and eos; loss on the answer only.
    assert list(ex.input_ids[: len(prompt_ids)]) == prompt_ids
    assert _text(base, ex.labels[ex.labels != IGNORE_INDEX]) == "cba</s>"
    assert enc.end_of_turn_id == base.eos_token_id


def test_cut_off_teacher_answer_gets_no_end_of_turn(tok):
    ids = tok("cb", add_special_tokens=False)["input_ids"]
    enc = ChatEncoder(tok, 64).encode(MSGS, "cb", ids, finish_reason="length")
    assert _text(tok, enc.labels[enc.labels != IGNORE_INDEX]) == "cb"


def test_truncation_is_counted_and_keeps_the_prompt(tok):
    enc = ChatEncoder(tok, max_seq_len=12).encode(MSGS, "a long answer that does not fit")
    assert enc.truncated and len(enc.input_ids) == 12
    assert (enc.labels != IGNORE_INDEX).sum() > 0
    long_prompt = [{"role": "user", "content": "x" * 40}]
    enc2 = ChatEncoder(tok, max_seq_len=12).encode(long_prompt, "y")
    assert enc2.truncated and enc2.no_target
    assert (enc2.labels == IGNORE_INDEX).all()


def test_collate_pads_and_counts(tok):
    c = Collator(ChatEncoder(tok, 16), tok.pad_token_id, with_topk=True)
    rows = [
        {"messages": MSGS, "response": "cba"},
        {"messages": MSGS, "response": "a long answer that does not fit"},
    ]
    b = c(rows)
    assert b["input_ids"].shape == (2, 16)
    assert int(b["n_truncated"]) == 1 and int(b["n_examples"]) == 2
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert b["topk_logprobs"].shape[:2] == (2, 16)
    assert int(b["n_target_tokens"]) == int((b["labels"] != IGNORE_INDEX).sum())


def test_text_only_collator_ignores_teacher_ids(tok):
    c = Collator(ChatEncoder(tok, 64), tok.pad_token_id, with_topk=False, use_teacher_ids=False)
    b = c([{"messages": MSGS, "response": "cba", "response_token_ids": [9, 9, 9, 9, 9]}])
    assert _text(tok, b["labels"][b["labels"] != IGNORE_INDEX]) == "cba</s>"


def test_packing_keeps_examples_apart(tok):
    from transformers import AutoModelForCausalLM, LlamaConfig

    enc = ChatEncoder(tok, 64)
    rows = [{"messages": [{"role": "user", "content": w}], "response": w[::-1]} for w in ("ab", "xyz", "hello")]
    exs = [enc.encode_row(r) for r in rows]
    assert len(pack_examples(exs, 64)) == 1
    packed = Collator(enc, tok.pad_token_id, with_topk=False, packing=True)(rows)
    plain = Collator(enc, tok.pad_token_id, with_topk=False)(rows)
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((plain["labels"] != IGNORE_INDEX).sum())
    # A packed sequence scores each example exactly as on its own (no attention across them).
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    from distray.train.losses import compute_loss

    with torch.no_grad():
        lp = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        lu = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"], use_cache=False).logits
    a = compute_loss(lp, packed["labels"]).sft_sum
    b = compute_loss(lu, plain["labels"]).sft_sum
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_holdout_is_deterministic_and_near_the_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    flags = holdout_flags(ids, 0.1, seed=3)
    assert 0.07 < flags.mean() < 0.13
    assert (flags == holdout_flags(ids, 0.1, seed=3)).all()
    assert not in_holdout("x", 0.0)


def test_holdout_keeps_every_answer_to_one_prompt_on_one_side():
    import pyarrow as pa

    from distray.train.datasets import holdout_filter

    # 2 teachers × 3 samples per prompt: six row ids, one input id.
    rows = [
        {"id": f"{p}-{t}-{n}", "input_id": p, "messages": MSGS, "response": "x"}
        for p in (f"q{i}" for i in range(200)) for t in ("a", "b") for n in range(3)
    ]
    table = pa.Table.from_pylist(rows)
    val = holdout_filter(0.2, 0, keep_holdout=True)(table)
    train = holdout_filter(0.2, 0, keep_holdout=False)(table)
    val_prompts, train_prompts = set(val.column("input_id").to_pylist()), set(train.column("input_id").to_pylist())
    assert val.num_rows + train.num_rows == len(rows) and val.num_rows == 6 * len(val_prompts)
    assert val_prompts and not (val_prompts & train_prompts)
    # Rows without input_id (reference SFT: the id is the input id) split by id.
    plain = pa.Table.from_pylist([{"id": f"q{i}"} for i in range(200)])
    assert holdout_filter(0.2, 0, keep_holdout=True)(plain).column("id").to_pylist() == sorted(
        val_prompts, key=lambda q: int(q[1:])
    )


def _write_stage0_checkpoint(model_dir: str, out: Path) -> Path:
    """A ZeRO stage-0 DeepSpeed checkpoint of `model_dir` (what export reads), without DeepSpeed."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    (out / "step1").mkdir(parents=True)
    torch.save({"module": sd}, out / "step1" / "mp_rank_00_model_states.pt")
    (out / "latest").write_text("step1")
    return out


def test_export_stops_generation_at_the_trained_end_of_turn(tiny_model, tmp_path):
    import json

    from transformers import AutoTokenizer, GenerationConfig

    from distray.train.export import export_checkpoint

    ckpt = _write_stage0_checkpoint(tiny_model, tmp_path / "ckpt")
    # The tiny template ends turns with eos: nothing to add.
    out = export_checkpoint(str(ckpt), tiny_model, str(tmp_path / "plain"))
    base_eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert (eos if isinstance(eos, list) else [eos]) == [base_eos]
    # A ChatML-style template ends turns with <|im_end|>, which is not eos.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tok.save_pretrained(tmp_path / "chatml-tok")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    targets = ChatEncoder(tok, 64).encode(MSGS, "cba").labels
    assert _text(tok, targets[targets != IGNORE_INDEX]) == "cba<|im_end|>\n"  # what training teaches
    out2 = export_checkpoint(str(ckpt), tiny_model, str(tmp_path / "chatml"), tokenizer=str(tmp_path / "chatml-tok"))
    assert GenerationConfig.from_pretrained(out2).eos_token_id == [base_eos, im_end]
    assert json.loads((Path(out2) / "generation_config.json").read_text())["eos_token_id"] == [base_eos, im_end]


def test_deepspeed_batch_fields_follow_world_size():
    tc = TrainConfig(micro_batch_size=2, global_batch_size=8, num_workers=2, zero_stage=3)
    ds = build_deepspeed_config(tc, 2, use_gpu=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["zero_optimization"]["stage"] == 3
    # user values (DeepSpeed names) win, "auto" is unset, the rest is derived
    tc2 = TrainConfig(
        micro_batch_size=2,
        num_workers=2,
        deepspeed={"gradient_accumulation_steps": 3, "train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": 5}},
    )
    ds2 = build_deepspeed_config(tc2, 2, use_gpu=False)
    assert ds2["train_batch_size"] == 12 and ds2["zero_optimization"]["reduce_bucket_size"] == 5
    assert ds2["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_deepspeed_config(
            TrainConfig(deepspeed={"gradient_accumulation_steps": 3, "train_batch_size": 7}), 2, use_gpu=False
        )
    off = build_deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True), 2, use_gpu=False)
    assert off["zero_optimization"]["offload_param"]["device"] == "cpu" and "optimizer" in off


def test_step_plan_and_lr_schedule():
    assert plan_steps(100, 2, 4, 2, epochs=3, max_steps=None) == (18, 6, 13, 3)
    assert plan_steps(100, 2, 4, 2, epochs=1, max_steps=20) == (20, 6, 13, 4)
    with pytest.raises(DataError, match="per worker"):
        plan_steps(3, 2, 4, 2, epochs=1, max_steps=None)
    lrs = [lr_lambda(s, 2, 10, 0.1) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and abs(lrs[-1] - 0.1) < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_vocab_check_names_both_sizes(tok, tmp_path):
    from transformers import AutoTokenizer

    from distray.tiny import make_tokenizer

    other = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "other", vocab_size=300))
    ids = tok("cba", add_special_tokens=False)["input_ids"]
    ok_rows = [{"response": "cba", "response_token_ids": ids, "topk_token_ids": [[i] for i in ids]}]
    assert check_vocab(tok, len(tok), ok_rows, {"t": tok}) is None
    msg = check_vocab(other, len(other), ok_rows, {"teacher-dir": tok}, student_name="s")
    assert msg and str(len(tok)) in msg and str(len(other)) in msg and "teacher-dir" in msg
    out_of_range = [{"response": "x", "response_token_ids": [len(tok) + 5]}]
    assert "outside" in check_vocab(tok, len(tok), out_of_range)


def test_early_stopping_counts_evaluations_without_improvement():
    from distray.train.state import TrainState

    st = TrainState()
    stops = [st.record_eval({"val_loss": v}, patience=2) for v in (3.0, 2.0, 2.5, 1.5, 1.6, 1.7)]
    assert stops == [False, False, False, False, False, True]
    assert st.best_val_loss == 1.5 and st.last_val_loss == 1.7
    assert [r["val_step"] for r in st.history] == [0] * 6


def test_early_stopping_exports_the_best_checkpoint_not_the_last():
    from types import SimpleNamespace

    from distray.train.export import export_source
    from distray.train.state import TrainState

    st = TrainState()
    for step, v in ((2, 2.0), (4, 1.5), (6, 1.6), (8, 1.7)):
        st.step = step
        st.record_eval({"val_loss": v}, patience=2)
    assert st.early_stopped and st.best_step == 4

    def ckpt(step):
        return SimpleNamespace(path=f"/runs/t/train/checkpoints/checkpoint_{step:08d}")

    last, best = ckpt(8), ckpt(4)
    res = SimpleNamespace(
        metrics={"early_stopped": True, "best_step": 4}, checkpoint=last,
        best_checkpoints=[(ckpt(2), {}), (best, {}), (last, {})],
    )
    assert export_source(res) is best
    res.metrics = {"early_stopped": False, "best_step": 4}  # ran to the end: the latest weights
    assert export_source(res) is last
