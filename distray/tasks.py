"""Task-type presets (nli, conversation, qa, math, summarization) and built-in synthetic tasks.

    distray data make-task reverse --out data/reverse --n 4000

A preset is a dict of config defaults laid underneath what the user wrote, so every value it
sets can be overridden.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset_defaults"]

PRESETS: dict[str, dict[str, Any]] = {
    "custom": {},
    "nli": {
        "task": {
            "system_prompt": "Classify the relation between the premise and the hypothesis. "
            "Answer with one label only.",
            "labels": ["entailment", "neutral", "contradiction"],
        },
        "generate": {"filters": {"verifier": "label"}},
        "evaluate": {"scorers": ["choice", "exact_match"]},
    },
    "conversation": {
        "task": {"system_prompt": "You are a helpful assistant."},
        "evaluate": {"scorers": ["bleu", "rouge_l", "teacher_agreement"]},
    },
    "qa": {
        "task": {"system_prompt": "Answer the question concisely."},
        "generate": {"filters": {"drop_empty": True}},
        "evaluate": {"scorers": ["exact_match", "f1"]},
    },
    "math": {
        "task": {
            "system_prompt": "Solve the problem. End with the final numeric answer.",
        },
        "generate": {"filters": {"verifier": "numeric"}},
        "evaluate": {"scorers": ["numeric"]},
    },
    "summarization": {
        "task": {"system_prompt": "Summarise the text in a few sentences."},
        "evaluate": {"scorers": ["rouge_l", "bleu"]},
    },
}


def preset_defaults(task_type: str) -> dict[str, Any]:
    """The config defaults of a task type ({} for custom or an unknown name, which the
    config's own validation then reports)."""
    import copy

    return copy.deepcopy(PRESETS.get(task_type, {}))
