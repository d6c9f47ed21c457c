"""Ray Train × DeepSpeed on 2 CPU workers: loss goes down and the export reloads with the same loss
under ZeRO-1, 2 and 3; a killed worker resumes from its checkpoint; a killed driver (`distray
train`) resumes exactly where its checkpoint left off; a rerun resumes; early stopping exports the
best checkpoint; a row two shards hold trains once; a vocabulary mismatch fails early.

    .venv/bin/python -m pytest tests/integration/test_train.py -x -q
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distray import formats as F
from distray.config import DistrayConfig
from distray.errors import DataError

pytestmark = pytest.mark.integration

K = 4


def _reverse_rows(n: int, seed: int, letters: str = "abcd") -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 5)))
        out.append((f"rev {w}", w[::-1]))
    return out


def write_teacher_data(out_dir: Path, teacher_dir: str, n: int, seed: int = 0, letters: str = "abcd") -> Path:
    """Teacher data in TEACHER_DATA_SCHEMA for a reversal task, top-k from a HF teacher forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    rows = []
    for i, (prompt, answer) in enumerate(_reverse_rows(n, seed, letters)):
        msgs = [{"role": "user", "content": prompt}]
        p_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
        r_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([p_ids + r_ids])).logits[0]
        lp = torch.log_softmax(logits[len(p_ids) - 1 : len(p_ids) + len(r_ids) - 1], -1)
        top_lp, top_ids = lp.topk(K, -1)
        rows.append(
            {
                F.ID: f"row-{seed}-{i}",
                F.INPUT_ID: f"in-{i}",
                F.MESSAGES: msgs,
                F.PROMPT: prompt,
                F.REFERENCE: answer,
                F.RESPONSE: answer,
                F.RESPONSE_TOKEN_IDS: r_ids,
                F.TOPK_TOKEN_IDS: top_ids.tolist(),
                F.TOPK_LOGPROBS: top_lp.tolist(),
                F.FINISH_REASON: "stop",
                F.PROMPT_TOKENS: len(p_ids),
                F.COMPLETION_TOKENS: len(r_ids),
                F.TEACHER: "tiny-teacher",
                F.SAMPLE_INDEX: 0,
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    for j, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=F.TEACHER_DATA_SCHEMA), out_dir / f"part-{j}.parquet")
    return out_dir


