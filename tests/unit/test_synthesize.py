"""`distray data synthesize` without Ray: prompts, parsing, dedupe, filters, and the resumable
file logic with the teacher scripted.

    .venv/bin/python -m pytest tests/unit/test_synthesize.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from rouge_score import rouge_scorer

from distray import similarity as sim
from distray import synthesize as S
from distray.errors import DataError, StageError

SEEDS = [
    "Give three tips for staying healthy.",
    "Translate the sentence into French.\n\nThe cat sleeps on the mat.",
    "Is the following number prime? 91",
    "Write a haiku about autumn leaves.",
    "Summarize the paragraph in one sentence.\n\nThe committee met on Tuesday and agreed to raise the budget.",
    "List the planets of the solar system in order from the sun.",
]


def seeds() -> list[S.Seed]:
    return [S.Seed(f"s{i}", t) for i, t in enumerate(SEEDS)]


# ---- prompts -----------------------------------------------------------------------------


def test_prompt_numbers_the_examples_and_asks_for_the_next_task() -> None:
    text = S.build_prompt(["Say hi.", "Count to 3."])
    assert "Task 1:\nSay hi.\n\nTask 2:\nCount to 3." in text
    assert 'starting with "Task 3:"' in text


def test_each_request_draws_its_own_distinct_examples_from_the_seed() -> None:
    pool = seeds()
    a = [S.plan_request(i, pool, 3, seed=0) for i in range(20)]
    assert a == [S.plan_request(i, pool, 3, seed=0) for i in range(20)]  # reproducible
    assert all(len({s.id for s in shown}) == 3 for shown in a)
    assert len({tuple(s.id for s in shown) for shown in a}) > 5  # not one fixed set
    assert a != [S.plan_request(i, pool, 3, seed=1) for i in range(20)]
    assert len(S.plan_request(0, pool[:2], 3, seed=0)) == 2  # fewer seeds than k


# ---- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize("answer, text, ended", [
    ("Task 4: Name two rivers in Asia.", "Name two rivers in Asia.", False),
    ("Task 4:\nName two rivers in Asia.\n\nTask 5: Spell cat.", "Name two rivers in Asia.", True),
    ("**Task 4:** Name two rivers.", "Name two rivers.", False),
    ('"Name two rivers in Asia."', "Name two rivers in Asia.", False),
    ('"Name two rivers in Asia.', "Name two rivers in Asia.", False),
    ('Say "hi" twice.', 'Say "hi" twice.', False),
    ("Name two rivers.\nTask 5. Another", "Name two rivers.", True),
    ("Sure!\n\nTask 4: Name two rivers.", "Sure!", True),
    ("   ", "", False),
    ("Task 4:", "", False),
])
def test_parse_answer_cuts_one_task(answer: str, text: str, ended: bool) -> None:
    assert S.parse_answer(answer) == (text, ended)


# ---- similarity --------------------------------------------------------------------------


def test_rouge_l_is_rouge_scores_on_ascii_text() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    vocab = "the a cat dog sat on mat list three tips write summarize poem".split()
    for _ in range(200):
        a = " ".join(rng.choices(vocab, k=rng.randint(1, 12)))
        b = " ".join(rng.choices(vocab, k=rng.randint(1, 12)))
        want = scorer.score(a, b)["rougeL"].fmeasure
        assert sim.rouge_l(sim.words(a), sim.words(b)) == pytest.approx(want)


def test_index_finds_exact_and_near_duplicates_like_a_full_scan() -> None:
    index = sim.SimilarityIndex(0.7)
    for s in seeds():
        index.add(s.id, s.text)
    assert index.match("give THREE tips, for staying healthy!") == ("exact_duplicate", "s0", 1.0)
    reason, key, score = index.match("Give three good tips for staying healthy.") or ("", "", 0)
    assert (reason, key) == ("near_duplicate", "s0") and score >= 0.7
    assert index.match("Explain how a bicycle gear works.") is None
    # The token-overlap shortcut never hides a pair a full scan would find.
    rng = random.Random(1)
    vocab = "a b c d e f g h".split()
    texts = [" ".join(rng.choices(vocab, k=rng.randint(2, 9))) for _ in range(150)]
    index = sim.SimilarityIndex(0.7)
    for i, t in enumerate(texts[:100]):
        index.add(str(i), t)
    for t in texts[100:]:
        full = max(sim.rouge_l(sim.words(t), sim.words(u)) for u in texts[:100])
        hit = index.match(t)
        assert (hit is not None) == (full >= 0.7)
        if hit is not None and hit[0] == "near_duplicate":
            assert hit[2] == pytest.approx(full)


# ---- filters -----------------------------------------------------------------------------


@pytest.mark.parametrize("text, ended, finish, reason", [
    ("Name two rivers in Asia and say which is longer", False, "length", "truncated"),
    ("", False, "stop", "empty"),
    ("Rivers?", False, "stop", "too_short"),
    (" ".join(["word"] * 301), False, "stop", "too_long"),
    ("Draw a picture of a cat sitting down.", False, "stop", "needs_media"),
    ("Write a new task that involves translation.", False, "stop", "meta_task"),
    ("Write a one-line summary of the above task.", False, "stop", "meta_task"),
    ("Write a conversation based on the given facts:", False, "stop", "missing_input"),
    ("Is the following number prime? 91", False, "stop", "exact_duplicate"),
    ("Is the following number a prime? 91", False, "stop", "near_duplicate"),
    ("Name two rivers in Asia and say which is longer.", True, "length", None),
    ("Name two rivers in Asia and say which is longer.", False, "stop", None),
])
def test_filters_name_the_reason(text: str, ended: bool, finish: str, reason: str | None) -> None:
    index = sim.SimilarityIndex()
    for s in seeds():
        index.add(s.id, s.text)
    got = S.Filters().check(text, ended, finish, index)
    assert (got[0] if got else None) == reason


# ---- the command, with the teacher scripted ------------------------------------------------


def write_seeds(path: Path, form: str = "messages") -> str:
    rows = [
        {"id": f"s{i}", "messages": [{"role": "user", "content": t}], "reference": "x"}
        if form == "messages" else {"id": f"s{i}", "prompt": t}
        for i, t in enumerate(SEEDS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


#: What the scripted teacher writes, by request index (cycled): new tasks, copies, junk.
SCRIPT = [
    "Task 4: Name two rivers in Asia and say which one is longer.",
    "Task 4: Give three tips for staying healthy.",  # a seed, again
    "Task 4: Name two rivers in Asia and say which is longer.",  # near the first
    "ok",
    "Task 4: Explain why the sky looks blue at noon.\nTask 5: more",
    "Task 4: Describe how a bicycle gear changes the effort of pedaling.",
    "Task 4: Plot the monthly rainfall of Paris as a bar chart.",
    "Task 4: Convert 5 miles into kilometers and show the steps.",
]


class Scripted:
    """Stands in for `Synthesizer.ask`: answers from SCRIPT, counting what was asked."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.asked: list[int] = []
        self.fail_at = fail_at

    def __call__(self, syn: S.Synthesizer, first: int, count: int) -> list[dict[str, Any]]:
        out = []
        for i in range(first, first + count):
            self.asked.append(i)
            failed = i == self.fail_at
            out.append({
                "input_id": syn.request(i)[0],
                "response": None if failed else SCRIPT[i % len(SCRIPT)],
                "finish_reason": None if failed else "stop",
                "error": "request_failed: HTTP 503" if failed else None,
            })
        return out


