"""`make example` = `python jobs/example.py --config jobs/configs/smollm2-135m_to_pruned_kd.yaml`

The real-checkpoint example: the teacher labels the training prompts once, then the pruned
student is trained under each arm's loss (same weights, rows, order and steps) and every arm is
scored against the teacher on held-out prompts; one report.md with the arms side by side
(`distray.arms`). Also a `ray job submit` entrypoint:

    ray job submit --working-dir . -- python jobs/example.py --config jobs/configs/X.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from _entry import _ROOT  # noqa: F401 - makes distray importable from a job's working dir

DEFAULT_CONFIG = "jobs/configs/smollm2-135m_to_pruned_kd.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distray example", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"config YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--arms", default="pruned,sft,kd,reverse_kl",
                   help="comma-separated, in table order: pruned, sft, kd, reverse_kl, jsd")
    p.add_argument("--force", action="store_true", help="retrain and re-evaluate every arm")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.temperature=2.0")
    args = p.parse_args(argv)
    if not Path(args.config).is_file():
        p.error(f"--config {args.config} does not exist")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s | %(message)s",
                        datefmt="%H:%M:%S")
    from distray import arms
    from distray.config import load_config
    from distray.errors import DistrayError

    try:
        res = arms.run(load_config(args.config, args.overrides), args.arms.split(","), force=args.force)
    except DistrayError as e:
        print(f"distray example: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(Path(res.report_path).read_text())
    print(f"example ok in {res.seconds['total']:.0f} s | report {res.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
