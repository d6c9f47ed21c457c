"""Task-type presets (nli, conversation, qa, math, summarization) and built-in synthetic tasks.

    distray data make-task reverse --out data/reverse --n 4000

A preset is a dict of config defaults laid underneath what the user wrote, so every value it
sets can be overridden. `task_prompts(cfg.task)` gives the system prompt and prompt template a
stage should use (labels filled in, the chain-of-thought instruction appended when asked for).

A built-in task writes train/validation/test JSONL from a seed. Rows::

    {"id": "reverse-test-000000", "prompt": "rev kfzeuolq=", "reference": "qlouezfk"}
    {"id": "date-test-000000", "prompt": "date 2024-03-15=", "reference": "March 15, 2024"}
    {"id": "sentiment-test-000000", "prompt": "review: soup cold but view superb =",
     "reference": "positive"}

Each split is drawn from its own stream (`seed`, task, split), so the test set does not change
when `n` (the training size) does, and no prompt appears in two splits.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PRESETS",
    "COT_INSTRUCTION",
    "preset_defaults",
    "task_prompts",
    "BuiltinTask",
    "BUILTIN_TASKS",
    "builtin_task",
    "make_task",
    "task_rows",
]

#: Appended to the system prompt when `task.chain_of_thought` is on (Azure's
#: enable_chain_of_thought): reason first, then a last line that `distray.answers.final_answer`
#: cuts out for the scorers and the generate verifier.
COT_INSTRUCTION = (
    "Think step by step and show your reasoning. Then give the final answer on the last line "
    "as 'The answer is: <answer>'."
)

NLI_LABELS = ["entailment", "neutral", "contradiction"]

PRESETS: dict[str, dict[str, Any]] = {
    "custom": {},
    "nli": {
        "task": {
            # Labels written out (not `{labels}`) so a stage that reads system_prompt directly
            # still sends a complete prompt; `task_prompts` fills `{labels}` for users' own.
            "system_prompt": "Decide whether the hypothesis follows from the premise. "
            "Answer with exactly one label: entailment, neutral or contradiction.",
            "prompt_template": "{prompt}\nLabel:",
            "labels": list(NLI_LABELS),
        },
        # The answer must be one of the labels, and equal the reference when there is one.
        "generate": {"filters": {"verifier": "label", "max_chars": 2000}},
        "evaluate": {"scorers": ["choice", "teacher_agreement"]},
    },
    "conversation": {
        "task": {"system_prompt": "You are a helpful assistant."},
        "generate": {"filters": {"drop_empty": True}},
        "evaluate": {"scorers": ["bleu", "rouge_l", "teacher_agreement"]},
    },
    "qa": {
        "task": {
            "system_prompt": "Answer the question concisely, with the answer only.",
            "prompt_template": "Question: {prompt}\nAnswer:",
        },
        # Non-empty by default; set generate.filters.verifier to `exact` or `f1` to also check
        # the answer against the reference.
        "generate": {"filters": {"drop_empty": True}},
        "evaluate": {"scorers": ["exact_match", "f1"]},
    },
    "math": {
        "task": {
            "system_prompt": "Solve the problem. End with the final numeric answer on its own "
            "line as 'The answer is: <number>'.",
        },
        # The final number must equal the reference's when there is one.
        "generate": {"filters": {"verifier": "numeric"}},
        "evaluate": {"scorers": ["numeric"]},
    },
    "summarization": {
        "task": {
            "system_prompt": "Summarise the text in a few sentences.",
            "prompt_template": "Text:\n{prompt}\n\nSummary:",
        },
        "generate": {"filters": {"drop_empty": True, "min_chars": 10}},
        "evaluate": {"scorers": ["rouge_l", "bleu"], "max_tokens": 256},
    },
}


def preset_defaults(task_type: str) -> dict[str, Any]:
    """The config defaults of a task type ({} for custom or an unknown name, which the
    config's own validation then reports)."""
    return copy.deepcopy(PRESETS.get(task_type, {}))


def task_prompts(task: Any) -> tuple[str | None, str]:
    """The system prompt and prompt template a stage should send, from a `TaskConfig`.

    `{labels}` in either is replaced by the comma-separated `task.labels`; with
    `task.chain_of_thought` the chain-of-thought instruction is appended to the system prompt
    (it becomes the system prompt when there is none).

    Returns:
        `(system_prompt or None, prompt_template)`.
    """
    labels = ", ".join(task.labels or [])
    system = task.system_prompt
    template = task.prompt_template or "{prompt}"
    if system is not None:
        system = system.replace("{labels}", labels)
    template = template.replace("{labels}", labels)
    if getattr(task, "chain_of_thought", False):
        system = f"{system} {COT_INSTRUCTION}" if system else COT_INSTRUCTION
    return system, template


# --------------------------------------------------------------------------------------------
# built-in synthetic tasks
# --------------------------------------------------------------------------------------------

Example = tuple[str, str]  # (prompt, reference)


@dataclass(frozen=True)
class BuiltinTask:
    """A synthetic task: how to draw one example, and how to score it.

    Attributes:
        name: the task's name (`data.builtin.name`, `distray data make-task NAME`).
        description: one line for `--help`.
        draw: draws one `(prompt, reference)` from a `random.Random`.
        scorers: evaluate scorers that fit the task.
        labels: allowed answers for classification tasks, else None.
        task_type: the preset closest to the task.
        verifier: generate.filters.verifier that fits the task's teacher output.
    """

    name: str
    description: str
    draw: Callable[[random.Random], Example]
    scorers: list[str]
    labels: list[str] | None = None
    task_type: str = "custom"
    verifier: str = "exact"
    capacity: int = field(default=10**9, repr=False)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _draw_reverse(rng: random.Random) -> Example:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(5, 10)))
    return f"rev {word}=", word[::-1]


_MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
_DATE_START = _dt.date(1950, 1, 1)
_DATE_DAYS = (_dt.date(2049, 12, 31) - _DATE_START).days


def _draw_date(rng: random.Random) -> Example:
    d = _DATE_START + _dt.timedelta(days=rng.randint(0, _DATE_DAYS))
    return f"date {d.isoformat()}=", f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


_NOUNS = [
    "food", "service", "staff", "room", "view", "price", "music", "coffee",
    "soup", "bed", "wifi", "location", "pizza", "tea", "pool", "bar",
]  # fmt: skip
# 24 words per polarity: enough that 200 labelled examples leave a few unseen in the deciding
# position, few enough that a 0.4M-parameter character-level student learns them all from a few
# thousand teacher-labelled prompts.
POSITIVE_WORDS = """great superb lovely friendly fresh clean cheap perfect warm quiet tasty cozy
bright calm charming cheerful crisp elegant excellent gentle helpful neat polite sunny""".split()
NEGATIVE_WORDS = """awful rude cold dirty slow noisy bland broken stale pricey greasy gloomy
harsh lousy messy moldy musty nasty shabby smelly soggy stuffy tacky dusty""".split()
# ordered noun pairs × (polarity, joiner) × first adjective × last adjective
_SENTIMENT_PROMPTS = len(_NOUNS) * (len(_NOUNS) - 1) * 4 * len(POSITIVE_WORDS) * len(NEGATIVE_WORDS)
SENTIMENT_LABELS = ["positive", "negative"]


