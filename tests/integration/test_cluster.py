"""Scale-out on one machine: a head and worker nodes on 127.0.0.1, the run folder on an
S3-compatible server (moto), `ray job submit`, lost nodes, Serve autoscaling.

    pytest tests/integration/test_cluster.py -m integration -s   # -s prints the figures

The cluster (cluster_fixtures.LocalCluster): a head with 1 CPU and worker nodes with
WORKER_CPUS (3) CPUs and a custom resource each (`node_a`, `node_b`, ... a replacement gets a new
name). Engine replicas, training workers and Serve replicas ask for 2 CPUs each, so resources
force them onto different worker nodes.
Every run writes to `s3://distray-test/runs`; its prompts are read from the bucket too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cluster_fixtures import BUCKET, RAY, LocalCluster, S3Server, free_port  # noqa: E402

# Generous per-test limits: these tests share 2 cores with whatever else runs.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
ENGINE = {"max_model_len": 128, "enforce_eager": True, "dtype": "float32"}
RUNS = f"s3://{BUCKET}/runs"
#: Inputs with an id each, two of them invalid (they end in rejects at validation).
BAD_ROWS = [{"id": "bad-empty", "prompt": ""}, {"id": "bad-role", "messages": [{"role": "robot", "content": "x"}]}]


# ---- fixtures -------------------------------------------------------------------------------


#: Logical CPUs of a worker node: an engine replica, a train worker or a Serve replica takes 2,
#: so each node holds one of them, and the third leaves Ray Data's read and write tasks room
#: beside it (with 2, those tasks could hold a node's CPUs while a replica waited for them).
WORKER_CPUS = 3


@pytest.fixture(scope="module")
def s3() -> Any:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: S3Server) -> Any:
    """Head (1 CPU, dashboard + job server) and node_a, node_b (WORKER_CPUS each)."""
    from conftest import release_local_ray

    release_local_ray()  # one Ray per test process at a time
    c = LocalCluster(tmp_path_factory.mktemp("ray-nodes"), dict(os.environ))
    try:
        c.start_head(1, {"head": 1})
        c.add_node("node_a", WORKER_CPUS)
        c.add_node("node_b", WORKER_CPUS)
        yield c
    finally:
        import ray

        if ray.is_initialized():  # this process joined as a driver (serve, refusal tests)
            try:
                from ray import serve

                serve.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
            ray.shutdown()
        c.stop()


def workers_alive(c: LocalCluster, n: int = 2) -> list[str]:
    """Make sure `n` worker nodes are alive (adding new ones, as an autoscaler would); their names.

    Alive means this fixture's `ray start` for the node still runs: the GCS marks a killed node
    dead only after its health checks time out, and a replacement must not wait for that.
    A new node gets a name never used before, so no dead node shares its custom resource.
    """
    alive = sorted(name for name, proc in c.procs.items() if name.startswith("node_") and proc.poll() is None)
    i = 0
    while len(alive) < n:
        name = f"node_{chr(ord('c') + i)}"
        i += 1
        if (c.log_dir / f"{name}.log").exists():
            continue
        c.add_node(name, WORKER_CPUS)
        alive.append(name)
    return alive


def put_jsonl(uri: str, rows: list[dict[str, Any]]) -> None:
    from distray.storage import write_jsonl

    write_jsonl(uri, rows)


def make_inputs(prefix: str, n_train: int, n_test: int = 6) -> dict[str, Any]:
    """Reverse-task prompts (+ BAD_ROWS) in the bucket; returns the URIs and the input ids."""
    from distray.tasks import task_rows

    rows = task_rows("reverse", {"train": n_train, "test": n_test}, seed=zlib.crc32(prefix.encode()) % 1000)
    train = rows["train"] + BAD_ROWS
    uris = {"train": f"s3://{BUCKET}/inputs/{prefix}/train.jsonl", "test": f"s3://{BUCKET}/inputs/{prefix}/test.jsonl"}
    put_jsonl(uris["train"], train)
    put_jsonl(uris["test"], rows["test"])
    return {**uris, "ids": [r["id"] for r in train]}


def cluster_config(name: str, teacher: str, student: str, inputs: dict[str, Any], **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run": {"name": name, "output_dir": RUNS},
        "data": {"train": inputs["train"], "test": inputs["test"]},
        "teacher": {
            "kind": "vllm", "name": "tiny-teacher", "model": teacher, "engine_kwargs": ENGINE,
            "batch_size": 8, "concurrency": 2,
            # 2 CPUs per replica: the 1-CPU head holds none, each worker node holds one.
            "placement_group_config": {"bundles": [{"CPU": 2}]},
        },
        "generate": {
            "sampling": {"max_tokens": 8}, "logprobs": 3, "rows_per_shard": 8,
            "filters": {"drop_empty": False, "truncated": "keep"},
            "cache_dir": f"s3://{BUCKET}/cache",
        },
        "student": {"model": student},
        "train": {
            "loss": "kd", "lr": 3e-3, "max_steps": 4, "micro_batch_size": 4, "num_workers": 2,
            "cpus_per_worker": 2, "zero_stage": 2, "max_seq_len": 48, "log_every_steps": 1,
            "report_every_steps": 2, "checkpoint_every_steps": 2, "validation_fraction": 0.0,
        },
        "evaluate": {
            "models": ["student"], "scorers": ["exact_match"], "max_tokens": 8,
            "engine_kwargs": ENGINE, "measure_efficiency": False, "latency_samples": 1,
        },
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


#: Ray Data starts an actor pool's replicas asynchronously and streams as soon as one is up; on
#: this tiny job its read tasks could then hold the other node's CPUs until the first replica had
#: done all the work. Waiting for both replicas first puts one on each worker node every time.
JOB_ENV = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}


def submit(c: LocalCluster, s3: S3Server, cfg: dict[str, Any], tmp: Path, *args: str,
           wait: bool = True) -> Any:
    """`ray job submit` of jobs/pipeline.py, as a user runs it; the S3 settings travel as the
    job's env vars. Returns the finished CompletedProcess, or the running Popen (wait=False)."""
    path = tmp / f"{cfg['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [
        RAY, "job", "submit", f"--address={c.address}", "--working-dir", str(ROOT),
        "--runtime-env-json", json.dumps({"env_vars": {**s3.env, **JOB_ENV}}), "--",
        "python", "jobs/pipeline.py", "--config", str(path), *args,
    ]
    if wait:
        return subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=1700, cwd=ROOT)
    return subprocess.Popen(cmd, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)


