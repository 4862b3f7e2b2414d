"""The weight search on a real Ray cluster on this machine: the same result as the local backend.

A head node and one more worker node are started with ``ray start --block`` on 127.0.0.1 (one CPU,
a small object store, no dashboard, every port chosen free), the search is run with the real
``fusion search`` against the cluster's address on a small built demo, and its best.json and
trace.json are compared with the local backend's, byte for byte. Both nodes are stopped at the end
by their process ids. Skipped when Ray (the ``ray`` extra) is not installed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, tool_env
from pipeline.demo import DemoConfig, build_demo

SMALL = DemoConfig(
    seed=5, hidden=32, layers=2, heads=4, ff=64,
    pretrain_steps=60, pretrain_batch=16, pretrain_lr=3e-3,
    examples_per_task=48, replay_per_task=8, valid_per_task=12, test_per_task=12,
    adapter_rank=2, adapter_scale=2.0, adapter_iters=10, adapter_batch=8, adapter_lr=2e-3,
)
BUDGET = 6
RAY = Path(sys.executable).parent / "ray"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


TOKEN: dict[str, str] = {}


def ray_env() -> dict:
    """Every Ray process of the test (nodes and drivers): no usage reports, and token authentication
    with a token file of the test's own (Ray's default would be one under ~/.ray)."""
    env = tool_env()
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    env.update(TOKEN)
    return env


def node_ports() -> list[str]:
    node, objects, metrics, agent, agent_grpc, runtime_env, low = free_ports(7)
    return [f"--node-manager-port={node}", f"--object-manager-port={objects}",
            f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 40}"]


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              "--object-store-memory=80000000", "--block", "--disable-usage-stats"]
    with log.open("w") as out:
        return subprocess.Popen([str(RAY), "start", *args, *common, *node_ports()], stdout=out,
                                stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True)


def stop_node(proc: subprocess.Popen) -> None:
    """SIGTERM to the ``ray start --block`` process (it stops the processes it started), then
    SIGKILL to whatever is left of its process group (the group's id is its pid)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_started(proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Until ``ray start`` says the node runs (it prints that once the node is registered)."""
    while "Ray runtime started" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    if not RAY.exists():
        pytest.skip("the ray command is not installed next to this Python")
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    (temp / "token").write_text(secrets.token_hex(32))
    TOKEN.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(temp / "token"))
    port, = free_ports(1)
    address = f"127.0.0.1:{port}"
    nodes = []
    try:
        deadline = time.time() + 90
        nodes.append(start_node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                                temp / "head.log"))
        wait_started(nodes[0], temp / "head.log", deadline)
        nodes.append(start_node([f"--address={address}"], temp / "worker.log"))
        wait_started(nodes[1], temp / "worker.log", deadline)
        yield address
    finally:
        for proc in reversed(nodes):
            stop_node(proc)
        TOKEN.clear()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A params.yaml over a small built demo: one fusion of two adapters to search."""
    root = tmp_path_factory.mktemp("search")
    build_demo(root / "demo", SMALL)
    params = {
        "base_model": "demo/models/base",
        "adapters": {n: {"path": f"demo/adapters/{n}", "data": f"demo/data/{n}"} for n in ("up", "inc")},
        "weights": [0.5, 0.5],
        "fusions": {"average": {"adapters": ["up", "inc"]}},
        "eval": {"max_examples": 12, "max_tokens": 6, "batch_size": 8},
        "search": {"enabled": True, "fusion": "average", "budget": BUDGET, "seed": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def search(project: Path, out: str, *args) -> dict:
    r = subprocess.run([str(Path(sys.executable).parent / "fusion"), "search", "--out", out, *args],
                       cwd=project, capture_output=True, text=True, env=ray_env(), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"stdout": r.stdout, **{f: (project / out / f).read_bytes() for f in ("best.json", "trace.json")}}


def test_the_ray_cluster_finds_the_same_weights_as_the_local_backend(cluster, project):
    local = search(project, "local")
    on_ray = search(project, "ray", "--backend", "ray", "--ray-address", cluster, "--workers", "2")
    assert "2 Ray worker(s) on 2 node(s)" in on_ray["stdout"]
    best = json.loads(on_ray["best.json"])
    assert best["evaluations"] == BUDGET and best["best"]["value"] >= best["start"]["value"]
    # the same trace, point for point and value for value, whichever worker finished first
    assert on_ray["trace.json"] == local["trace.json"]
    assert on_ray["best.json"] == local["best.json"]


def test_backend_settings_are_checked_with_one_line_errors(project):
    for args, message in ((["--backend", "dask"], "search.backend: expected one of local, ray"),
                          (["--workers", "2"], "search.workers: the local backend evaluates in this process"),
                          (["--backend", "ray", "--workers", "0"], "search.workers: expected null or a whole number")):
        r = run_cli("search", "--params", project / "params.yaml", "--out", project / "bad", *args, cwd=project)
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (project / "bad").exists()