def use_teacher(monkeypatch: pytest.MonkeyPatch, teacher: Scripted) -> None:
    monkeypatch.setattr(S.Synthesizer, "ask", lambda syn, first, count: teacher(syn, first, count))


@pytest.fixture
def cfg() -> Any:
    from distray.config import config_from_dict

    return config_from_dict({"teacher": {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1"}})


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_kept_rows_are_valid_input_and_each_request_is_kept_or_rejected(
    cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distray.inputs import check_input

    teacher = Scripted()
    use_teacher(monkeypatch, teacher)
    out = tmp_path / "new.jsonl"
    res = S.run(cfg, write_seeds(tmp_path / "seeds.jsonl"), str(out), 4)

    kept, rejects = lines(out), lines(tmp_path / "new.rejects.jsonl")
    assert res.kept == len(kept) == 4
    assert [r["messages"] for r in kept] == [[{"role": "user", "content": t}] for t in (
        "Name two rivers in Asia and say which one is longer.",
        "Explain why the sky looks blue at noon.",
        "Describe how a bicycle gear changes the effort of pedaling.",
        "Convert 5 miles into kilometers and show the steps.",
    )]
    assert res.reasons == {"exact_duplicate": 1, "near_duplicate": 1, "too_short": 1, "needs_media": 1}
    requests = sorted([r["synth"]["request"] for r in kept] + [json.loads(r["row"])["request"] for r in rejects])
    assert requests == list(range(res.requests)) == list(range(8))  # each request once, in order
    assert all(r["stage"] == "synthesize" for r in rejects)
    check = check_input(str(out))
    assert (check.valid, check.rejected) == (4, 0)
    assert len({r["id"] for r in kept}) == 4 and all(r["id"].startswith("synth-") for r in kept)


def test_rerun_is_idempotent_and_a_larger_n_resumes(
    cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = Scripted()
    use_teacher(monkeypatch, teacher)
    seed_file, out = write_seeds(tmp_path / "seeds.jsonl", form="prompt"), tmp_path / "new.jsonl"
    first = S.run(cfg, seed_file, str(out), 2)
    before = (out.read_bytes(), (tmp_path / "new.rejects.jsonl").read_bytes())
    assert all(set(r) == {"id", "prompt", "synth"} for r in lines(out))  # the seeds' form
    asked = len(teacher.asked)

    again = S.run(cfg, seed_file, str(out), 2)
    assert len(teacher.asked) == asked and again.new_requests == 0
    assert (out.read_bytes(), (tmp_path / "new.rejects.jsonl").read_bytes()) == before

    more = S.run(cfg, seed_file, str(out), 4)
    assert more.kept == 4 and lines(out)[:2] == [json.loads(x) for x in before[0].decode().splitlines()]
    assert min(teacher.asked[asked:]) == first.requests  # only new requests were sent


def test_other_settings_are_refused_not_mixed(cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_teacher(monkeypatch, Scripted())
    seed_file, out = write_seeds(tmp_path / "seeds.jsonl"), tmp_path / "new.jsonl"
    S.run(cfg, seed_file, str(out), 3)
    with pytest.raises(DataError, match=r"other settings.*another --out"):
        S.run(cfg, seed_file, str(out), 3, examples_per_prompt=2)
    with pytest.raises(DataError, match="other settings"):
        S.run(cfg, seed_file, str(out), 3, temperature=1.0)


def test_a_transient_failure_saves_the_requests_before_it(
    cfg: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_teacher(monkeypatch, Scripted(fail_at=4))
    seed_file, out = write_seeds(tmp_path / "seeds.jsonl"), tmp_path / "new.jsonl"
    with pytest.raises(StageError, match="request 4.*rerun the same command"):
        S.run(cfg, seed_file, str(out), 4)
    assert len(lines(out)) + len(lines(tmp_path / "new.rejects.jsonl")) == 4
    teacher = Scripted()
    use_teacher(monkeypatch, teacher)
    res = S.run(cfg, seed_file, str(out), 4)
    assert res.kept == 4 and teacher.asked[0] == 4


def test_seed_file_without_valid_rows_is_a_data_error(cfg: Any, tmp_path: Path) -> None:
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match="no valid input row"):
        S.run(cfg, str(bad), str(tmp_path / "o.jsonl"), 2)


def test_cli_prints_counts_per_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from distray import cli

    use_teacher(monkeypatch, Scripted())
    config = tmp_path / "c.yaml"
    config.write_text('teacher: {kind: openai, model: m, base_url: "http://127.0.0.1:9/v1"}\n')
    argv = ["data", "synthesize", "--config", str(config), "--seeds", write_seeds(tmp_path / "s.jsonl"),
            "--n", "4", "--out", str(tmp_path / "new.jsonl")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "synthesize ok" in out and "4 kept of 4 wanted, 4 rejected, of 8 requests filed" in out
    for reason in ("exact_duplicate", "near_duplicate", "too_short", "needs_media"):
        assert reason in out
    assert cli.main([*argv[:-4], "--n", "0", "--out", "x"]) == 2  # a usage error


def test_an_out_file_it_did_not_write_is_refused(cfg: Any, tmp_path: Path) -> None:
    out = tmp_path / "mine.jsonl"
    out.write_text('{"prompt": "my own data"}\n')
    with pytest.raises(DataError, match="did not write.*another --out"):
        S.run(cfg, write_seeds(tmp_path / "s.jsonl"), str(out), 2)
    assert out.read_text() == '{"prompt": "my own data"}\n'