def stage_seconds(out: str) -> dict[str, float]:
    """`stage X: finished in N s` lines of a job's log."""
    import re

    return {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\w+): finished in ([\d.]+) s", out)}


def s3_files(prefix: str) -> list[str]:
    """Keys under s3://distray-test/<prefix>, listed with boto3 (not distray's storage)."""
    import boto3

    client = boto3.client("s3")
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def s3_bytes(key: str) -> bytes:
    import boto3

    return bytes(boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read())


def input_ids_in(prefix: str) -> Counter[str]:
    """The input id of every row in the Parquet/JSONL shards under a prefix, read with boto3 and
    pyarrow: `input_id`, or for a row rejected at validation (no input_id) the `id` of the
    input row it carries as JSON."""
    import io

    import pyarrow.parquet as pq

    def input_id(rec: dict[str, Any]) -> str:
        return rec.get("input_id") or json.loads(rec["row"])["id"]

    ids: Counter[str] = Counter()
    for key in s3_files(prefix):
        name = key.rsplit("/", 1)[-1]
        if "/.tmp/" in key or name.startswith((".", "_")):
            continue
        if key.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(s3_bytes(key)))
            cols = [c for c in ("input_id", "row") if c in table.column_names]
            ids.update(input_id(r) for r in table.select(cols).to_pylist())
        elif key.endswith(".jsonl"):
            ids.update(input_id(json.loads(line)) for line in s3_bytes(key).decode().splitlines() if line.strip())
    return ids


def metrics_records(run: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in s3_bytes(f"runs/{run}/train/metrics.jsonl").decode().splitlines() if x]


# ---- tests ----------------------------------------------------------------------------------