@pytest.fixture(scope="module")
def teacher_data(tmp_path_factory, tiny_teacher_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teacher-data")
    return {
        "train": write_teacher_data(root / "train", tiny_teacher_model, 96, seed=0),
        "validation": write_teacher_data(root / "validation", tiny_teacher_model, 16, seed=1),
    }


def _cfg(tmp_path: Path, student: str, teacher: str | None = None, lora: dict | None = None, **train) -> DistrayConfig:
    base = {
        "loss": "sft",
        "lr": 3e-3,
        "warmup_steps": 2,
        "micro_batch_size": 4,
        "num_workers": 2,
        "max_seq_len": 64,
        "log_every_steps": 2,
        "report_every_steps": 1000,
        "max_steps": 12,
        "zero_stage": 2,
    }
    base.update(train)
    data = {
        "run": {"name": "t", "output_dir": str(tmp_path)},
        "student": {"model": student, "lora": lora},
        "train": base,
        "generate": {"logprobs": K},
    }
    if teacher:
        data["teacher"] = {"kind": "hf", "model": teacher}
    return DistrayConfig.model_validate(data)


def _eval_loss(model_dir: str, data_dir: Path | list[dict], cfg: DistrayConfig) -> float:
    """Validation loss of an exported model, computed as the workers compute it (over the
    Parquet files of `data_dir`, or over rows given as a list)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distray.train.data import ChatEncoder, Collator
    from distray.train.losses import compute_loss

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tc = cfg.train
    coll = Collator(ChatEncoder(tok, tc.max_seq_len), tok.pad_token_id, with_topk=tc.is_logit_loss)
    rows = (
        data_dir if isinstance(data_dir, list)
        else pa.concat_tables([pq.read_table(p) for p in sorted(data_dir.glob("*.parquet"))]).to_pylist()
    )
    sums = [0.0] * 4
    for i in range(0, len(rows), 4):
        b = coll(rows[i : i + 4])
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        p = compute_loss(
            logits, b["labels"], loss=tc.loss, alpha=tc.alpha, temperature=tc.temperature,
            topk_ids=b.get("topk_ids"), topk_logprobs=b.get("topk_logprobs"),
        )
        sums = [sums[0] + float(p.sft_sum), sums[1] + float(p.sft_count), sums[2] + float(p.logit_sum), sums[3] + float(p.logit_count)]
    sft = sums[0] / sums[1]
    if not tc.is_logit_loss:
        return sft
    return tc.alpha * sums[2] / sums[3] + (1 - tc.alpha) * sft


def _metrics(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_kd_zero2_learns_exports_and_resumes_on_rerun(ray_cluster, tmp_path, tiny_model, tiny_teacher_model, teacher_data):
    import shutil

    from distray.paths import RunPaths
    from distray.train import run

    cfg = _cfg(tmp_path, tiny_model, tiny_teacher_model, loss="kd", alpha=0.5, temperature=2.0, zero_stage=2,
               eval_every_steps=6)
    # The stage reads generate's layout: generate/data/train and generate/data/validation.
    paths = RunPaths(cfg.run_dir)
    for split in ("train", "validation"):
        shutil.copytree(teacher_data[split], f"{paths.generate_data}/{split}")
    res = run(cfg)
    assert res.student_dir == paths.student and res.metrics_path == paths.train_metrics
    assert res.train_rows == 96 and res.validation_rows == 16
    recs = _metrics(res.metrics_path)
    train_losses = [r["loss"] for r in recs if "loss" in r]
    assert res.steps == 12 and len(train_losses) == 6
    assert train_losses[-1] < train_losses[0] * 0.8, train_losses
    assert all("logit_loss" in r and "tokens_per_s" in r for r in recs if "loss" in r)
    assert res.val_loss is not None and res.loss_plot == paths.loss_plot and Path(res.loss_plot).stat().st_size > 1000
    assert recs[-1]["final"] and recs[-1]["step"] == 12 and recs[-1]["val_loss"] == res.val_loss
    # The exported folder loads with from_pretrained and scores the validation data as the
    # workers did after the last step.
    assert (Path(res.student_dir) / "model.safetensors").is_file()
    assert (Path(res.student_dir) / "tokenizer_config.json").is_file()
    reloaded = _eval_loss(res.student_dir, teacher_data["validation"], cfg)
    assert reloaded == pytest.approx(res.val_loss, rel=1e-3)
    # The records beside the outputs: the DeepSpeed config the workers got, how the student
    # was made.
    ds = json.loads(Path(paths.train, "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 4
    made = json.loads(Path(res.student_dir, "distray_export.json").read_text())
    assert Path(made["base_model"]).resolve() == Path(tiny_model).resolve() and made["steps"] == 12
    assert made["train"]["loss"] == "kd" and made["train"]["alpha"] == 0.5
    assert made["teachers"][0]["model"] == tiny_teacher_model and made["data"]["digest"] and made["command"]

    # Rerunning the stage continues from the last checkpoint (as after a driver kill).
    cfg2 = _cfg(tmp_path, tiny_model, tiny_teacher_model, loss="kd", alpha=0.5, temperature=2.0, zero_stage=2,
                eval_every_steps=6, max_steps=16)
    res2 = run(cfg2)
    assert res2.resumed_from_step == 12 and res2.steps == 16
    steps = [r["step"] for r in _metrics(res2.metrics_path) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16
    assert json.loads(Path(res2.student_dir, "distray_export.json").read_text())["steps"] == 16


def test_early_stopping_exports_the_best_checkpoint_and_a_rerun_stays_stopped(
    ray_cluster, tmp_path, tiny_model, tiny_teacher_model, teacher_data
):
    from distray.train import train_model

    # Validation answers use letters training never shows: learning the training answers makes
    # the validation loss rise, so early stopping triggers after the first evaluations.
    val = write_teacher_data(tmp_path / "val-wxyz", tiny_teacher_model, 8, seed=5, letters="wxyz")
    cfg = _cfg(tmp_path, tiny_model, max_steps=12, eval_every_steps=2, early_stopping_patience=1)
    out = tmp_path / "es"
    res = train_model(cfg, str(teacher_data["train"]), str(out), validation_data=str(val))
    evals = [r for r in _metrics(res.metrics_path) if "val_step" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert res.steps < 12 and res.best_val_loss == pytest.approx(best["val_loss"])
    assert res.val_loss > res.best_val_loss
    # The exported student is the best checkpoint's weights, not the last ones.
    assert res.checkpoint_dir.endswith(f"checkpoint_{best['val_step']:08d}")
    assert _eval_loss(res.student_dir, val, cfg) == pytest.approx(res.best_val_loss, rel=1e-3)
    # A rerun of the same command is finished, not trained on past the stop.
    res2 = train_model(cfg, str(teacher_data["train"]), str(out), validation_data=str(val))
    assert res2.steps == res.steps and res2.checkpoint_dir == res.checkpoint_dir
    assert max(r["step"] for r in _metrics(res2.metrics_path) if "loss" in r) <= res.steps


def test_reference_sft_zero3_from_jsonl_exports_what_it_evaluated(ray_cluster, tmp_path, tiny_model):
    from distray.formats import ID, MESSAGES, parse_jsonl_line
    from distray.train import train_model
    from distray.train.data import holdout_flags

    src = tmp_path / "labels.jsonl"
    lines = [json.dumps({"prompt": p, "reference": a, "id": f"q{i}"}) for i, (p, a) in enumerate(_reverse_rows(120, 3))]
    lines.append(json.dumps({"prompt": "no answer here"}))  # no reference: not a training row
    src.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, tiny_model, zero_stage=3, max_steps=None, epochs=2, validation_fraction=0.15,
               global_batch_size=16)
    res = train_model(cfg, str(src), str(tmp_path / "ref"), answers="reference")
    assert 80 < res.train_rows < 120 and res.validation_rows == 120 - res.train_rows
    losses = [r["loss"] for r in _metrics(res.metrics_path) if "loss" in r]
    assert losses[-1] < losses[0] * 0.8, losses
    assert res.val_loss is not None
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(res.student_dir)
    assert m.config.num_hidden_layers == 2
    # The ZeRO-3 shards consolidate into the weights the workers evaluated last: the held-out
    # rows (each worker evaluates as many as the other, so an odd one out is left out).
    rows = [parse_jsonl_line(x.encode(), line=i + 1)[0] for i, x in enumerate(lines[:-1])]
    held = sorted((r for r, f in zip(rows, holdout_flags([r[ID] for r in rows], 0.15, cfg.run.seed), strict=True) if f),
                  key=lambda r: r[ID])
    held = held[: len(held) // 2 * 2]
    val_rows = [{MESSAGES: r[MESSAGES], F.RESPONSE: r["reference"]} for r in held]
    assert _eval_loss(res.student_dir, val_rows, cfg) == pytest.approx(res.val_loss, rel=1e-3)


def _train_worker_pids() -> list[int]:
    import ray._private.state as state

    return [
        a["Pid"]
        for a in state.actors().values()
        if "RayTrainWorker" in (a.get("ActorClassName") or "") and a.get("State") == "ALIVE" and a.get("Pid")
    ]


def test_killed_worker_resumes_from_checkpoint_lora(ray_cluster, tmp_path, tiny_model, teacher_data):
    from distray.train import train_model

    cfg = _cfg(tmp_path, tiny_model, lora={"r": 8, "alpha": 16}, max_steps=12, checkpoint_every_steps=2,
               max_failures=2, log_every_steps=1, validation_fraction=0.0, lr=1e-2)
    out = tmp_path / "kill"
    box: dict = {}

    def target():
        try:
            box["res"] = train_model(cfg, str(teacher_data["train"]), str(out))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            box["err"] = e

    th = threading.Thread(target=target)
    th.start()
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and th.is_alive() and killed is None:
        # A checkpoint counts once Ray Train has registered it (the snapshot names it) and
        # training went on past it.
        snap = out / "checkpoints" / "checkpoint_manager_snapshot.json"
        metrics = out / "metrics.jsonl"
        if snap.exists() and metrics.exists() and any(r.get("step", 0) >= 3 for r in _metrics(str(metrics))):
            pids = _train_worker_pids()
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    th.join(timeout=300)
    assert killed is not None, "no checkpoint appeared before the run ended"
    assert "err" not in box, box.get("err")
    res = box["res"]
    assert res.steps == 12
    assert res.resumed_from_step >= 2  # restarted from a checkpoint, not from step 0
    steps = [r["step"] for r in _metrics(res.metrics_path) if "loss" in r]
    assert steps == list(range(1, 13))
    # LoRA adapters are merged into plain weights of the student's own architecture.
    from safetensors.torch import load_file

    exported = load_file(str(Path(res.student_dir) / "model.safetensors"))
    base = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert set(exported) == set(base)
    changed = [k for k in base if not torch.equal(base[k], exported[k])]
    assert any("q_proj" in k for k in changed) and not any("norm" in k for k in changed)


def test_vocab_mismatch_fails_before_workers_start(ray_cluster, tmp_path, teacher_data, tiny_teacher_model):
    from distray.tiny import make_tiny
    from distray.train import train_model

    other = make_tiny(tmp_path / "other-vocab", vocab_size=300, layers=1)
    cfg = _cfg(tmp_path, other, tiny_teacher_model, loss="kd")
    t0 = time.time()
    with pytest.raises(DataError, match=r"262.*300|300.*262"):
        train_model(cfg, str(teacher_data["train"]), str(tmp_path / "mm"))
    assert time.time() - t0 < 30
    assert not (tmp_path / "mm" / "checkpoints").exists()


def _start_cli(cfg_path: Path, log: Path):
    import subprocess
    import sys

    import ray

    # The driver joins the session's Ray, as a driver joins its cluster: killing it kills its
    # job (the Ray Train controller and workers), not the cluster.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-m", "distray", "train", "--config", str(cfg_path)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )


def test_zero1_driver_killed_mid_run_resumes_exactly_after_its_checkpoint(
    ray_cluster, tmp_path, tiny_model, teacher_data
):
    import shutil

    import yaml

    from distray.paths import RunPaths

    train = {"loss": "sft", "lr": 3e-3, "warmup_steps": 2, "micro_batch_size": 4, "num_workers": 2,
             "max_seq_len": 64, "log_every_steps": 1, "report_every_steps": 1000, "max_steps": 16,
             "checkpoint_every_steps": 4, "zero_stage": 1, "max_failures": 0}
    raw = {"run": {"name": "kill", "output_dir": str(tmp_path)}, "student": {"model": tiny_model}, "train": train}
    cfg = DistrayConfig.model_validate(raw)
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    paths = RunPaths(cfg.run_dir)
    for split in ("train", "validation"):
        shutil.copytree(teacher_data[split], f"{paths.generate_data}/{split}")
    # A block written twice (a crash between a shard and its record): its rows must train once.
    dup = pq.read_table(teacher_data["train"] / "part-0.parquet").slice(0, 5)
    pq.write_table(dup, f"{paths.generate_data}/train/part-9-rewritten.parquet")

    metrics = Path(paths.train_metrics)
    snap = Path(paths.train) / "checkpoints" / "checkpoint_manager_snapshot.json"
    proc = _start_cli(cfg_path, tmp_path / "driver-1.log")
    before: dict[int, float] = {}
    deadline = time.time() + 420
    try:
        while time.time() < deadline and proc.poll() is None:
            # Killed once Ray Train has registered a checkpoint and training went past it.
            if snap.exists() and metrics.exists():
                recs = [r for r in _metrics(str(metrics)) if "loss" in r]
                if recs and recs[-1]["step"] > 4 and "checkpoint_00000004" in snap.read_text():
                    proc.send_signal(signal.SIGKILL)
                    before = {r["step"]: r["loss"] for r in _metrics(str(metrics)) if "loss" in r}
                    break
            time.sleep(0.1)
    finally:
        if proc.poll() is None and not before:
            proc.kill()
        proc.wait()  # reaped: the run-folder lease sees its holder dead
    assert before, f"no kill after a checkpoint: {(tmp_path / 'driver-1.log').read_text()[-3000:]}"
    assert max(before) < 16

    # The rerun changes speed-only settings (restarts, checkpoints kept): it resumes, unrefused.
    raw["train"] = {**train, "max_failures": 1, "keep_checkpoints": 3}
    cfg_path.write_text(yaml.safe_dump(raw))
    proc = _start_cli(cfg_path, tmp_path / "driver-2.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "driver-2.log").read_text()[-3000:]
    recs = _metrics(str(metrics))
    final = recs[-1]
    assert final["final"] and final["step"] == 16
    resumed = final["resumed_from_step"]
    # From the last checkpoint before the kill, not from step 0 and not past the kill.
    assert resumed % 4 == 0 and 4 <= resumed < max(before)
    starts = [r["start_step"] for r in recs if "start_step" in r]
    assert starts == [0, resumed], starts
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 17))
    # The steps done again after the checkpoint read the same rows in the same order: same loss.
    after = {r["step"]: r["loss"] for r in recs if "loss" in r}
    redone = [s for s in before if s > resumed]
    assert redone and all(after[s] == pytest.approx(before[s], rel=1e-5) for s in redone), (before, after)
    assert all(after[s] == before[s] for s in before if s <= resumed)
    # The rewritten block's rows trained once: 96 distinct rows over 2 workers × micro 4 make
    # 12 steps an epoch (101 rows would make 13).
    assert "dropped 5 duplicate row(s)" in (tmp_path / "driver-2.log").read_text()
    assert next(r for r in recs if r.get("step") == 12 and "loss" in r)["epoch"] == 1
    # The ZeRO-1 export reloads and scores the validation data as the workers did.
    assert _eval_loss(paths.student, teacher_data["validation"], cfg) == pytest.approx(final["val_loss"], rel=1e-3)


def test_all_read_paths_give_a_worker_the_same_rows_in_the_same_order(ray_cluster, monkeypatch, tmp_path):
    """Up to LOCAL_SORT_ROWS a worker sorts its rows in memory (read with pyarrow from a Parquet
    folder, or with Ray Data), beyond it with Ray Data's sort: the micro-batches are the same
    every way, in `worker_ids` order, copies dropped, a hold-out filter applied alike."""
    import pyarrow.parquet as pq
    import ray

    from distray.train import order
    from distray.train.datasets import FileRows, holdout_filter

    ids = [f"row-{i:03d}" for i in range(60)]
    rng = random.Random(0)
    shuffled = ids + ids[:7]  # seven rows that two shards hold
    rng.shuffle(shuffled)
    blocks = [pa.table({F.ID: shuffled[i:i + 9], F.RESPONSE: [f"answer {x}" for x in shuffled[i:i + 9]]})
              for i in range(0, len(shuffled), 9)]
    unique, dropped = order.unique_ids([b.column(F.ID) for b in blocks])
    assert dropped == 7
    mine = order.worker_ids(unique, seed=3, epoch=1, world=2, rank=1, rows=30)

    def read(start: int) -> list[list[str]]:
        ds = ray.data.from_arrow(blocks)
        return [t.column(F.ID).to_pylist() for t in order.stream(ds, mine[start:], start, 4)]

    for i, b in enumerate(blocks):
        pq.write_table(b, tmp_path / f"part-{i}.parquet")
    files = FileRows(str(tmp_path), read_columns=[F.ID, F.RESPONSE])

    def read_files(start: int, rows: FileRows = files) -> list[list[str]]:
        return [t.column(F.ID).to_pylist() for t in order.stream(rows, mine[start:], start, 4)]

    local, local_files = read(5), read_files(5)
    monkeypatch.setattr(order, "LOCAL_SORT_ROWS", 0)
    shuffled_path, files_via_ray = read(5), read_files(5)
    assert local == shuffled_path == local_files == files_via_ray
    assert [i for b in local for i in b] == mine.to_pylist()[5:]
    assert [len(b) for b in local] == [4] * 6 + [1]
    # A filter (the validation hold-out) keeps the same rows on both readers.
    held = files.filtered(holdout_filter(0.3, 1, keep_holdout=True))
    direct = sorted(i for t in held.tables() for i in t.column(F.ID).to_pylist())
    via_ray = sorted(i for r in held.dataset().to_arrow_refs() for i in ray.get(r).column(F.ID).to_pylist())
    assert 0 < len(direct) < len(shuffled) and direct == via_ray
