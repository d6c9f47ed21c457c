"""distray serve against bare vLLM: same model, same load, ratios of request throughput and p50 TTFT.

    .venv/bin/python benchmarks/serve.py
    .venv/bin/python benchmarks/serve.py --model runs/x/train/student --concurrency 16 --rounds 5

Both servers run side by side on this machine: `python -m vllm.entrypoints.openai.api_server`
(the plain library) and `distray.serve.deploy` (Ray Serve LLM + distray's ingress, same vLLM
engine settings). Measurement rounds alternate between them (A B, B A, ...) so drifting load
from other processes hits both; the figures quoted are medians over rounds. The load is
distray's bench client (vLLM's request functions), closed loop at `--concurrency`.

One point is also measured with `vllm.benchmarks.serve.main` (vLLM's own `bench serve`, same
prompts via its custom dataset) against bare vLLM, alternating with distray's client, to
cross-check distray's bench client.

`--ray-stock` adds Ray's own `build_openai_app` (same engine settings, mounted at /stock) as a
third target, which splits the gap: distray / Ray stock is the cost of distray's ingress
(auth, caps, error bodies, health, first-chunk flush); Ray stock / vLLM is Ray Serve's.
`--ray-single-hop` adds Ray's `LLMServer` itself as the HTTP ingress (vLLM's own FastAPI app in
the replica, no ingress deployment between; at /single): one hop fewer than both apps above.
Run the whole script with `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` to measure Ray Serve's throughput
flags (gRPC between deployments, direct ingress, user code on the replica's main loop).
`--model` takes any HF folder; on small CPU models the per-request Serve overhead dominates,
so the ratios there are a worst case.

Writes JSON (default runs/bench-serve.json) and prints the ratios (distray / vLLM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def _vllm_cross_check(base: str, model_dir: str, prompts: list[list[dict[str, str]]], args: Any, out_dir: str) -> dict[str, Any]:
    """One point through `vllm.benchmarks.serve.main` (vLLM's `bench serve`)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    path = os.path.join(out_dir, "prompts.jsonl")
    with open(path, "w") as f:
        for msgs in prompts:
            f.write(json.dumps({"prompt": msgs[-1]["content"]}) + "\n")
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    ns = parser.parse_args([
        "--backend", "openai-chat", "--base-url", base, "--endpoint", "/v1/chat/completions",
        "--model", "student", "--tokenizer", model_dir, "--dataset-name", "custom",
        "--dataset-path", path, "--skip-chat-template", "--custom-output-len", str(args.max_tokens),
        "--num-prompts", str(len(prompts)), "--max-concurrency", str(args.concurrency),
        "--ignore-eos", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,90,99", "--ready-check-timeout-sec", "0",
    ])
    r = main(ns)
    keys = ("failed", "request_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")
    return {k: r.get(k) for k in keys}


def _deploy_ray_stock(model: str, engine: dict[str, Any], batching_ms: float | None) -> None:
    """Ray's own `build_openai_app`, same engine settings, mounted at /stock (for decomposition)."""
    from ray import serve as ray_serve
    from ray.serve.llm import LLMConfig, build_openai_app

    extra = {"stream_batching_interval_ms": batching_ms} if batching_ms is not None else {}
    llm = LLMConfig(
        model_loading_config={"model_id": "student", "model_source": model},
        engine_kwargs={"enforce_eager": True, **engine},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        experimental_configs=extra,
    )
    ray_serve.run(build_openai_app({"llm_configs": [llm]}), name="ray-stock", route_prefix="/stock",
                  blocking=False)


def _deploy_ray_single_hop(model: str, engine: dict[str, Any]) -> None:
    """Ray's `LLMServer` as the ingress (its late-bound vLLM FastAPI app), mounted at /single."""
    from ray import serve as ray_serve
    from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

    llm = LLMConfig(
        model_loading_config={"model_id": "student", "model_source": model},
        engine_kwargs={"enforce_eager": True, **engine},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    )
    app = build_llm_deployment(llm, name_prefix="Single:", deployment_cls=ray_serve.ingress()(LLMServer))
    ray_serve.run(app, name="ray-single-hop", route_prefix="/single", blocking=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model folder; default a tiny model built here")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--stream-batching-ms", type=float, default=None,
                    help="serve.stream_batching_interval_ms for distray (default: Ray's 50 ms)")
    ap.add_argument("--access-log", action="store_true", help="serve.access_log for distray")
    ap.add_argument("--ray-stock", action="store_true",
                    help="also measure Ray's stock build_openai_app (no distray ingress) at /stock")
    ap.add_argument("--ray-single-hop", action="store_true",
                    help="also measure Ray's LLMServer as the ingress itself (vLLM's app) at /single")
    ap.add_argument("--out", default="runs/bench-serve.json")
    load_before = os.getloadavg()[0]
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from distray import bench, serve
    from distray.config import EndpointConfig, config_from_dict

    tmp = tempfile.mkdtemp(prefix="distray-bench-serve-")
    model = args.model
    if model is None:
        from distray.tiny import make_tiny

        model = make_tiny(os.path.join(tmp, "tiny"))
    engine = {"max_model_len": args.max_model_len}
    on_gpu = False
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        pass

    # --- bare vLLM -------------------------------------------------------------------------
    vport = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "student", "--host", "127.0.0.1", "--port", str(vport),
           "--max-model-len", str(args.max_model_len)]
    if not on_gpu:
        # distray's CPU replicas prefill whole prompts (a seeded request prefilled in chunks
        # kills vLLM 0.32's CPU engine); the same engine settings on both sides.
        cmd += ["--enforce-eager", "--no-enable-chunked-prefill"]
    vlog = open(os.path.join(tmp, "vllm.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=vlog, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        # --- distray serve (started while vLLM loads) -------------------------------------
        sport = _free_port()
        cfg = config_from_dict({
            "run": {"output_dir": tmp, "name": "bench-serve"},
            # logical CPUs: distray's engine (2) plus, with --ray-stock, Ray's app (2 + 1 ingress)
            "resources": {"num_cpus": 8},
            "serve": {"model": model, "port": sport, "max_tokens_cap": 4096,
                      "engine_kwargs": engine, "access_log": args.access_log,
                      "stream_batching_interval_ms": args.stream_batching_ms},
        })
        t0 = time.perf_counter()
        serve.deploy(cfg)
        distray_start_s = time.perf_counter() - t0
        if args.ray_stock:
            _deploy_ray_stock(model, engine, args.stream_batching_ms)
        if args.ray_single_hop:
            _deploy_ray_single_hop(model, engine)
        _wait(f"http://127.0.0.1:{vport}/v1/models", 600, proc)
        targets = {
            "vllm": EndpointConfig(name="vllm", base_url=f"http://127.0.0.1:{vport}/v1", model="student"),
            "distray": serve.served_endpoints(cfg)[0],
        }
        if args.ray_stock:
            targets["ray_stock"] = EndpointConfig(
                name="ray_stock", base_url=f"http://127.0.0.1:{sport}/stock/v1", model="student")
        if args.ray_single_hop:
            targets["ray_single_hop"] = EndpointConfig(
                name="ray_single_hop", base_url=f"http://127.0.0.1:{sport}/single/v1", model="student")
        prompts = bench.generated_prompts(args.num_prompts, seed=0)
        load = dict(concurrency=args.concurrency, max_tokens=args.max_tokens, timeout_s=300.0,
                    ignore_eos=True)
        for ep in targets.values():  # warm both (first requests pay one-off costs)
            bench.warm_up(ep, prompts[0], timeout_s=300, ignore_eos=True)
            bench.run_point(ep, prompts[: args.concurrency], **load)

        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                p = bench.run_point(targets[name], prompts, **load)
                print(f"round {r + 1}/{args.rounds} {name}: {p.line().split(' | ', 1)[1]}", flush=True)
                d = {k: v for k, v in p.__dict__.items() if k not in ("ttfts_ms",)}
                rounds[name].append(d)

        # Cross-check: vLLM's own `bench serve` and distray's client on the same server and
        # load, alternating, so the two clients can be compared on equal terms.
        cross: dict[str, Any] = {}
        try:
            theirs, ours = [], []
            for r in range(args.rounds):
                for who in (("vllm", "distray") if r % 2 == 0 else ("distray", "vllm")):
                    if who == "vllm":
                        theirs.append(_vllm_cross_check(f"http://127.0.0.1:{vport}", model, prompts, args, tmp))
                    else:
                        p = bench.run_point(targets["vllm"], prompts, **load)
                        ours.append({"request_throughput": p.request_throughput,
                                     "median_ttft_ms": p.median_ttft_ms, "median_tpot_ms": p.median_tpot_ms,
                                     "median_e2el_ms": p.median_e2el_ms, "failed": p.errors})
            cross = {
                "vllm_bench_serve": {k: statistics.median(x[k] for x in theirs) for k in ours[0]},
                "distray_bench": {k: statistics.median(x[k] for x in ours) for k in ours[0]},
                "rounds": {"vllm_bench_serve": theirs, "distray_bench": ours},
            }
        except Exception as e:  # the cross-check must not lose the main figures
            cross = {"error": f"{type(e).__name__}: {e}"}
    finally:
        serve.shutdown()
        for flag, app_name in ((args.ray_stock, "ray-stock"), (args.ray_single_hop, "ray-single-hop")):
            if flag:
                try:
                    from ray import serve as ray_serve

                    ray_serve.delete(app_name)
                except Exception:
                    pass
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        vlog.close()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    keys = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "median_e2el_ms")
    medians = {n: {k: med(n, k) for k in keys} for n in targets}
    if "ray_stock" in medians:
        ratios_stock = {
            "request_throughput": medians["distray"]["request_throughput"] / medians["ray_stock"]["request_throughput"],
            "p50_ttft": medians["distray"]["median_ttft_ms"] / medians["ray_stock"]["median_ttft_ms"],
        }
    else:
        ratios_stock = None
    ratios = {
        "request_throughput": medians["distray"]["request_throughput"] / medians["vllm"]["request_throughput"],
        "p50_ttft": medians["distray"]["median_ttft_ms"] / medians["vllm"]["median_ttft_ms"],
        "output_throughput": medians["distray"]["output_throughput"] / medians["vllm"]["output_throughput"],
        "p50_e2el": medians["distray"]["median_e2el_ms"] / medians["vllm"]["median_e2el_ms"],
    }
    out = {
        "model": model,
        "load": {"concurrency": args.concurrency, "num_prompts": args.num_prompts,
                 "max_tokens": args.max_tokens, "rounds": args.rounds, "ignore_eos": True},
        "distray_stream_batching_interval_ms": args.stream_batching_ms,
        "distray_startup_s": distray_start_s,
        "medians": medians,
        "ratios_distray_over_vllm": ratios,
        "ratios_distray_over_ray_stock": ratios_stock,
        # Every target against bare vLLM (request throughput, p50 TTFT).
        "ratios_over_vllm": {
            n: {"request_throughput": medians[n]["request_throughput"] / medians["vllm"]["request_throughput"],
                "p50_ttft": medians[n]["median_ttft_ms"] / medians["vllm"]["median_ttft_ms"]}
            for n in targets if n != "vllm"
        },
        "distray_access_log": args.access_log,
        "rounds": rounds,
        "cross_check_one_point": cross,
        "errors": {n: sum(r["errors"] for r in rounds[n]) for n in targets},
        # Other jobs on the machine slow every target; the load says how busy it was.
        "load_avg_1m_at_start": load_before,
        "load_avg_1m_at_end": os.getloadavg()[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(
        f"distray/vLLM (median of {args.rounds} rounds, c={args.concurrency}, {args.num_prompts} req, "
        f"{args.max_tokens} tok): request throughput {ratios['request_throughput']:.2f}x "
        f"({medians['distray']['request_throughput']:.2f} vs {medians['vllm']['request_throughput']:.2f} req/s), "
        f"p50 TTFT {ratios['p50_ttft']:.2f}x ({medians['distray']['median_ttft_ms']:.0f} vs "
        f"{medians['vllm']['median_ttft_ms']:.0f} ms); load average {load_before:.1f} → "
        f"{os.getloadavg()[0]:.1f} -> {args.out}"
    )
    for name, r in out["ratios_over_vllm"].items():
        if name != "distray":
            print(f"{name}/vLLM: request throughput {r['request_throughput']:.2f}x, p50 TTFT {r['p50_ttft']:.2f}x")
    if ratios_stock:
        print(
            f"distray/Ray stock build_openai_app: request throughput "
            f"{ratios_stock['request_throughput']:.2f}x, p50 TTFT {ratios_stock['p50_ttft']:.2f}x"
        )
    if "vllm_bench_serve" in cross:
        v, o = cross["vllm_bench_serve"], cross["distray_bench"]
        print(
            f"cross-check on bare vLLM: vllm bench serve {v['request_throughput']:.2f} req/s, p50 TTFT "
            f"{v['median_ttft_ms']:.0f} ms; distray bench {o['request_throughput']:.2f} req/s, p50 TTFT "
            f"{o['median_ttft_ms']:.0f} ms"
        )


if __name__ == "__main__":
    main()
