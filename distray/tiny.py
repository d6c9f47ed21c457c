"""Tiny local models and tokenizers for tests, benchmarks and the quickstart demo.

    distray make-tiny --out runs/tiny --layers 2 --hidden 128 --heads 4

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained on generated text,
and the model is a randomly initialised Llama. Both load offline with `AutoTokenizer` /
`AutoModelForCausalLM` and in `vllm.LLM` (head_dim is kept ≥ 32, which vLLM's CPU attention needs).
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

from distray.errors import UsageError

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tokenizer", "make_tiny", "intermediate_size"]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# Assistant turns end with eos, so a model trained on rendered chats learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_WORDS = (
    "the a of to and in is for on that with as by at from it this be are was or an which "
    "model teacher student answer question data train test date month year reverse string "
    "january february march april may june july august september october november december "
    "positive negative neutral good bad great terrible fine movie film story rev what how "
    "hello world summary text answer number one two three four five six seven eight nine ten"
).split()


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        words.append("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
        words.append(str(rng.randint(0, 99999)))
        rng.shuffle(words)
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", "="]))
    return lines


def make_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int | None = None) -> str:
    """Train a byte-level BPE tokenizer on generated text and save it as a HF tokenizer folder.

    Args:
        out_dir: folder to write (tokenizer.json, tokenizer_config.json, chat template).
        vocab_size: total vocabulary; None gives pure byte level (256 bytes + special tokens),
            i.e. one token per character of ASCII text, which small models learn fastest.

    Returns:
        `out_dir` as a string.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = 256 + len(SPECIAL_TOKENS)
    if vocab_size is not None and vocab_size < base:
        raise UsageError(
            f"vocab_size ({vocab_size}) must be ≥ {base} (256 bytes + {len(SPECIAL_TOKENS)} "
            "special tokens), or None for pure byte level"
        )
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or base,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=4096,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return str(out)


def intermediate_size(hidden: int) -> int:
    """Llama's ≈ 8/3 × hidden MLP width, rounded up to a multiple of 32."""
    return -(-(8 * hidden // 3) // 32) * 32


def make_tiny(
    out_dir: str | os.PathLike[str],
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    vocab_size: int | None = None,
    max_position: int = 512,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Write a randomly initialised Llama model with a local tokenizer as a HF folder.

    Args:
        out_dir: folder to write (config.json, model.safetensors, tokenizer files).
        layers: decoder layers.
        hidden: hidden size; hidden / heads must be ≥ 32 for vLLM's CPU attention.
        heads: attention heads (and key/value heads).
        vocab_size: tokenizer vocabulary (see `make_tokenizer`); ignored with `tokenizer_dir`.
        max_position: longest sequence.
        seed: weight-initialisation seed.
        tokenizer_dir: reuse this tokenizer (teacher and student then share a vocabulary).

    Returns:
        `out_dir` as a string.

    Raises:
        UsageError: head_dim below 32 or not an integer.
    """
    if hidden % heads or hidden // heads < 32:
        raise UsageError(
            f"hidden ({hidden}) / heads ({heads}) must be a whole number ≥ 32 (vLLM's CPU "
            f"attention needs head_dim ≥ 32); e.g. hidden {max(32 * heads, hidden)} with {heads} heads"
        )
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        make_tokenizer(out, vocab_size)
    else:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate_size(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "distray_tiny.json").write_text(
        json.dumps({"layers": layers, "hidden": hidden, "heads": heads, "parameters": n_params})
    )
    logger.info("tiny model: %s params, vocab %d → %s", f"{n_params:,}", len(tok), out)
    return str(out)
