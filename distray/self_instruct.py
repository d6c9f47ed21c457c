"""The self-instruct seed tasks as distray input rows, with a fixed held-out split.

    python -m distray.self_instruct ../shared/data/self-instruct/seed_tasks.jsonl examples/data/self-instruct

`seed_tasks.jsonl` (yizhongw/self-instruct, Apache-2.0) holds 175 human-written tasks, one line
each: `{"id": "seed_task_1", "instruction": "...", "instances": [{"input": "...", "output": "..."}],
...}`. Each instance becomes one input row (`distray.formats`): the user turn is the instruction,
then the instance input after a blank line when it is not empty; the instance output is the
human `reference`:

| id | messages | reference |
|---|---|---|
| seed_task_0 | [{role: user, content: "Is there anything I can eat for a breakfast ..."}] | "Yes, you can have ..." |
| seed_task_1 | [{role: user, content: "What is the relation between the given pairs?\\n\\nNight : Day :: Right : Left"}] | "The relation ..." |
| seed_task_2 | [{role: user, content: "Generate a one-sentence description ...\\n\\n- Brack Obama\\n..."}] | "- Barack Hussein Obama II ..." |

The split is by a hash of the task id, not by file order, so it does not change when rows are
added or reordered: the `n_test` tasks with the smallest sha256(id) are held out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from distray.errors import DataError

__all__ = ["N_TEST", "seed_task_rows", "split_rows", "convert"]

#: Tasks held out for evaluation (20 % of the 175).
N_TEST = 35


def seed_task_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read `seed_tasks.jsonl` into input rows, one per instance (see the module docstring).

    Raises:
        DataError: the file is missing, or a line lacks `instruction`/`instances`.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"self-instruct seed tasks `{p}` not found; get data/seed_tasks.jsonl from "
            "github.com/yizhongw/self-instruct (Apache-2.0), or use the converted copy in "
            "examples/data/self-instruct/"
        )
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        task = json.loads(line)
        missing = [k for k in ("id", "instruction", "instances") if k not in task]
        if missing:
            raise DataError(f"{p}:{n}: a seed task needs {missing}; it has {sorted(task)}")
        for j, inst in enumerate(task["instances"]):
            text = task["instruction"].strip()
            if (inst.get("input") or "").strip():
                text += "\n\n" + inst["input"].strip()
            rows.append({
                "id": task["id"] if len(task["instances"]) == 1 else f"{task['id']}-{j}",
                "messages": [{"role": "user", "content": text}],
                "reference": inst.get("output"),
            })
    return rows


def _key(row: dict[str, Any]) -> str:
    return hashlib.sha256(str(row["id"]).encode()).hexdigest()


def split_rows(rows: list[dict[str, Any]], n_test: int = N_TEST) -> dict[str, list[dict[str, Any]]]:
    """`{"train": [...], "test": [...]}`: the `n_test` rows with the smallest sha256(id) are the
    test split; each split keeps the input order."""
    held = {id(r) for r in sorted(rows, key=_key)[:n_test]}
    return {"train": [r for r in rows if id(r) not in held],
            "test": [r for r in rows if id(r) in held]}


def convert(src: str | Path, out_dir: str | Path, n_test: int = N_TEST) -> dict[str, str]:
    """Write `train.jsonl` and `test.jsonl` into `out_dir`; returns split → path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in split_rows(seed_task_rows(src), n_test).items():
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[split] = str(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="seed_tasks.jsonl")
    p.add_argument("out_dir", help="folder for train.jsonl and test.jsonl")
    p.add_argument("--n-test", type=int, default=N_TEST, help="tasks held out for evaluation")
    args = p.parse_args(argv)
    for split, path in convert(args.src, args.out_dir, args.n_test).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
