"""Training examples: chat template, prompt masking, truncation, optional packing, collation.

    pytest tests/unit/test_train_data.py

A teacher-data row (see `distray.formats.TEACHER_DATA_SCHEMA`)::

    {"messages": [{"role": "user", "content": "rev abc"}], "response": "cba",
     "response_token_ids": [70, 69, 68, 2],
     "topk_token_ids": [[70, 71], [69, 68], [68, 69], [2, 5]],
     "topk_logprobs": [[-0.1, -2.4], [-0.2, -1.9], [-0.05, -3.1], [-0.01, -4.6]]}

becomes one sequence `<s><|user|>rev abc<|assistant|>` + response ids (+ the template's
end-of-turn tokens when the teacher's ids lack them). Targets are *pre-shifted*: position `t`
holds the id of token `t + 1` and the teacher's top-k for it, and prompt positions hold -100,
so loss falls on response tokens only (`distray.train.losses` reads them without shifting).

Rows without `response_token_ids` (SFT on text, or SFT on ground-truth `reference` answers) are
tokenised from the text. Sequences longer than `max_seq_len` lose the end of their answer and
are counted; a prompt that alone fills `max_seq_len` keeps no target tokens and is counted too
(the row still yields a batch row, so every worker runs the same number of steps).
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distray.formats import (
    FINISH_REASON,
    ID,
    INPUT_ID,
    MESSAGES,
    RESPONSE,
    RESPONSE_TOKEN_IDS,
    TOPK_LOGPROBS,
    TOPK_TOKEN_IDS,
)
from distray.train.losses import IGNORE_INDEX, MISSING_LOGPROB

__all__ = [
    "TRAIN_COLUMNS",
    "Encoded",
    "ChatEncoder",
    "Collator",
    "pack_examples",
    "in_holdout",
    "holdout_flags",
]

#: Columns a training worker reads; everything else stays in the Parquet files. `input_id` keys
#: the validation hold-out (all samples and teachers of one prompt fall on the same side).
TRAIN_COLUMNS = [
    ID, INPUT_ID, MESSAGES, RESPONSE, RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS, TOPK_LOGPROBS, FINISH_REASON,
]

_PROBE = "\u2063distray-probe\u2063"


@dataclass
class Encoded:
    """One tokenised example with pre-shifted targets.

    Attributes:
        input_ids: (L,) token ids.
        labels: (L,) target id of position t (token t + 1), -100 where there is no loss.
        topk_ids: (L, k) teacher top-k ids per target position, or None (no teacher logprobs).
        topk_logprobs: (L, k) teacher logprobs, `MISSING_LOGPROB` where missing, or None.
        truncated: the answer was cut to fit `max_seq_len`.
        no_target: the prompt alone filled `max_seq_len`; the example carries no loss.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    truncated: bool = False
    no_target: bool = False


