"""On-policy vs off-policy KD at equal optimizer steps and at equal teacher-scored tokens.

    .venv/bin/python -m distray.onpolicy.compare --config jobs/configs/quickstart.yaml \
        --rounds 3 --steps-per-round 40 --prompts-per-round 640

1. `generate` for the config's run (the quickstart builds its stand-in teacher first);
2. on-policy: `rounds × steps_per_round` steps in a sibling run `<name>-onpolicy` (generate's
   data copied in, for the off-policy share of the mix);
3. off-policy KD, the same number of steps, on all of generate's data (equal steps);
4. off-policy KD, the same steps, on only as many teacher-data rows as hold the teacher tokens the
   on-policy run used, scored and mixed (equal teacher tokens); with `--off-policy-alpha A`,
   also off-policy KD at equal steps with `train.alpha` A (the rounds train with α 1);
5. the three students (and the initial one) on the same eval prompts: reverse KL on their own
   samples, teacher NLL and exact match of their greedy answers.

Writes `<run>-onpolicy/onpolicy/compare.json` and prints one line per student.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from typing import Any

from distray.config import DistrayConfig, deep_merge

__all__ = ["add_cli_args", "main"]

logger = logging.getLogger(__name__)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-per-round", type=int, default=40)
    parser.add_argument("--prompts-per-round", type=int, default=640)
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument(
        "--off-policy-alpha", type=float, default=None,
        help="also train off-policy KD at equal steps with this train.alpha (1: the logit loss "
        "alone, as the rounds train)",
    )


def _with(cfg: DistrayConfig, over: dict[str, Any]) -> DistrayConfig:
    return DistrayConfig.model_validate(deep_merge(cfg.model_dump(mode="json"), over))


def _tokens_rows(folder: str, tokens: int) -> int:
    """How many of generate's rows (in file order) hold `tokens` answer tokens."""
    import pyarrow.dataset as pads

    lengths = pads.dataset(folder, format="parquet").to_table(columns=["completion_tokens"])
    total = 0
    for i, n in enumerate(lengths.column(0).to_pylist(), 1):
        total += int(n or 0)
        if total >= tokens:
            return i
    return lengths.num_rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    from distray.config import load_config
    from distray.onpolicy.rounds import OnPolicyRun
    from distray.onpolicy.rounds import run as onpolicy_run
    from distray.paths import RunPaths
    from distray.pipeline import run_stage
    from distray.prepare import prepare
    from distray.train.datasets import teacher_splits
    from distray.train.trainer import train_model

    base = load_config(args.config)
    run_stage(base, "generate")
    base = prepare(base)
    steps = args.rounds * args.steps_per_round
    on = _with(base, {
        "run": {"name": f"{base.run.name}-onpolicy"},
        "train": {"mode": "on_policy", "on_policy": {
            "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "prompts_per_round": args.prompts_per_round, "lmbda": args.lmbda,
            "eval_prompts": args.eval_prompts, "sampling": {"temperature": 1.0,
            "max_tokens": base.generate.sampling.max_tokens}}},
    })
    src, dest = RunPaths(base.run_dir).generate, RunPaths(on.run_dir).generate
    shutil.copytree(src, dest, dirs_exist_ok=True)
    on_result = onpolicy_run(on)
    points = json.loads(open(f"{on.run_dir}/onpolicy/metrics.json").read())["rounds"]
    teacher_tokens = sum(int(p.get("on_policy_tokens", 0)) + int(p.get("off_policy_tokens", 0)) for p in points)

    train_dir, validation = teacher_splits(RunPaths(base.run_dir))
    off_cfg = _with(base, {"train": {"max_steps": steps}})
    n_rows = _tokens_rows(train_dir, teacher_tokens)
    students = {"initial": on.student.model if on.student else "", "on_policy": on_result.student_dir}
    arms: list[tuple[str, DistrayConfig, int | None]] = [
        ("off_policy_equal_steps", off_cfg, None), ("off_policy_equal_tokens", off_cfg, n_rows)]
    if args.off_policy_alpha is not None:
        a = args.off_policy_alpha
        arms.append((f"off_policy_equal_steps_alpha{a:g}", _with(off_cfg, {"train": {"alpha": a}}), None))
    for name, arm_cfg, rows in arms:
        res = train_model(arm_cfg, train_dir, f"{on.run_dir}/compare/{name}", validation_data=validation,
                          max_rows=rows)
        students[name] = res.student_dir
    judge = OnPolicyRun(on)
    table = {}
    for name, folder in students.items():
        table[name] = judge.evaluate(folder, f"{on.run_dir}/compare/eval-{name}")
        logger.info("%s: %s", name, {k: table[name].get(k) for k in ("reverse_kl", "teacher_nll", "greedy_exact_match")})
    out = {"steps": steps, "teacher_tokens_on_policy": teacher_tokens, "off_policy_rows_equal_tokens": n_rows,
           "students": table, "rounds": points}
    with open(f"{on.run_dir}/onpolicy/compare.json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    for name, m in table.items():
        print(f"{name:26s} reverse_kl {m.get('reverse_kl', float('nan')):.4f} | teacher_nll "
              f"{m.get('teacher_nll', float('nan')):.4f} | greedy exact {m.get('greedy_exact_match', float('nan')):.3f}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s | %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    main(parser.parse_args())
