"""Prompts as every stage sees them: the tokenizer, the chat template, the end-of-answer ids.

    from distray.prompts import load_tokenizer, render_prompt
    text, ids = render_prompt(load_tokenizer(model), messages, apply_chat_template=True)

Teacher engines, training, evaluation and serving all render a prompt the same way; that is
what keeps the student's training prompts identical to the prompts it is served with.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["load_tokenizer", "eos_ids", "render_prompt"]


@lru_cache(maxsize=8)
def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, loaded once per worker process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)


@lru_cache(maxsize=8)
def eos_ids(model: str, trust_remote_code: bool = False) -> frozenset[int]:
    """Every token id that ends an answer: the tokenizer's eos and generation_config's."""
    ids: set[int] = set()
    tok = load_tokenizer(model, trust_remote_code)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model)
        eos = gen.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    except (OSError, ValueError):
        pass  # no generation_config.json: the tokenizer's eos is all there is
    return frozenset(ids)


def render_prompt(tok: Any, messages: list[dict[str, str]], apply_chat_template: bool) -> tuple[str, list[int]]:
    """The prompt text and token ids an engine sees for these turns.

    With a chat template the template's own special tokens (bos) are kept and none are added
    again; without one, the turns' contents are joined with newlines and the tokenizer adds
    its usual special tokens.
    """
    if apply_chat_template and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        text = "\n".join(m["content"] for m in messages)
        ids = tok(text)["input_ids"]
    return text, list(ids)
