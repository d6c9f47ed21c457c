"""On-policy distillation end to end on tiny models: real Ray, vLLM engines and DeepSpeed.

    .venv/bin/python -m pytest tests/integration/test_onpolicy_rounds.py -x -q

One run of `distray train` with `train.mode: on_policy` (one round, then the final eval) is
SIGKILLed after its rollouts, part of them is then taken away, and the rerun must:
- generate only the missing rollouts and score only the unscored rows (no repeated work);
- finish the round (mix, Ray Train × DeepSpeed, export) and publish the student;
- store teacher top-k that match a transformers forward pass of the teacher over the same ids.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distray import formats as F

pytestmark = pytest.mark.integration

K = 4
ENGINE = {"max_model_len": 128, "enforce_eager": True, "dtype": "float32"}


def _prompts(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            w = "".join(rng.choice("abcd") for _ in range(rng.randint(3, 5)))
            f.write(json.dumps({"id": f"{path.stem}-{i}", "prompt": f"rev {w}", "reference": w[::-1]}) + "\n")
    return str(path)


def _teacher_forward(teacher_dir: str, messages: list[dict[str, str]], answer: list[int]) -> Any:
    """log_softmax of the teacher at each answer position (prompt rendered as the engines do)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distray.prompts import load_tokenizer, render_prompt

    _, prompt_ids = render_prompt(load_tokenizer(teacher_dir), messages, True)
    ids = prompt_ids + answer
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[len(prompt_ids) - 1 : len(ids) - 1], dim=-1)


def _off_policy_data(run_dir: Path, prompts: Path, teacher_dir: str, n: int) -> None:
    """generate's teacher data for the off-policy share (answers: the references)."""
    from distray.prompts import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    rows = []
    for i, line in enumerate(prompts.read_text().splitlines()[:n]):
        r = json.loads(line)
        msgs = [{"role": "user", "content": r["prompt"]}]
        answer = tok(r["reference"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        lp = _teacher_forward(teacher_dir, msgs, answer)
        top_lp, top_ids = lp.topk(K, -1)
        rows.append({
            F.ID: f"gen-{i}", F.INPUT_ID: r["id"], F.MESSAGES: msgs, F.PROMPT: r["prompt"],
            F.REFERENCE: r["reference"], F.RESPONSE: r["reference"], F.RESPONSE_TOKEN_IDS: answer,
            F.TOPK_TOKEN_IDS: top_ids.tolist(), F.TOPK_LOGPROBS: top_lp.tolist(), F.FINISH_REASON: "stop",
            F.PROMPT_TOKENS: 10, F.COMPLETION_TOKENS: len(answer), F.TEACHER: "tiny-teacher", F.SAMPLE_INDEX: 0,
        })
    out = run_dir / "generate/data/train"
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=F.TEACHER_DATA_SCHEMA), out / "part-0.parquet")


