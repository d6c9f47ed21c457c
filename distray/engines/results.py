"""What an engine leaves on a row that got no answer, and the rejects record made from it.

    python -c "from distray.engines.results import reject_row; help(reject_row)"

Every stage that asks an engine (generate, evaluate, on-policy rollouts and scoring) marks a
failed row the same way, in the `error` column (`code: detail`, null when it went well), and
writes a row it gives up on as one REJECT_SCHEMA record:

    {"id": "r-1f..", "input_id": "q-7", "source": "prompts.jsonl", "line": 12,
     "stage": "teacher", "reason": "prompt_too_long: 900 tokens > ...", "row": "{...}"}
"""

from __future__ import annotations

import json
from typing import Any

from distray import formats as F

__all__ = ["ERROR", "reject_row"]

#: Extra column beside TEACHER_DATA_SCHEMA while rows are in flight: why the row failed
#: (`code: detail`), or null. Rows with an error end in rejects/.
ERROR = "error"


def _json_text(row: dict[str, Any]) -> str:
    """The row as JSON text any UTF-8 writer takes (escaped when it holds a lone surrogate)."""
    text = json.dumps(row, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(row, ensure_ascii=True, default=str)
    return text


def reject_row(row: dict[str, Any], stage: str, reason: str, detail: str) -> dict[str, Any]:
    """A rejects-file record (REJECT_SCHEMA) for a row that failed `stage`."""
    keep = {k: v for k, v in row.items() if not k.startswith("_") and k != ERROR}
    return {
        F.ID: row.get(F.ID),
        F.INPUT_ID: row.get(F.INPUT_ID),
        "source": row.get("_source"),
        "line": row.get("_line"),
        "stage": stage,
        "reason": f"{reason}: {detail}" if detail else reason,
        "row": _json_text(keep)[:10_000],
    }
