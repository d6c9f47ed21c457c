"""distray generate against the plain libraries: output tokens/s on the same prompts and model.

    .venv/bin/python benchmarks/generate.py
    .venv/bin/python benchmarks/generate.py --prompts 2000 --max-tokens 128 --layers 12

Four ways to label the same prompts (built-in `reverse` task, chat template applied) with the
same locally built model (a random Llama of tens of millions of parameters, `distray.tiny`) and
the same sampling (greedy, `--max-tokens`):

- (a) `distray generate` (`distray.teacher.run`: Ray Data read → vLLM replica via ray.data.llm →
  filters → Parquet shards);
- (b) bare `vllm.LLM.generate` on all prompts in one process, same engine settings;
- (c) the seed's loop: HF `generate` one prompt at a time, timed on `--hf-sample` prompts and
  extrapolated to all of them (the per-prompt cost does not depend on the others);
- (d) batched HF `generate`, `--hf-batch` prompts per call, on all prompts (or the first
  `--hf-batched-prompts`, extrapolated like (c)).

"Excluding start-up" means: (b) the `generate` call alone (not `LLM(...)`); (c)/(d) the generate
calls (not the model load); (a) the run's `engine_busy_s`, from the first request reaching the
vLLM replica to its last token (vLLM's own request timestamps), which counts any time the
pipeline leaves the engine waiting but not the replica's start-up. Ray itself is started before
any timing. (a) and (b) run in `--rounds` alternating rounds (b a, a b, ...) and the medians are
quoted. Prints a/b, a/c, a/d both ways and writes JSON (default runs/bench-generate.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=1000, help="prompts to label (≥ 1000)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per prompt")
    parser.add_argument("--layers", type=int, default=8, help="model layers")
    parser.add_argument("--hidden", type=int, default=512, help="model hidden size")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--batch-size", type=int, default=64, help="distray teacher.batch_size")
    parser.add_argument("--hf-sample", type=int, default=8, help="prompts timed for (c)")
    parser.add_argument("--hf-batch", type=int, default=64, help="prompts per call for (d)")
    parser.add_argument(
        "--hf-batched-prompts", type=int, default=256,
        help="time (d) on the first N prompts and extrapolate (0: all)",
    )
    parser.add_argument("--model", default=None, help="use this HF folder instead of building one")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating (a)/(b) rounds; medians")
    parser.add_argument("--out", default="runs/bench-generate.json", help="JSON results")


def _prompts(n: int, path: Path) -> list[dict[str, Any]]:
    from distray.tasks import task_rows

    rows = task_rows("reverse", {"train": n}, seed=0)["train"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _engine_kwargs(max_len: int) -> dict[str, Any]:
    return {"max_model_len": max_len, "dtype": "float32", "enforce_eager": True}


def bench_distray(model: str, data: Path, work: Path, args: argparse.Namespace, n: int, tag: str) -> dict[str, Any]:
    """(a): one `distray.teacher.run` over `data`."""
    from distray.config import config_from_dict
    from distray.teacher import run

    cfg = config_from_dict({
        "run": {"name": f"bench-{tag}", "output_dir": str(work / "runs")},
        "data": {"train": str(data), "max_rows": n},
        "teacher": {
            "kind": "vllm", "model": model, "batch_size": args.batch_size,
            "engine_kwargs": _engine_kwargs(args.max_len),
            # The replica gets every core, as the bare engine in (b) does.
            "placement_group_config": {"bundles": [{"CPU": os.cpu_count() or 1}]},
        },
        "generate": {
            "splits": ["train"], "rows_per_shard": 1024,
            "sampling": {"temperature": 0.0, "max_tokens": args.max_tokens},
            "filters": {"truncated": "keep", "drop_empty": False},
        },
        "resources": {"num_cpus": (os.cpu_count() or 1) + 4},
    })
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall, "rows": res.accepted + res.rejected, "completion_tokens": res.completion_tokens,
        "engine_busy_s": res.engine_busy_s,
    }


def bench_vllm(model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """(b): bare vllm.LLM.generate, all prompts in one call."""
    from vllm import LLM, SamplingParams

    try:
        from vllm.inputs.llm import TokensPrompt
    except ImportError:  # older vLLM
        from vllm.inputs import TokensPrompt  # type: ignore[no-redef]

    t0 = time.perf_counter()
    llm = LLM(model=model, **_engine_kwargs(args.max_len))
    t1 = time.perf_counter()
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    t2 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {"startup_s": t1 - t0, "generate_s": t2 - t1, "completion_tokens": tokens}


def _hf_model(model: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


def bench_hf_loop(model: str, prompts: list[list[int]], args: argparse.Namespace, eos: list[int], pad: int) -> dict[str, Any]:
    """(c): HF generate one prompt at a time (the seed's loop), on a sample."""
    import torch

    t0 = time.perf_counter()
    m = _hf_model(model)
    t1 = time.perf_counter()
    tokens = 0
    sample = prompts[: args.hf_sample]
    with torch.inference_mode():
        for p in sample:
            out = m.generate(torch.tensor([p]), max_new_tokens=args.max_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
            tokens += out.shape[1] - len(p)
    t2 = time.perf_counter()
    del m
    gc.collect()
    return {"startup_s": t1 - t0, "generate_s": t2 - t1, "completion_tokens": tokens, "prompts_timed": len(sample)}


def bench_hf_batched(model: str, prompts: list[list[int]], args: argparse.Namespace, eos: list[int], pad: int) -> dict[str, Any]:
    """(d): batched HF generate with left padding, tokens counted up to each row's eos."""
    import torch

    prompts = prompts[: args.hf_batched_prompts] if args.hf_batched_prompts else prompts
    t0 = time.perf_counter()
    m = _hf_model(model)
    t1 = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(prompts), args.hf_batch):
            chunk = prompts[i : i + args.hf_batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(chunk):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=pad)
            for row in out[:, width:].tolist():
                n = len(row)
                for k, t in enumerate(row):
                    if t in eos:
                        n = k + 1
                        break
                tokens += n
    t2 = time.perf_counter()
    del m
    gc.collect()
    return {"startup_s": t1 - t0, "generate_s": t2 - t1, "completion_tokens": tokens, "prompts_timed": len(prompts)}


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s | %(message)s")
    logging.getLogger("distray").setLevel(logging.INFO)
    if args.prompts < 1000:
        print(f"note: --prompts {args.prompts} is below the 1000 the comparison calls for", file=sys.stderr)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    args.max_len = 512
    from distray.prompts import eos_ids, load_tokenizer, render_prompt
    from distray.tiny import make_tiny

    model = args.model or make_tiny(work / "model", layers=args.layers, hidden=args.hidden,
                                    heads=args.heads, max_position=args.max_len, seed=0)
    from distray.evaluate.efficiency import count_parameters

    n_params = count_parameters(str(model))[0]
    data = work / "prompts.jsonl"
    rows = _prompts(args.prompts, data)
    tok = load_tokenizer(model)
    prompts = [render_prompt(tok, [{"role": "user", "content": r["prompt"]}], True)[1] for r in rows]
    eos = sorted(eos_ids(model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    print(f"model {model} ({n_params:,} params), {len(prompts)} prompts, max_tokens {args.max_tokens}", flush=True)

    from distray.config import config_from_dict
    from distray.ray_utils import init_ray

    # address="local": a fresh Ray of our own, even when other Ray clusters run on this machine.
    init_ray(config_from_dict({"resources": {"num_cpus": (os.cpu_count() or 1) + 4}}), address="local")
    n = len(prompts)
    load_before = os.getloadavg()[0]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        # A B, B A, ...: load drifting in from other processes hits both sides alike.
        order = ("b", "a") if r % 2 == 0 else ("a", "b")
        got: dict[str, Any] = {}
        for side in order:
            if side == "b":
                print(f"round {r + 1}: (b) bare vllm.LLM.generate ...", flush=True)
                got["b_vllm"] = bench_vllm(model, prompts, args)
            else:
                print(f"round {r + 1}: (a) distray generate ...", flush=True)
                full = bench_distray(model, data, work, args, n, f"r{r}")
                # Excluding start-up: first request in to last token out of the replica
                # (`engine_busy_s`, from vLLM's request stats).
                got["a_distray"] = {
                    **full, "startup_s": full["wall_s"] - full["engine_busy_s"],
                    "generate_s": full["engine_busy_s"],
                }
            print(f"    {got}", flush=True)
        rounds.append(got)

    print("(c) HF generate, one prompt at a time ...", flush=True)
    c = bench_hf_loop(model, prompts, args, eos, pad)
    print(f"    {c}", flush=True)
    print("(d) HF generate, batched ...", flush=True)
    d = bench_hf_batched(model, prompts, args, eos, pad)
    print(f"    {d}", flush=True)

    def tps_a(a: dict[str, Any]) -> dict[str, float]:
        return {"excl": a["completion_tokens"] / a["generate_s"], "incl": a["completion_tokens"] / a["wall_s"]}

    def tps_b(b: dict[str, Any]) -> dict[str, float]:
        return {"excl": b["completion_tokens"] / b["generate_s"],
                "incl": b["completion_tokens"] / (b["startup_s"] + b["generate_s"])}

    def median(xs: list[float]) -> float:
        return statistics.median(xs)

    per_round = [{"a": tps_a(g["a_distray"]), "b": tps_b(g["b_vllm"])} for g in rounds]
    # (c)/(d) timed on samples: tokens/s carries over; their walls for all prompts are extrapolated.
    c_total_s = c["generate_s"] * n / c["prompts_timed"]
    d_total_s = d["generate_s"] * n / d["prompts_timed"]
    tps = {
        "a": {m: median([p["a"][m] for p in per_round]) for m in ("excl", "incl")},
        "b": {m: median([p["b"][m] for p in per_round]) for m in ("excl", "incl")},
        "c": {"excl": c["completion_tokens"] / c["generate_s"],
              "incl": (c["completion_tokens"] * n / c["prompts_timed"]) / (c["startup_s"] + c_total_s)},
        "d": {"excl": d["completion_tokens"] / d["generate_s"],
              "incl": (d["completion_tokens"] * n / d["prompts_timed"]) / (d["startup_s"] + d_total_s)},
    }
    ratios = {
        f"a/{x}_{mode}": tps["a"][mode] / tps[x][mode]
        for x in ("b", "c", "d") for mode in ("excl", "incl")
    }
    report = {
        "model": model, "parameters": n_params, "prompts": n, "max_tokens": args.max_tokens,
        "batch_size": args.batch_size, "cpus": os.cpu_count(), "rounds": args.rounds,
        # Other jobs on the machine slow both sides; the load says how busy it was.
        "load_avg_1m_at_start": load_before, "load_avg_1m_at_end": os.getloadavg()[0],
        "output_tokens_per_s": {k: {m: round(v, 1) for m, v in d_.items()} for k, d_ in tps.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "a_over_b_per_round": [
            {m: round(p["a"][m] / p["b"][m], 3) for m in ("excl", "incl")} for p in per_round
        ],
        "raw": {"rounds": rounds, "c_hf_loop": c, "d_hf_batched": d},
        "note": "(a)/(b): medians over rounds; (c) timed on the first --hf-sample prompts and (d) "
        "on --hf-batched-prompts, extrapolated to all prompts; 'excl' excludes start-up (a: the "
        "replica's busy span from vLLM's request stats)",
    }
    print("\noutput tokens/s   excl. start-up   incl. start-up")
    names = {"a": "a distray generate", "b": "b bare vLLM", "c": "c HF one-at-a-time", "d": "d HF batched"}
    for k in "abcd":
        print(f"{names[k]:<20} {tps[k]['excl']:>12,.1f} {tps[k]['incl']:>16,.1f}")
    for x in "bcd":
        print(f"a/{x}: {ratios[f'a/{x}_excl']:.3f} excluding start-up, {ratios[f'a/{x}_incl']:.3f} including")
    print(f"load average {load_before:.1f} → {os.getloadavg()[0]:.1f} (goal a/b ≥ 0.95 excluding start-up)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    main(parser.parse_args())
