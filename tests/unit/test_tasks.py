"""Task-type presets and the built-in synthetic tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distray.config import config_from_dict
from distray.errors import ConfigError
from distray.tasks import (
    BUILTIN_TASKS,
    COT_INSTRUCTION,
    PRESETS,
    builtin_task,
    make_task,
    preset_defaults,
    task_prompts,
    task_rows,
)


@pytest.mark.parametrize("task_type", sorted(PRESETS))
def test_every_preset_builds_a_valid_config(task_type: str) -> None:
    cfg = config_from_dict({"task": {"type": task_type}})
    assert cfg.task.type == task_type
    system, template = task_prompts(cfg.task)
    assert "{prompt}" in template
    if task_type != "custom":
        assert system
        assert cfg.evaluate.scorers


def test_preset_only_sets_defaults_user_values_win() -> None:
    cfg = config_from_dict(
        {
            "task": {"type": "math", "system_prompt": "Mine."},
            "evaluate": {"scorers": ["exact_match"]},
            "generate": {"filters": {"verifier": "none"}},
        }
    )
    assert cfg.task.system_prompt == "Mine."
    assert cfg.evaluate.scorers == ["exact_match"]
    assert cfg.generate.filters.verifier == "none"
    # and what the user did not set still comes from the preset
    assert cfg.generate.filters.drop_empty is True


def test_preset_defaults_is_a_copy() -> None:
    d = preset_defaults("nli")
    d["task"]["labels"].append("x")
    assert "x" not in PRESETS["nli"]["task"]["labels"]
    assert preset_defaults("no-such-type") == {}


def test_chain_of_thought_appends_the_instruction_and_labels_fill_in() -> None:
    cfg = config_from_dict({"task": {"type": "math", "chain_of_thought": True}})
    system, _ = task_prompts(cfg.task)
    assert system is not None and system.endswith(COT_INSTRUCTION)
    cfg = config_from_dict(
        {"task": {"system_prompt": "Pick one of {labels}.", "labels": ["yes", "no"], "chain_of_thought": True}}
    )
    system, _ = task_prompts(cfg.task)
    assert system is not None and system.startswith("Pick one of yes, no.")
    cfg = config_from_dict({"task": {"chain_of_thought": True}})
    assert task_prompts(cfg.task)[0] == COT_INSTRUCTION


def test_builtin_names_match_the_config() -> None:
    from distray.config import BuiltinTaskData

    names = set(BuiltinTaskData.model_fields["name"].annotation.__args__)
    assert names == set(BUILTIN_TASKS)


def test_reverse_and_date_and_sentiment_rows_are_correct() -> None:
    rows = task_rows("reverse", {"test": 50}, seed=3)["test"]
    for r in rows:
        word = r["prompt"].removeprefix("rev ").removesuffix("=")
        assert 5 <= len(word) <= 10 and word.isalpha()
        assert r["reference"] == word[::-1]
    import datetime as dt

    for r in task_rows("date", {"test": 50}, seed=3)["test"]:
        iso = r["prompt"].removeprefix("date ").removesuffix("=")
        d = dt.date.fromisoformat(iso)
        assert r["reference"] == d.strftime("%B ") + f"{d.day}, {d.year}"
    from distray.tasks import NEGATIVE_WORDS, POSITIVE_WORDS

    labels = builtin_task("sentiment").labels
    seen = set()
    for r in task_rows("sentiment", {"test": 200}, seed=3)["test"]:
        words = r["prompt"].removeprefix("review: ").removesuffix(" =").split()
        first, joiner, last = words[1], words[2], words[4]
        assert joiner in ("and", "but")
        # the verdict is the last aspect's; "but" joins opposite polarities, "and" equal ones
        assert r["reference"] == ("positive" if last in POSITIVE_WORDS else "negative")
        assert (first in POSITIVE_WORDS) == (last in POSITIVE_WORDS) or joiner == "but"
        assert (first in POSITIVE_WORDS) != (last in POSITIVE_WORDS) or joiner == "and"
        assert first in POSITIVE_WORDS + NEGATIVE_WORDS
        seen.add(r["reference"])
    assert seen == set(labels)  # both classes show up


def test_make_task_is_deterministic_and_splits_are_disjoint(tmp_path: Path) -> None:
    a = make_task("reverse", str(tmp_path / "a"), 300, 7, n_validation=20, n_test=30)
    b = make_task("reverse", str(tmp_path / "b"), 300, 7, n_validation=20, n_test=30)
    c = make_task("reverse", str(tmp_path / "c"), 300, 8, n_validation=20, n_test=30)
    assert set(a) == {"train", "validation", "test"}
    for split in a:
        assert Path(a[split]).read_bytes() == Path(b[split]).read_bytes()
    assert Path(a["test"]).read_bytes() != Path(c["test"]).read_bytes()
    rows = {s: [json.loads(x) for x in Path(p).read_text().splitlines()] for s, p in a.items()}
    assert [len(rows[s]) for s in ("train", "validation", "test")] == [300, 20, 30]
    assert set(rows["train"][0]) == {"id", "prompt", "reference"}
    prompts = [{r["prompt"] for r in rows[s]} for s in rows]
    assert sum(len(p) for p in prompts) == len(set().union(*prompts))


def test_test_split_does_not_change_with_training_size(tmp_path: Path) -> None:
    small = make_task("date", str(tmp_path / "s"), 10, 0, n_test=25)
    big = make_task("date", str(tmp_path / "b"), 500, 0, n_test=25)
    assert Path(small["test"]).read_text() == Path(big["test"]).read_text()


def test_make_task_rows_pass_the_input_contract(tmp_path: Path) -> None:
    from distray.inputs import iter_input_rows

    paths = make_task("sentiment", str(tmp_path), 40, 0, n_validation=0, n_test=10)
    assert "validation" not in paths
    for split, p in paths.items():
        results = list(iter_input_rows(p))
        assert all(rej is None for _, rej in results), split
        assert all(row["reference"] for row, _ in results)


def test_unknown_task_and_too_many_rows_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reverse, date, sentiment"):
        make_task("addition", str(tmp_path), 10, 0)
    with pytest.raises(ConfigError, match="distinct prompts"):
        task_rows("date", {"train": 10**6}, 0)


def test_the_chain_of_thought_answer_line_is_what_the_extractors_read() -> None:
    """An output that follows COT_INSTRUCTION's last-line format is scored on that line."""
    import re

    from distray.answers import extract_choice, final_answer

    line = re.search(r"'(.*<answer>.*)'", COT_INSTRUCTION).group(1)
    output = "Neutral? No: the premise says it outright.\n" + line.replace("<answer>", "entailment")
    assert final_answer(output) == "entailment"
    assert extract_choice(final_answer(output), ["entailment", "neutral"]) == "entailment"
