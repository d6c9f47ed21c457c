"""report.md flags a student that loops or never stops, and shows extra models' retention."""

from __future__ import annotations

import json
from pathlib import Path

from distray.report import build_report, comparison_table


def _metrics(student_rep: float, student_cut: float) -> dict:
    def model(rep: float, cut: float, em: float, nll: float) -> dict:
        return {"scores": {"exact_match": em, "repetition": rep, "max_tokens_hit_pct": cut, "teacher_nll": nll}}

    return {
        "test_rows": 10, "scorers": ["exact_match"], "primary_scorer": "exact_match", "max_tokens": 128,
        "diagnostics": {"scorers": ["repetition"], "repetition_ngram": 4},
        "models": {"teacher": model(4.0, 0.0, 80.0, 0.5), "student": model(student_rep, student_cut, 60.0, 1.0),
                   "kd": model(5.0, 0.0, 72.0, 0.9)},
        "extra_vs_teacher": {"kd": {"accuracy_retention_pct": {"exact_match": 90.0},
                                    "fidelity_change": {"teacher_nll": 0.4}}},
    }


def test_the_table_has_the_repetition_rows_with_the_ratio_to_the_teacher() -> None:
    table = comparison_table(_metrics(30.0, 100.0))
    assert "| Repeated 4-grams in answers (%, lower is better) | 4.0 | 30.0 | 5.0 | ×7.50 the teacher's |" in table
    assert "| Answers cut at max_tokens=128 (%) | 0.0 | 100.0 | 0.0 | – |" in table


def test_a_looping_student_is_flagged_and_a_healthy_one_is_not(tmp_path: Path) -> None:
    (tmp_path / "evaluate").mkdir()
    metrics = tmp_path / "evaluate" / "metrics.json"
    metrics.write_text(json.dumps(_metrics(30.0, 100.0)))
    md = Path(build_report(str(tmp_path))).read_text()
    assert "**Degenerate output:** Student (distilled) (30.0% repeated n-grams vs the teacher's 4.0%, " \
           "100% of answers cut at max_tokens)." in md
    assert "`kd`: keeps 90.0% of the teacher's exact_match, teacher_nll +0.400 nats vs the teacher." in md
    metrics.write_text(json.dumps(_metrics(5.0, 2.0)))
    assert "Degenerate output" not in Path(build_report(str(tmp_path))).read_text()
