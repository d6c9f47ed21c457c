"""A multi-node Ray cluster and an S3-compatible server, both on 127.0.0.1, for test_cluster.py.

    from cluster_fixtures import LocalCluster, S3Server

`LocalCluster` runs one `ray start --head --block` and one `ray start --address=... --block` per
worker node, each in its own process group with its own ports and a custom resource naming it
(`{"node_a": 1}`), so a test can see where work ran and kill a node outright (SIGKILL to the
group: the raylet and every worker on it die at once, as when a machine is lost).

`S3Server` is moto's server mode (`ThreadedMotoServer`) with the bucket `distray-test`; it sets
AWS_ENDPOINT_URL and access keys in this process's environment (pyarrow, boto3 and Ray read
them), and the cluster's nodes are started with the same environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RAY = str(Path(sys.executable).parent / "ray")
BUCKET = "distray-test"


def free_port() -> int:
    """A port free on every interface: Ray binds its node IP (not 127.0.0.1), so a port that is
    free on loopback only may be a running GCS's."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class S3Server:
    """moto's S3 on 127.0.0.1 with bucket `distray-test`, pointed at the standard way."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "distray-test-key",
            "AWS_SECRET_ACCESS_KEY": "distray-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }
        self._saved: dict[str, str | None] = {}

    def start(self) -> S3Server:
        self.server.start()
        for k, v in self.env.items():
            self._saved[k] = os.environ.get(k)
            os.environ[k] = v
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=BUCKET)
        return self

    def stop(self) -> None:
        self.server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LocalCluster:
    """A head and worker nodes as separate `ray start` processes on 127.0.0.1.

    Args:
        log_dir: where each node's `ray start` output goes.
        env: the environment every node (and so every worker) gets.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"
        self.env.pop("RAY_ADDRESS", None)
        # Head, nodes and this process's clients must agree on Ray's auth mode: the nodes
        # inherit the session's (conftest sets it once, before anything starts Ray).
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.temp_dirs: list[str] = []
        self.gcs = ""
        self.address = ""

    def _ports(self) -> list[str]:
        # Every port of its own: other Rays on this machine hold the defaults (the dashboard
        # agent's 52365 among them), and a clash leaves a node without a job agent.
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
        ]

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        # A temp dir per node, as on separate machines: nodes sharing one session folder
        # garbage-collect each other's runtime_env packages, a running job's cwd among them.
        temp = tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp")
        self.temp_dirs.append(temp)
        self.procs[name] = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--temp-dir={temp}", *self._ports(), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_head(self, num_cpus: int, resources: dict[str, float], extra: tuple[str, ...] = (),
                   port: int | None = None) -> None:
        """The head with the dashboard and job server; `extra` flags go to `ray start`."""
        port, dash = port or free_port(), free_port()
        self._start("head", [
            "--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
            "--include-dashboard=true", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}", f"--ray-client-server-port={free_port()}",
            "--object-store-memory=300000000", *extra,
        ])
        self.gcs = f"127.0.0.1:{port}"
        self.address = f"http://127.0.0.1:{dash}"
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.address}/api/version", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if self.procs["head"].poll() is not None:
                raise RuntimeError(f"ray start --head exited; see {self.log_dir}/head.log")
            time.sleep(1)
        raise RuntimeError(f"the Ray dashboard did not come up at {self.address}")

    def add_node(self, name: str, num_cpus: int, *, wait: bool = True) -> None:
        """A worker node with `num_cpus` CPUs and the custom resource `{name: 1}`."""
        self._start(name, [
            f"--address={self.gcs}", f"--num-cpus={num_cpus}",
            f"--resources={json.dumps({name: 1})}", "--object-store-memory=300000000",
        ])
        if wait:
            self.wait_for(lambda nodes: name in {n["name"] for n in nodes if n["alive"]},
                          f"node {name} to join")

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's whole process group: raylet, agents and workers die at once."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the GCS knows: {"node_id", "name" (its custom resource), "alive"}."""
        from ray.util.state import list_nodes

        out = []
        for n in list_nodes(address=self.address, detail=True, limit=100, raise_on_missing_output=False):
            res = n.resources_total or {}
            names = [k for k in res if k.startswith("node_") and ":" not in k] or (
                ["head"] if n.is_head_node else ["?"]
            )
            out.append({"node_id": n.node_id, "name": names[0], "alive": n.state == "ALIVE"})
        return out

    def node_names(self) -> dict[str, str]:
        """node id → the node's name (node_a, node_b, head)."""
        return {n["node_id"]: n["name"] for n in self.nodes()}

    def wait_for(self, pred: Any, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if pred(self.nodes()):
                    return
            except Exception:  # noqa: BLE001 - the state API is briefly unavailable at start
                pass
            time.sleep(1)
        raise RuntimeError(f"timed out waiting for {what}")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every node at once, SIGKILL what is left after `grace_s`; never a global
        `ray stop`. A test cluster keeps no state worth a slow shutdown, and a graceful one is
        slow: test_pipeline's head took 34 s to stop after its Serve and engine workers."""
        procs = list(self.procs.values())
        self.procs.clear()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The whole group: a worker may outlive the `ray start` that exited.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        self.temp_dirs.clear()