def _draw_sentiment(rng: random.Random) -> Example:
    # Two aspects joined by "and" (same polarity) or "but" (opposite): the verdict is the
    # polarity of the last one, as in "the food was great but the staff rude". Every example has
    # one right answer, and a small model has to learn 16 word polarities and where to look.
    first, last = rng.sample(_NOUNS, 2)
    positive = rng.random() < 0.5
    contrast = rng.random() < 0.5
    first_positive = positive != contrast
    a1 = rng.choice(POSITIVE_WORDS if first_positive else NEGATIVE_WORDS)
    a2 = rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)
    joiner = "but" if contrast else "and"
    return f"review: {first} {a1} {joiner} {last} {a2} =", "positive" if positive else "negative"


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "reverse": BuiltinTask(
        name="reverse",
        description="Reverse a 5-10 letter string: `rev kfzeuolq=` -> `qlouezfk`.",
        draw=_draw_reverse,
        scorers=["exact_match", "teacher_agreement"],
    ),
    "date": BuiltinTask(
        name="date",
        description="ISO date to words: `date 2024-03-15=` -> `March 15, 2024`.",
        draw=_draw_date,
        scorers=["exact_match", "teacher_agreement"],
        capacity=_DATE_DAYS + 1,
    ),
    "sentiment": BuiltinTask(
        name="sentiment",
        description="Sentiment of a two-aspect review (`soup cold but view superb`): "
        "positive or negative.",
        draw=_draw_sentiment,
        scorers=["choice", "exact_match", "teacher_agreement"],
        labels=list(SENTIMENT_LABELS),
        capacity=_SENTIMENT_PROMPTS,
        verifier="label",
    ),
}


def builtin_task(name: str) -> BuiltinTask:
    """The built-in task called `name`.

    Raises:
        ConfigError: no such task (the message lists the names there are).
    """
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        from distray.errors import ConfigError

        raise ConfigError(
            f"built-in task `{name}` does not exist; choose one of: {', '.join(BUILTIN_TASKS)}"
        ) from None


SPLITS = ("test", "validation", "train")


def task_rows(name: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Draw the rows of each split in memory (what `make_task` writes).

    Splits are drawn in the order test, validation, train, each from its own seeded stream,
    skipping prompts an earlier split already holds.

    Args:
        name: a built-in task name.
        sizes: rows per split, e.g. {"train": 4000, "validation": 200, "test": 200}.
        seed: the same seed gives the same rows.

    Raises:
        ConfigError: unknown task, or more rows asked for than the task has distinct prompts.
    """
    task = builtin_task(name)
    total = sum(sizes.values())
    if total > task.capacity:
        from distray.errors import ConfigError

        raise ConfigError(
            f"built-in task `{name}` has {task.capacity} distinct prompts, but {total} rows were "
            "asked for; lower --n (or data.builtin.n_train / n_validation / n_test)"
        )
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {}
    for split in [s for s in SPLITS if s in sizes] + [s for s in sizes if s not in SPLITS]:
        # A str seed is hashed with sha512 by `random`, so this is stable across processes.
        rng = random.Random(f"distray:{name}:{split}:{seed}")
        rows: list[dict[str, str]] = []
        while len(rows) < sizes[split]:
            prompt, reference = task.draw(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"id": f"{name}-{split}-{len(rows):06d}", "prompt": prompt, "reference": reference})
        out[split] = rows
    return out


def make_task(
    name: str,
    out_dir: str,
    n: int = 4000,
    seed: int = 0,
    *,
    n_validation: int = 200,
    n_test: int = 200,
) -> dict[str, str]:
    """Write a built-in task's train/validation/test JSONL into `out_dir`.

    Args:
        name: reverse, date or sentiment.
        out_dir: folder to write into (created).
        n: training rows.
        seed: the same seed gives byte-identical files.
        n_validation: validation rows (0 writes no validation file).
        n_test: test rows.

    Returns:
        `{"train": path, "validation": path, "test": path}` for the files written.
    """
    from distray.storage import write_text

    sizes = {"train": n, "validation": n_validation, "test": n_test}
    sizes = {k: v for k, v in sizes.items() if v > 0}
    rows = task_rows(name, sizes, seed)
    paths: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        if split not in rows:
            continue
        path = str(Path(out_dir) / f"{split}.jsonl") if "://" not in out_dir else f"{out_dir.rstrip('/')}/{split}.jsonl"
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[split]))
        paths[split] = path
    return paths