@dataclass
class ChatEncoder:
    """Turns (prompt turns, answer) into token ids with the student's chat template.

    The template is probed once: the text it puts after an assistant answer (`</s>`,
    `<|im_end|>\\n`, ...) becomes the end-of-turn suffix, so the student learns to stop exactly
    as its template ends a turn; and a teacher answer that already ends with that token is not
    given it twice.

    A tokenizer without a chat template (a base model) gets the prompt generate and evaluate
    give it (`distray.prompts.render_prompt`: the turns' contents joined with
    newlines, plus the tokenizer's own special tokens) and eos as the end of a turn.

    Args:
        tokenizer: a Hugging Face tokenizer, with or without a chat template.
        max_seq_len: the longest sequence (prompt + answer).
    """

    tokenizer: Any
    max_seq_len: int
    suffix_ids: list[int] = field(init=False)
    gen_prefix: str = field(init=False)
    has_template: bool = field(init=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.has_template = bool(getattr(tok, "chat_template", None))
        if not self.has_template:
            self.gen_prefix = ""
            self.suffix_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
            return
        turns = [{"role": "user", "content": "hi"}]
        prompt = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(
            turns + [{"role": "assistant", "content": _PROBE}], tokenize=False
        )
        at = full.rfind(_PROBE)
        if at < 0 or not full.startswith(prompt):
            # A template that rewrites answers: fall back to eos as the end of a turn.
            self.gen_prefix = ""
            self.suffix_ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
            return
        # Some templates put text between the generation prompt and the answer (e.g. an empty
        # think block); it belongs to the prompt side, without loss.
        self.gen_prefix = full[len(prompt) : at]
        suffix = full[at + len(_PROBE) :]
        self.suffix_ids = list(tok(suffix, add_special_tokens=False)["input_ids"]) if suffix else []

    @property
    def end_of_turn_id(self) -> int | None:
        """The token the student learns to end an answer with, or None.

        The first special token of the end-of-turn suffix (`<|im_end|>` of `<|im_end|>\\n`);
        export adds it to the generation config's eos ids.
        """
        tok = self.tokenizer
        special = set(getattr(tok, "all_special_ids", None) or [])
        added = getattr(tok, "added_tokens_decoder", None) or {}
        special |= {i for i, t in added.items() if getattr(t, "special", False)}
        return next((int(t) for t in self.suffix_ids if t in special), None)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered prompt turns plus the generation prompt."""
        if not self.has_template:
            from distray.prompts import render_prompt

            return render_prompt(self.tokenizer, list(messages), apply_chat_template=False)[1]
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(text + self.gen_prefix, add_special_tokens=False)["input_ids"])

    def encode(
        self,
        messages: list[dict[str, str]],
        response: str | None,
        response_token_ids: list[int] | None = None,
        topk_token_ids: list[list[int]] | None = None,
        topk_logprobs: list[list[float]] | None = None,
        finish_reason: str | None = None,
    ) -> Encoded:
        """Tokenise one example.

        Args:
            messages: prompt turns.
            response: the answer text (used when `response_token_ids` is None).
            response_token_ids: the teacher's answer ids; kept exactly, so the student is scored
                on the tokens the teacher's logprobs describe.
            topk_token_ids: per answer position, the teacher's top-k ids.
            topk_logprobs: per answer position, the matching logprobs.
            finish_reason: `length` means the teacher was cut off; no end-of-turn is appended.

        Returns:
            The encoded example.
        """
        prompt = self.prompt_ids(messages)
        if response_token_ids is not None:
            answer = [int(t) for t in response_token_ids]
        else:
            answer = list(self.tokenizer(response or "", add_special_tokens=False)["input_ids"])
        n_teacher = len(answer) if topk_token_ids is not None else 0
        if finish_reason != "length" and self.suffix_ids:
            suffix = self.suffix_ids
            if answer and answer[-1] == suffix[0]:
                suffix = suffix[1:]
            answer = answer + suffix

        ids = prompt + answer
        truncated = no_target = False
        if len(ids) > self.max_seq_len:
            truncated = True
            ids = ids[: self.max_seq_len]
        n_prompt = min(len(prompt), len(ids))
        n = len(ids)
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        # position t predicts token t + 1: answer token j sits at n_prompt + j, its target slot
        # is n_prompt + j - 1.
        if n > n_prompt:
            labels[n_prompt - 1 : n - 1] = ids[n_prompt:n]
        else:
            no_target = True
        enc = Encoded(np.asarray(ids, dtype=np.int64), labels, truncated=truncated, no_target=no_target)
        if topk_token_ids is not None and topk_logprobs is not None:
            k = max((len(r) for r in topk_token_ids), default=1) or 1
            tk_ids = np.zeros((n, k), dtype=np.int64)
            tk_lp = np.full((n, k), MISSING_LOGPROB, dtype=np.float32)
            n_answer_kept = max(0, n - n_prompt)
            for j in range(min(n_teacher, n_answer_kept, len(topk_token_ids))):
                row_ids, row_lp = topk_token_ids[j], topk_logprobs[j]
                if row_ids is None or row_lp is None:
                    continue
                m = min(len(row_ids), len(row_lp))
                tk_ids[n_prompt + j - 1, :m] = row_ids[:m]
                tk_lp[n_prompt + j - 1, :m] = row_lp[:m]
            enc.topk_ids, enc.topk_logprobs = tk_ids, tk_lp
        return enc

    def encode_row(self, row: dict[str, Any]) -> Encoded:
        """`encode` on a teacher-data (or reference-SFT) row dict."""
        return self.encode(
            list(row.get(MESSAGES) or []),
            row.get(RESPONSE),
            row.get(RESPONSE_TOKEN_IDS),
            row.get(TOPK_TOKEN_IDS),
            row.get(TOPK_LOGPROBS),
            row.get(FINISH_REASON),
        )


def pack_examples(examples: list[Encoded], max_seq_len: int) -> list[list[Encoded]]:
    """Greedy first-fit packing of examples into bins of at most `max_seq_len` tokens.

    Packing happens inside one micro-batch, so every worker still runs the same number of
    steps; it only removes padding. Order within a bin follows the input order.
    """
    bins: list[list[Encoded]] = []
    sizes: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        for i, used in enumerate(sizes):
            if used + n <= max_seq_len:
                bins[i].append(ex)
                sizes[i] += n
                break
        else:
            bins.append([ex])
            sizes.append(n)
    return bins


class Collator:
    """Rows of one micro-batch (a pyarrow Table from Ray Data) → padded torch tensors.

    Output keys: `input_ids`, `labels`, `attention_mask` (or, when packing, `position_ids`
    restarting at 0 for each packed example, which transformers turns into a block-diagonal
    mask), `topk_ids` / `topk_logprobs` (when `with_topk`), and the counters `n_examples`,
    `n_truncated`, `n_no_target`, `n_tokens`, `n_target_tokens`.

    Args:
        encoder: the chat encoder.
        pad_id: padding token id.
        with_topk: build the top-k tensors (logit losses).
        packing: pack several examples per row.
        use_teacher_ids: use `response_token_ids` / top-k when present (False: re-tokenise the
            answer text, for SFT with a student of another vocabulary).
    """

    def __init__(
        self,
        encoder: ChatEncoder,
        pad_id: int,
        with_topk: bool,
        packing: bool = False,
        use_teacher_ids: bool = True,
    ) -> None:
        self.encoder = encoder
        self.pad_id = pad_id
        self.with_topk = with_topk
        self.packing = packing
        self.use_teacher_ids = use_teacher_ids
        # Ray Data calls collate functions from prefetch threads; a fast tokenizer is not safe
        # to call from several threads at once ("Already borrowed").
        self._lock = threading.Lock()

    def __call__(self, batch: Any) -> dict[str, Any]:
        """Collate a pyarrow Table or a list of row dicts."""
        rows = batch.to_pylist() if hasattr(batch, "to_pylist") else list(batch)
        if not self.use_teacher_ids:
            # Another vocabulary (SFT only): answers are tokenised from their text.
            rows = [
                {k: v for k, v in r.items() if k not in (RESPONSE_TOKEN_IDS, TOPK_TOKEN_IDS, TOPK_LOGPROBS)}
                for r in rows
            ]
        with self._lock:
            encoded = [self.encoder.encode_row(r) for r in rows]
        return self.collate(encoded)

    def collate(self, examples: list[Encoded]) -> dict[str, Any]:
        """Pad (or pack) encoded examples into one batch of tensors."""
        import torch

        groups = (
            pack_examples(examples, self.encoder.max_seq_len)
            if self.packing
            else [[e] for e in examples]
        )
        width = max(sum(len(e.input_ids) for e in g) for g in groups)
        b = len(groups)
        k = 1
        if self.with_topk:
            k = max((e.topk_ids.shape[1] for e in examples if e.topk_ids is not None), default=1)
        input_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
        attn = np.zeros((b, width), dtype=np.int64)
        pos = np.zeros((b, width), dtype=np.int64)
        tk_ids = np.zeros((b, width, k), dtype=np.int64) if self.with_topk else None
        tk_lp = np.full((b, width, k), MISSING_LOGPROB, dtype=np.float32) if self.with_topk else None
        for i, group in enumerate(groups):
            at = 0
            for e in group:
                n = len(e.input_ids)
                input_ids[i, at : at + n] = e.input_ids
                labels[i, at : at + n] = e.labels
                attn[i, at : at + n] = 1
                pos[i, at : at + n] = np.arange(n)
                if tk_ids is not None and tk_lp is not None and e.topk_ids is not None:
                    kk = e.topk_ids.shape[1]
                    tk_ids[i, at : at + n, :kk] = e.topk_ids
                    tk_lp[i, at : at + n, :kk] = e.topk_logprobs
                at += n
            if self.packing:
                # Padding after the last packed example continues counting, so it forms no
                # sequence of its own that could attend back into real tokens.
                pos[i, at:] = np.arange(at, width) - at + (len(group[-1].input_ids) if group else 0)
        out: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            # Counters as 0-d tensors: a batch that is all tensors is one Ray Data can move to
            # the training device by itself.
            "n_examples": torch.tensor(len(examples)),
            "n_truncated": torch.tensor(sum(e.truncated for e in examples)),
            "n_no_target": torch.tensor(sum(e.no_target for e in examples)),
            "n_tokens": torch.tensor(int(attn.sum())),
            "n_target_tokens": torch.tensor(int((labels != IGNORE_INDEX).sum())),
        }
        if self.packing:
            out["position_ids"] = torch.from_numpy(pos)
        else:
            out["attention_mask"] = torch.from_numpy(attn)
        if tk_ids is not None and tk_lp is not None:
            out["topk_ids"] = torch.from_numpy(tk_ids)
            out["topk_logprobs"] = torch.from_numpy(tk_lp)
        return out


def in_holdout(row_id: str, fraction: float, seed: int = 0) -> bool:
    """True when a row belongs to the held-out validation split.

    A CRC32 of (seed, id) rather than Python's `hash`, which is salted per process: every Ray
    task must agree on the split.
    """
    if fraction <= 0:
        return False
    h = zlib.crc32(f"{seed}:{row_id}".encode())
    return (h % 1_000_000) < fraction * 1_000_000


def holdout_flags(ids: Any, fraction: float, seed: int = 0) -> np.ndarray:
    """`in_holdout` over a column of ids (numpy array or list)."""
    return np.fromiter((in_holdout(str(i), fraction, seed) for i in ids), dtype=bool, count=len(ids))