def _rows(folder: str) -> list[dict[str, Any]]:
    files = sorted(Path(folder).glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@pytest.mark.timeout(1800)  # ~4 min on 2 idle cores; engines start slowly on a loaded machine
def test_a_killed_round_resumes_without_repeated_work(
    ray_cluster, tmp_path, tiny_model, tiny_teacher_model
) -> None:
    from distray.config import config_from_dict, dump_config
    from distray.onpolicy.layout import EVAL_GREEDY, EVAL_SAMPLE, TRAIN, OnPolicyPaths

    cfg = config_from_dict({
        "run": {"name": "op", "output_dir": str(tmp_path / "runs")},
        "data": {"train": _prompts(tmp_path / "train.jsonl", 24, 0),
                 "validation": _prompts(tmp_path / "validation.jsonl", 6, 1)},
        "teacher": {"kind": "vllm", "name": "tiny-teacher", "model": tiny_teacher_model,
                    "engine_kwargs": ENGINE, "batch_size": 4},
        "student": {"model": tiny_model},
        "generate": {"logprobs": K, "rows_per_shard": 4, "splits": ["train"]},
        "train": {
            "mode": "on_policy", "loss": "kd", "alpha": 0.9, "lr": 1e-3, "num_workers": 1,
            "zero_stage": 1, "micro_batch_size": 4, "max_seq_len": 64, "log_every_steps": 1,
            "report_every_steps": 10,
            "on_policy": {"rounds": 1, "prompts_per_round": 8, "eval_prompts": 2, "lmbda": 0.5,
                          "steps_per_round": 2, "schedule": "turns", "engine_kwargs": ENGINE,
                          "batch_size": 4, "sampling": {"temperature": 1.0, "max_tokens": 8}},
        },
        "resources": {"num_cpus": 4},
    })
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    _off_policy_data(run_dir, tmp_path / "train.jsonl", tiny_teacher_model, 8)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(dump_config(cfg))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "distray", "train", "--config", str(cfg_path)]
    rp = OnPolicyPaths(cfg.run_dir).round(0)

    # 1. Killed once the rollouts are written (the teacher's engine is starting to score them).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not Path(rp.done("rollouts")).exists():
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # let Ray reap the dead driver's engines
    rollouts = _rows(rp.rollouts)
    purposes = sorted(r["purpose"] for r in rollouts)
    assert purposes == sorted([TRAIN] * 8 + [EVAL_SAMPLE] * 2 + [EVAL_GREEDY] * 2)
    # A kill mid-phase: the marker and one shard never made it to disk.
    shards = sorted(Path(rp.rollouts).glob("*.parquet"))
    lost = pq.read_table(shards[0]).num_rows
    shards[0].unlink()
    Path(rp.done("rollouts")).unlink()
    kept = {s.name: s.stat().st_mtime_ns for s in shards[1:]}
    scored_before = {r["id"] for r in _rows(rp.scored)}

    # 2. The rerun finishes the round.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    marker = json.loads(Path(rp.done("rollouts")).read_text())
    assert marker["rollout_requests"] == lost, "finished rollouts were generated again"
    assert {s.name: s.stat().st_mtime_ns for s in shards[1:] if s.exists()} == kept
    scored = _rows(rp.scored)
    ids = [r["id"] for r in scored]
    assert len(ids) == len(set(ids)) == 12, "a rollout was scored twice, or not at all"
    scoring = json.loads(Path(rp.done("scoring")).read_text())
    assert scoring["scored_rows"] == 12 - len(scored_before)

    # The scores are the teacher's, over exactly the student's tokens.
    for row in scored[:4]:
        lp = _teacher_forward(tiny_teacher_model, row["messages"], row["response_token_ids"])
        top_lp, _ = lp.topk(K, -1)
        assert len(row["topk_logprobs"]) == len(row["response_token_ids"]) == lp.shape[0]
        flat = [v for pos in row["topk_logprobs"] for v in pos]
        assert [v for pos in top_lp.tolist() for v in pos] == pytest.approx(flat, abs=2e-3)
        for j, (ids_j, lps_j) in enumerate(zip(row["topk_token_ids"], row["topk_logprobs"], strict=True)):
            assert [float(lp[j, t]) for t in ids_j] == pytest.approx(lps_j, abs=2e-3)
        own = [float(lp[j, t]) for j, t in enumerate(row["response_token_ids"])]
        assert own == pytest.approx(row["teacher_token_logprobs"], abs=2e-3)

    # Mixed data trained, the student published, figures per round.
    mix = json.loads(Path(rp.done("mix")).read_text())
    assert mix["on_policy_rows"] == 8 and mix["off_policy_rows"] == 8
    train = json.loads(Path(rp.done("train")).read_text())
    assert train["steps"] == 2
    student = run_dir / "train/student"
    assert (student / "_distray_export.json").exists() and (student / "model.safetensors").exists()
    points = json.loads(Path(OnPolicyPaths(cfg.run_dir).metrics).read_text())["rounds"]
    assert [p["round"] for p in points] == [0, 1]
    for p in points:
        assert p["reverse_kl"] == p["reverse_kl"] and p["teacher_nll"] > 0  # not NaN
    assert points[0]["rollouts_s"] > 0 and points[0]["train_s"] > 0
    assert Path(OnPolicyPaths(cfg.run_dir).plot).stat().st_size > 0
    assert "rollouts" in done.stderr and "on-policy done" in done.stderr
