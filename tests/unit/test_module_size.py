"""No module in distray/ over 600 lines: past that a module is doing more than one job.

    .venv/bin/python -m pytest tests/unit/test_module_size.py -q
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distray"
MAX_LINES = 600


def test_no_module_over_600_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 50, "the scan found too few modules"
    over = {path: n for path, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by responsibility): {over}"
