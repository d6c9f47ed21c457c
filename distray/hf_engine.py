"""One transformers engine, shared by the `hf` teacher, the `hf` serve backend and evaluate.

    from distray.hf_engine import HFEngine
    engine = HFEngine("runs/x/train/student")
    (answer,) = engine.generate([prompt_ids], max_tokens=32, logprobs=5)   # batched
    for token_id in engine.stream(prompt_ids, max_tokens=32): ...          # one step at a time

For machines without vLLM. The engine behaves like vLLM where distray relies on it:

- an answer ends at the first end-of-answer id (`prompts.eos_ids`: the tokenizer's and the
  generation config's), which is kept in the ids, as vLLM keeps it;
- a stop string ends an answer: the ids keep the token that completed it, the text is cut
  before it (`cut_at_stop`, `IncrementalText` when streaming);
- top-k logprobs are the raw logits' log-softmax at T=1, whatever the sampling temperature.

Prompts come in as token ids, rendered by `distray.prompts.render_prompt`, so every stage sees
the same prompt for the same turns.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from distray import prompts

__all__ = [
    "Completion",
    "ForcedScores",
    "HFEngine",
    "IncrementalText",
    "cut_at_stop",
    "teacher_forced",
    "topk_per_step",
]

#: Sampling temperatures above 0 and below this are raised to it, as vLLM does (`_MAX_TEMP`).
MIN_TEMPERATURE = 1e-2


@dataclass
class Completion:
    """One answer of `HFEngine.generate`.

    `token_ids` end at the first eos or at the token that completed a stop string (kept in
    both cases); `text` is their decode, cut before the stop string. The top-k lists have one
    entry per token id, best first; None when no logprobs were asked for.
    """

    token_ids: list[int]
    text: str
    stopped: bool = False
    topk_token_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None


class HFEngine:
    """A causal LM and its tokenizer, on the GPU when there is one.

    Calls take a lock around the model, so one engine can be shared by threads: concurrent
    `stream`s interleave token by token (fair time to first token, no batching).

    Args:
        model: a Hugging Face model folder.
        dtype: a torch dtype name (`bfloat16`), or `auto` for the folder's stored dtype.
        trust_remote_code: allow model code from the folder.
    """

    def __init__(self, model: str, *, dtype: str = "auto", trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.path = model
        self.tok: Any = prompts.load_tokenizer(model, trust_remote_code)
        self.eos: frozenset[int] = prompts.eos_ids(model, trust_remote_code)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        loaded: Any = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        self.model: Any = loaded.to(self.device).eval()
        n = getattr(self.model.config, "max_position_embeddings", None)
        self.max_model_len: int | None = int(n) if n else None
        pad = self.tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else min(self.eos) if self.eos else 0
        self._lock = threading.Lock()

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
    ) -> list[Completion]:
        """Answer a batch of prompts with one transformers `generate` call (left padding).

        Args:
            prompt_ids: one list of token ids per prompt.
            max_tokens: new tokens per answer, lowered to what fits in the model's context.
            temperature: 0 for greedy decoding, else sampling with `top_p`.
            top_p: nucleus sampling mass.
            stop: strings that end an answer.
            seed: `torch.manual_seed` before the call, so a rerun of the batch repeats.
            logprobs: top-k logprobs to return per answer token; None for none.

        Returns:
            One `Completion` per prompt, in order.
        """
        import torch

        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        max_new = max_tokens
        if self.max_model_len is not None:
            max_new = max(1, min(max_new, self.max_model_len - width))
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos) or None,
            "return_dict_in_generate": True,
            "output_logits": logprobs is not None,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=max(temperature, MIN_TEMPERATURE), top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tok)
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
            )
        seqs = out.sequences[:, width:].tolist()
        topk = topk_per_step(out.logits, logprobs) if logprobs is not None and out.logits else None
        answers = []
        for i, toks in enumerate(seqs):
            # Cut at the first eos (kept, as vLLM keeps it); what follows is padding.
            for j, t in enumerate(toks):
                if t in self.eos:
                    toks = toks[: j + 1]
                    break
            cut = cut_at_stop(self.tok, toks, stop) if stop else None
            if cut is not None:
                toks, text = cut
            else:
                text = self.tok.decode(toks, skip_special_tokens=True)
            answers.append(Completion(
                token_ids=toks,
                text=text,
                stopped=cut is not None,
                topk_token_ids=topk[0][i][: len(toks)] if topk else None,
                topk_logprobs=topk[1][i][: len(toks)] if topk else None,
            ))
        return answers

    def stream(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[int]:
        """Yield one prompt's new token ids; each `next()` is one forward step (blocking).

        The eos that ends the answer is not yielded. Sampling draws from a generator of its
        own (seeded with `seed`, else at random), so concurrent streams do not share a seed.
        """
        import torch

        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        ids = torch.tensor([prompt_ids], device=self.device)
        past = None
        for _ in range(max_tokens):
            with self._lock, torch.no_grad():
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = _sample(out.logits[0, -1].float(), temperature, top_p, gen)
            if tok in self.eos and not ignore_eos:
                return
            yield tok
            ids = torch.tensor([[tok]], device=self.device)


def _sample(logits: Any, temperature: float, top_p: float, gen: Any) -> int:
    """The next token id from one step's [V] logits: argmax at T=0, else nucleus sampling."""
    import torch

    if temperature == 0:
        return int(torch.argmax(logits))
    # As vLLM does: a temperature this small overflows the logits to inf (then NaN).
    probs = torch.softmax(logits / max(temperature, MIN_TEMPERATURE), dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        keep[0] = True  # the best token always stays (a top_p of 1e-300 is 0 in float32)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def topk_per_step(logits: tuple[Any, ...], k: int) -> tuple[list[Any], list[Any]]:
    """Top-k token ids and log-probabilities (log-softmax at T=1) of each row at each step.

    One step at a time, so the extra memory is one [B, V] step, not a [B, T, V] stack (several
    GB at batch 16 with a 150k vocabulary).

    Args:
        logits: generate's `output_logits`, one [B, V] tensor of raw logits per step.
        k: how many of the best tokens to keep (at most V).

    Returns:
        `(ids, logprobs)` as nested lists [B][T][k], best first.
    """
    import torch

    ids, lps = [], []
    for step in logits:
        lp = torch.log_softmax(step.float(), dim=-1)
        vals, idx = torch.topk(lp, k=min(k, lp.shape[-1]), dim=-1)
        ids.append(idx)
        lps.append(vals)
    return torch.stack(ids, dim=1).tolist(), torch.stack(lps, dim=1).tolist()


@dataclass
class ForcedScores:
    """One sequence's continuation scored teacher-forced by `teacher_forced`.

    `nll[j]` is −log p(target[j] | prompt, target[:j]) in nats; `top1_match[j]` is whether the
    model's most likely token at that position is target[j]. One entry per scored target token.
    """

    nll: list[float]
    top1_match: list[bool]


def teacher_forced(
    model: Any,
    prompt_ids: list[list[int]],
    target_ids: list[list[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
    max_len: int | None = None,
) -> list[ForcedScores]:
    """Score given continuations under a causal LM in one forward pass per batch.

    Each row is `prompt + target`, right-padded (so positions need no shift under a causal
    mask); the logits at position t predict token t + 1, and only the target's positions are
    read, in float32 log-softmax over the full vocabulary (T=1). A row longer than `max_len`
    keeps its whole prompt and loses the target's tail (a row whose prompt alone fills the
    context scores nothing).

    Args:
        model: a transformers causal LM (eval mode), on any device.
        prompt_ids: one list of prompt token ids per row.
        target_ids: the continuation to score, one list per row (e.g. the teacher's answer ids).
        pad_id: id that fills the padding (masked out, never read).
        batch_size: rows per forward pass.
        max_len: longest scored sequence; default the model's `max_position_embeddings`.

    Returns:
        One `ForcedScores` per row, in order.
    """
    import torch

    if len(prompt_ids) != len(target_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
    if any(not p for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first target token's context)")
    limit = max_len or getattr(model.config, "max_position_embeddings", None)
    device = next(model.parameters()).device
    out: list[ForcedScores] = []
    for start in range(0, len(prompt_ids), batch_size):
        rows = []
        for p, t in zip(prompt_ids[start : start + batch_size], target_ids[start : start + batch_size], strict=True):
            keep = len(t) if limit is None else max(0, min(len(t), int(limit) - len(p)))
            rows.append((list(p), list(t[:keep])))
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, t) in enumerate(rows):
            seq = p + t
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, (p, t) in enumerate(rows):
            if not t:
                out.append(ForcedScores([], []))
                continue
            # Positions len(p)-1 … len(p)+len(t)-2 predict the target's tokens.
            step = logits[i, len(p) - 1 : len(p) + len(t) - 1].float()
            lp = torch.log_softmax(step, dim=-1)
            tgt = torch.tensor(t, dtype=torch.long, device=lp.device)
            nll = -lp.gather(1, tgt[:, None])[:, 0]
            match = lp.argmax(dim=-1) == tgt
            out.append(ForcedScores(nll.tolist(), match.tolist()))
    return out


def cut_at_stop(tok: Any, toks: list[int], stop: list[str]) -> tuple[list[int], str] | None:
    """The ids up to the token that completed the first stop string and the text before it,
    as vLLM returns them; None when no stop string occurs in the answer.

    HF pads a row that stopped early, so the ids after that token are dropped.
    """

    def text(n: int) -> str:
        return str(tok.decode(toks[:n], skip_special_tokens=True))

    if not any(x in text(len(toks)) for x in stop):
        return None
    # The shortest prefix whose text holds a stop string; a longer prefix's text extends it.
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(x in text(mid) for x in stop):
            hi = mid
        else:
            lo = mid + 1
    kept = text(lo)
    return toks[:lo], kept[: min(kept.find(x) for x in stop if x in kept)]


class IncrementalText:
    """Streamed text of one answer: each token decodes a few ids, not the whole answer.

    Detokenization follows vLLM's and TGI's incremental decoders: decode the window from the
    previous emit's start (`prefix`) and keep what is past the text already known, waiting
    while the window ends in an incomplete UTF-8 sequence (U+FFFD). Stop strings are looked
    for only in the held-back tail plus the new text, and the last `max(len(stop)) - 1`
    characters are held back, so a stop split across tokens is found and never sent.

    Example (stop "ab"): push "x" → "", push "a" → "x", push "b" → "" and `stopped`.
    """

    def __init__(self, tok: Any, stops: list[str]) -> None:
        self.tok = tok
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] is context already decoded; ids[read:] is new
        self.read = 0
        self.held = ""  # decoded but not sent: it may be the start of a stop string
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tok.decode(ids, skip_special_tokens=True)
        return text

    def _new_text(self, final: bool) -> str:
        window = self.ids[self.prefix:]
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(window)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""  # nothing printable yet (e.g. half a multi-byte character)
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def _emit(self, new: str, final: bool) -> str:
        text = self.held + new
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.held = True, ""
            return text[: min(cuts)]
        if final or len(text) <= self.keep:
            self.held = "" if final else text
            return text if final else ""
        self.held = text[len(text) - self.keep:]
        return text[: len(text) - self.keep]

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that can be sent now."""
        self.ids.append(token)
        return self._emit(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """The rest of the text once generation ends (held-back and undecoded tail)."""
        return self._emit(self._new_text(final=True), final=True)