def test_local_output_dir_is_refused_on_a_multi_node_cluster(cluster, tmp_path, tiny_model):
    from distray import pipeline
    from distray.cluster import check_shared_output
    from distray.config import DistrayConfig
    from distray.errors import ConfigError

    cfg = DistrayConfig.model_validate({
        "run": {"name": "local", "output_dir": str(tmp_path / "runs")},
        "data": {"train": str(tmp_path / "none.jsonl")},
        "student": {"model": tiny_model},
        "resources": {"ray_address": cluster.gcs},
    })
    with pytest.raises(ConfigError, match=r"run.output_dir.*\d+ nodes.*s3://.*shared_filesystem"):
        pipeline.run(cfg, stages=["generate"])
    assert not (tmp_path / "runs").exists()  # refused before the lease or any output
    with pytest.raises(ConfigError, match="shared storage"):
        pipeline.run_stage(cfg, "train")
    # An NFS mount says so, and passes; a URI passes.
    check_shared_output(cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"shared_filesystem": True})}))
    check_shared_output(cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": RUNS})}))


@pytest.fixture(scope="module")
def spread_run(cluster, s3, tmp_path_factory, tiny_teacher_model, tiny_model) -> dict[str, Any]:
    """The tiny pipeline (generate, train, evaluate) through `ray job submit`, run folder on S3."""
    workers_alive(cluster, 2)
    tmp = tmp_path_factory.mktemp("spread")
    inputs = make_inputs("spread", 32)
    cfg = cluster_config("spread", tiny_teacher_model, tiny_model, inputs)
    t0 = time.perf_counter()
    proc = submit(cluster, s3, cfg, tmp, "--stages", "generate,train,evaluate")
    out = proc.stdout + proc.stderr
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.address, detail=True, limit=1000, raise_on_missing_output=False)
    names = cluster.node_names()
    engines = Counter(names.get(a.node_id, "?") for a in actors if "vLLMEngineStageUDF" in (a.class_name or ""))
    return {
        "rc": proc.returncode, "out": out, "wall_s": time.perf_counter() - t0, "cfg": cfg, "tmp": tmp,
        "inputs": inputs, "engine_nodes": engines, "node_names": names,
        "stage_seconds": stage_seconds(out), "metrics": metrics_records("spread") if proc.returncode == 0 else [],
        "stats": json.loads(s3_bytes("runs/spread/generate/stats.json")) if proc.returncode == 0 else {},
    }


def test_spread_pipeline_on_s3_runs_on_two_nodes(spread_run):
    r = spread_run
    assert r["rc"] == 0 and "succeeded" in r["out"], r["out"][-4000:]
    # generate's replicas, one per worker node: test_generate_stats_record_the_node_of_each_replica
    # (the state API's list below mixes in evaluate's engine, so alone it proves nothing).
    # train: the metrics name the node of each worker; two workers on two nodes.
    placements = [rec["workers"] for rec in r["metrics"] if "workers" in rec]
    assert placements, r["metrics"]
    nodes = {r["node_names"].get(w["node_id"]) for w in placements[0]}
    assert len(nodes) == 2 and all(n and n.startswith("node_") for n in nodes), nodes
    # Every stage's outputs are in the bucket, the export marker last, no lease left behind.
    keys = set(s3_files("runs/spread/"))
    for key in ("config.resolved.yaml", "generate/stats.json", "generate/lineage.json", "train/lineage.json",
                "evaluate/lineage.json", "train/metrics.jsonl", "train/student/model.safetensors",
                "train/student/tokenizer.json", "train/student/_distray_export.json", "evaluate/metrics.json"):
        assert f"runs/spread/{key}" in keys, key
    assert "runs/spread/.lease.json" not in keys
    assert any(k.startswith("runs/spread/generate/data/train/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("runs/spread/generate/rejects/") for k in keys)
    assert any(k.startswith("runs/spread/train/checkpoints/checkpoint_") for k in keys)
    assert any(k.startswith("cache/") for k in s3_files("cache/"))
    marker = json.loads(s3_bytes("runs/spread/train/student/_distray_export.json"))
    assert "model.safetensors" in marker["files"]
    ev = json.loads(s3_bytes("runs/spread/evaluate/metrics.json"))
    assert ev["models"]["student"]["answered_rows"] == 6
    ids = input_ids_in("runs/spread/generate/")
    assert sorted(ids) == sorted(r["inputs"]["ids"]) and set(ids.values()) == {1}
    print("\nspread (cluster + S3) stage seconds:", r["stage_seconds"], "engines per node:", dict(r["engine_nodes"]))


def test_generate_stats_record_the_node_of_each_replica(spread_run):
    assert spread_run["rc"] == 0
    recorded = spread_run["stats"]["engine_nodes"]
    names = {spread_run["node_names"].get(node, "?"): n for node, n in recorded.items()}
    # One replica on each worker node (the 1-CPU head fits none), on nodes where the state API
    # saw engine actors too.
    assert sorted(n for n in names if n.startswith("node_")) == ["node_a", "node_b"], (names, spread_run["engine_nodes"])
    assert set(names) <= set(spread_run["engine_nodes"]), (names, spread_run["engine_nodes"])


@pytest.mark.timeout(480)
def test_rerun_uses_the_s3_cache_and_force_clears_s3_stages(spread_run, cluster, s3):
    """`--force` on S3 clears generate, the cache answers every row, train and evaluate follow."""
    r = spread_run
    assert r["rc"] == 0
    proc = submit(cluster, s3, r["cfg"], r["tmp"], "--stages", "generate", "--force")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    stats = json.loads(s3_bytes("runs/spread/generate/stats.json"))
    assert stats["cache_hits"] == 32 and stats["teacher_requests"] == 0, stats
    assert not stats["engine_nodes"], stats  # every answer cached: no engine replica started
    ids = input_ids_in("runs/spread/generate/")
    assert sorted(ids) == sorted(r["inputs"]["ids"]) and set(ids.values()) == {1}


def test_node_loss_in_generate_loses_and_duplicates_nothing(cluster, s3, tmp_path, tiny_teacher_model, tiny_model):
    alive = workers_alive(cluster, 2)
    inputs = make_inputs("gen-loss", 96)
    cfg = cluster_config("gen-loss", tiny_teacher_model, tiny_model, inputs,
                         generate={"rows_per_shard": 4, "cache_dir": None})
    cfg["teacher"]["batch_size"] = 4
    job = submit(cluster, s3, cfg, tmp_path, "--stages", "generate", wait=False)
    victim, killed_after = None, 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and job.poll() is None:
        shards = [k for k in s3_files("runs/gen-loss/generate/data/train/") if k.endswith(".parquet")]
        if len(shards) >= 2:
            from ray.util.state import list_actors

            names = cluster.node_names()
            busy = [names.get(a.node_id) for a in list_actors(address=cluster.address, detail=True, limit=1000,
                                                               raise_on_missing_output=False)
                    if "vLLMEngineStageUDF" in (a.class_name or "") and a.state == "ALIVE"]
            victim = next((n for n in busy if n in alive), alive[-1])
            killed_after = len(shards)
            cluster.kill_node(victim)
            break
        time.sleep(0.5)
    out, _ = job.communicate(timeout=1700)
    assert victim is not None, "no shard was written before the run ended"
    assert job.returncode == 0, out[-4000:]
    ids = input_ids_in("runs/gen-loss/generate/")
    dup = {k: v for k, v in ids.items() if v > 1}
    data_ids = input_ids_in("runs/gen-loss/generate/data/")
    print(f"\nnode loss in generate: killed {victim} after {killed_after} shards; rows in {len(inputs['ids'])}, "
          f"data {sum(data_ids.values())}, rejects {sum(ids.values()) - sum(data_ids.values())}, "
          f"duplicates {len(dup)}, missing {len(set(inputs['ids']) - set(ids))}")
    assert not dup and set(ids) == set(inputs["ids"])


@pytest.mark.timeout(480)
def test_node_loss_in_train_resumes_from_the_s3_checkpoint(spread_run, cluster, s3):
    """Kill a node under a training worker, add a replacement: Ray Train restores the last
    checkpoint in S3 and finishes; steps before it are not run again; the export loads."""
    r = spread_run
    assert r["rc"] == 0
    workers_alive(cluster, 2)
    cfg = json.loads(json.dumps(r["cfg"]))
    cfg["train"].update({"max_steps": 8, "checkpoint_every_steps": 2, "max_failures": 3})
    import boto3

    # Cleared here rather than by the job's --force, so that no old checkpoint is mistaken
    # for one of this run while the job starts.
    client = boto3.client("s3")
    for key in s3_files("runs/spread/train/"):
        client.delete_object(Bucket=BUCKET, Key=key)
    job = submit(cluster, s3, cfg, r["tmp"], "--stages", "train", "--force", wait=False)
    victim, ckpt_step = None, -1
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and job.poll() is None:
        # A checkpoint counts once Ray Train has registered it (its snapshot in the bucket names
        # it): the folder's files appear while it uploads, before a restart could use it.
        snap = "runs/spread/train/checkpoints/checkpoint_manager_snapshot.json"
        registered = re.findall(r"checkpoint_(\d{8})", s3_bytes(snap).decode()) if snap in s3_files(snap) else []
        if registered:
            recs = metrics_records("spread")
            placement = [x for x in recs if "workers" in x]
            steps = [x["step"] for x in recs if "loss" in x]
            ckpt_step = max(int(x) for x in registered)
            if placement and steps and steps[-1] > ckpt_step:
                names = cluster.node_names()
                victim = names[placement[-1]["workers"][-1]["node_id"]]
                cluster.kill_node(victim)
                break
        time.sleep(0.5)
    assert victim is not None, "no checkpoint appeared before the run ended"
    time.sleep(5)
    workers_alive(cluster, 2)  # the replacement, as an autoscaler would add it
    out, _ = job.communicate(timeout=1700)
    assert job.returncode == 0, out[-4000:]
    recs = metrics_records("spread")
    starts = [x for x in recs if "workers" in x]
    final = [x for x in recs if x.get("final")][-1]
    print(f"\nnode loss in train: killed {victim} with checkpoint_{ckpt_step:08d} in S3; starts "
          f"{[(s['start_step'], sorted(cluster.node_names().get(w['node_id'], '?') for w in s['workers'])) for s in starts]}; "
          f"final step {final['step']}")
    assert len(starts) == 2 and starts[0]["start_step"] == 0
    assert starts[1]["start_step"] >= ckpt_step >= 2  # resumed from the checkpoint, not step 0
    assert final["step"] == 8
    steps = [x["step"] for x in recs if "loss" in x]
    assert steps == list(range(1, 9))  # the history resumed with the checkpoint: no step twice
    from transformers import AutoModelForCausalLM

    from distray.cluster import localize_model

    AutoModelForCausalLM.from_pretrained(localize_model(f"{RUNS}/spread/train/student"))


@pytest.mark.timeout(480)
def test_serve_autoscales_up_and_down_without_failed_requests(spread_run, cluster, monkeypatch):
    """min 1, max 2, target 1 ongoing request; load → 2 replicas, idle → 1; every request 200."""
    assert spread_run["rc"] == 0
    workers_alive(cluster, 2)
    from distray.config import DistrayConfig
    from distray.ray_utils import init_ray
    from distray.serve import deploy, hf_app, shutdown

    port = free_port()
    cfg = DistrayConfig.model_validate({
        "run": {"name": "spread", "output_dir": RUNS},
        # Serve's defaults (upscale after 30 s, downscale after 600 s) would make this test
        # 10 minutes long.
        "serve": {"backend": "hf", "port": port, "min_replicas": 1, "max_replicas": 2,
                  "target_ongoing_requests": 1, "upscale_delay_s": 2, "downscale_delay_s": 8},
        "resources": {"ray_address": cluster.gcs},
    })
    init_ray(cfg)
    from ray import serve

    # One proxy (on the head): the nodes share this machine's ports.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    real = hf_app.hf_app

    def quick(models: Any, limits: Any, digest: Any, options: dict[str, Any], remote_code: Any) -> Any:
        # 2 CPUs puts each replica on its own worker node; Serve's load metrics are sampled
        # faster than its defaults, for a short test (distray has no setting for these).
        assert options["autoscaling_config"]["upscale_delay_s"] == 2  # from serve.upscale_delay_s
        options = {**options, "ray_actor_options": {"num_cpus": 2}}
        options["autoscaling_config"] = {**options["autoscaling_config"], "look_back_period_s": 2,
                                         "metrics_interval_s": 0.5}
        return real(models, limits, digest, options, remote_code)

    monkeypatch.setattr(hf_app, "hf_app", quick)
    t0 = time.monotonic()
    endpoints = deploy(cfg, {"student": f"{RUNS}/spread/train/student"}, ready_timeout_s=300)
    url = endpoints[0].base_url + "/chat/completions"
    timeline: list[tuple[float, int]] = []
    codes: Counter[int] = Counter()
    stop = threading.Event()

    def replicas() -> int:
        st = serve.status().applications["distray"].deployments
        dep = next(iter(st.values()))
        return int(dep.replica_states.get("RUNNING", 0))

    def watch() -> None:
        while not stop.is_set():
            n = replicas()
            if not timeline or timeline[-1][1] != n:
                timeline.append((round(time.monotonic() - t0, 1), n))
            time.sleep(0.5)

    loading = threading.Event()
    loading.set()

    def load() -> None:
        import httpx

        with httpx.Client(timeout=120) as client:
            while loading.is_set():
                resp = client.post(url, json={"model": "student", "max_tokens": 16,
                                              "messages": [{"role": "user", "content": "rev abcdef="}]})
                codes[resp.status_code] += 1

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        threads = [threading.Thread(target=load) for _ in range(6)]
        for t in threads:
            t.start()
        # Load until the second replica runs (its start takes longer on a busy machine), and
        # a while on two replicas after.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and max((n for _, n in timeline), default=0) < 2:
            time.sleep(0.5)
        time.sleep(8)
        loading.clear()
        stop_load = time.monotonic()
        for t in threads:
            t.join(timeout=120)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and replicas() > 1:
            time.sleep(0.5)
        time.sleep(1)
        placement = Counter(
            cluster.node_names().get(a.node_id, "?")
            for a in __import__("ray.util.state", fromlist=["list_actors"]).list_actors(
                address=cluster.address, detail=True, limit=1000, raise_on_missing_output=False)
            if "HFServer" in (a.class_name or "") and a.state == "ALIVE")
    finally:
        loading.clear()
        stop.set()
        w.join(timeout=5)
        shutdown()
    print(f"\nserve autoscaling timeline (s since deploy, RUNNING replicas): {timeline}; load stopped at "
          f"{stop_load - t0:.1f} s; responses {dict(codes)}; replicas now on {dict(placement)}")
    counts = [n for _, n in timeline]
    assert 2 in counts, timeline
    assert counts[-1] == 1 and counts.index(2) < len(counts) - 1, timeline
    assert set(codes) == {200} and sum(codes.values()) > 10, codes


FAKE_AUTOSCALER = {
    "cluster_name": "distray-fake",
    "max_workers": 2,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
        "cpu_worker": {"resources": {"CPU": 2, "fake_worker": 1}, "node_config": {},
                       "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    "auth": {"ssh_user": "ubuntu"},
    "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


@pytest.mark.timeout(480)
def test_fake_multinode_autoscaler_launches_and_removes_workers(cluster, tmp_path):
    """Ray's fake multi-node provider on this machine: an engine-shaped demand (2 replicas of
    {"CPU": 2} on a head with none) launches worker nodes; idle, they are removed.

    Runs last: it stops the module's cluster first (one cluster per test process at a time).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster.stop()
    port = free_port()
    settings = json.loads(json.dumps(FAKE_AUTOSCALER))
    # The provider starts its nodes against this GCS (its default is port 6379).
    settings["provider"]["gcs_address"] = f"{ray.util.get_node_ip_address()}:{port}"
    config = tmp_path / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(settings))
    fake = LocalCluster(tmp_path, {**cluster.env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    fake.start_head(0, {}, (f"--autoscaling-config={config}",), port=port)
    timeline: list[tuple[float, int]] = []
    t0 = time.monotonic()
    try:
        ray.init(address=fake.gcs)

        @ray.remote(num_cpus=2, resources={"fake_worker": 1})
        def replica() -> str:
            time.sleep(5)
            return ray.get_runtime_context().get_node_id()

        def workers() -> int:
            return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("fake_worker"))

        refs = [replica.remote() for _ in range(2)]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not timeline or timeline[-1][1] < 2):
            n = workers()
            if not timeline or timeline[-1][1] != n:
                timeline.append((round(time.monotonic() - t0, 1), n))
            time.sleep(1)
        ran_on = set(ray.get(refs, timeout=300))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and workers() > 0:
            time.sleep(1)
        timeline.append((round(time.monotonic() - t0, 1), workers()))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        fake.stop()
    print(f"\nfake_multinode autoscaler timeline (s, worker nodes): {timeline}; replicas ran on {len(ran_on)} nodes")
    # Seen here: the demand launches worker nodes, but a fake node's raylet may die at start
    # (WaitForDashboardAgentPorts: the provider starts agents on port 0), so not always both;
    # the replicas then share the node that came up. Idle nodes are removed.
    assert max(n for _, n in timeline) >= 1 and len(ran_on) >= 1
    assert timeline[-1][1] == 0, timeline
