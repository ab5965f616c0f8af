"""Ray clusters the way users start them: `ray start --head` and `ray start --address` processes
on this machine (tests/test_submit.py, tests/test_e2e_multinode.py).

Each node is its own `ray start` process group (start_new_session) with its own temp folder and
free ports, so several nodes share the machine without touching each other or any other Ray
cluster running here; `kill` and `stop` end exactly the processes of our nodes (never `ray stop`).
The user's shell is imitated: the venv not activated, RAY_AUTH_MODE unset (Ray's default) and a
HOME of the test's own holding ~/.ray/auth_token, so the head turns token authentication on.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def user_env(home: Path) -> dict:
    """A shell as a user has it: the venv NOT activated (its bin not on PATH), RAY_AUTH_MODE unset
    (Ray's default), none of the worker variables the test session sets for itself (tidal must
    hand them to the cluster, nor the accelerator an in-process learner of the session chose for
    itself: tidal.actors.devices), and a HOME of the test's own, so ~/.ray/auth_token is ours to create."""
    from tidal.driver.runtime import RUNTIME_ENV_VARS

    venv_bin = str(Path(sys.executable).parent)
    drop = {"RAY_AUTH_MODE", "VIRTUAL_ENV", "RAY_ADDRESS", "DS_ACCELERATOR", *RUNTIME_ENV_VARS}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["HOME"] = str(home)
    return env


def http_get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def kill_process_group(group: int) -> None:
    """Kill one node: every process of its `ray start` process group and their descendants."""
    procs = set()
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == group:
                procs.add(p)
                procs.update(p.children(recursive=True))
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs), timeout=30)


@dataclass
class Node:
    group: int  # process group of its `ray start` (its daemons keep it)
    temp_dir: str
    resources: dict = field(default_factory=dict)
    node_id: str | None = None


class RayNodes:
    """A head and any number of worker nodes, each a `ray start` of its own (see module doc)."""

    def __init__(self, prefix: str = "trn-"):
        self.prefix = prefix
        self.home = Path(tempfile.mkdtemp(prefix=f"{prefix}home-"))
        (self.home / ".ray").mkdir()
        self.token = uuid.uuid4().hex
        (self.home / ".ray" / "auth_token").write_text(self.token)
        self.env = user_env(self.home)
        self.nodes: list[Node] = []
        self.gcs_port: int | None = None
        self.address: str | None = None  # the dashboard (job server) URL

    def _start(self, args: list[str], resources: dict, env: dict | None = None) -> Node:
        temp_dir = tempfile.mkdtemp(prefix=self.prefix)
        agent, agent_grpc, metrics, renv = free_ports(4)
        # `python -m` rather than the `ray` script: a copied venv keeps the shebang of its original
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, f"--temp-dir={temp_dir}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}", "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        starter = subprocess.Popen(cmd, env=env or self.env, start_new_session=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        node = Node(starter.pid, temp_dir, resources)
        self.nodes.append(node)  # before waiting: stop() cleans up a start that failed
        out, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, out[-3000:]
        return node

    def start_head(self, num_cpus: int, resources: dict | None = None) -> str:
        """`ray start --head`; returns the job server's address once it answers."""
        gcs, dash, client = free_ports(3)
        self.gcs_port = gcs
        self._start(["--head", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-port={dash}",
                     "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}", f"--num-cpus={num_cpus}"],
                    resources or {})
        self.address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while http_get(f"{self.address}/api/jobs/", self.token)[0] != 200:  # answers a moment after `ray start`
            assert time.monotonic() < deadline, "job server did not come up"
            time.sleep(1)
        self.nodes[0].node_id = self.alive_nodes()[0]["node_id"]
        return self.address

    def add_worker(self, num_cpus: int, resources: dict) -> Node:
        """`ray start --address=HEAD` with its own CPUs and custom resources; waits until it joined."""
        # `ray start --address` turns token mode on only when told (the head does it by itself)
        node = self._start([f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"], resources,
                           {**self.env, "RAY_AUTH_MODE": "token"})
        deadline = time.monotonic() + 60
        while node.node_id is None:
            node.node_id = next((n["node_id"] for n in self.alive_nodes()
                                 if all(k in n.get("resources_total", {}) for k in resources)
                                 and n["node_id"] not in {m.node_id for m in self.nodes}), None)
            assert node.node_id is not None or time.monotonic() < deadline, f"node {resources} did not join"
            time.sleep(0.5)
        return node

    def alive_nodes(self) -> list[dict]:
        status, body = http_get(f"{self.address}/api/v0/nodes?limit=100&detail=1", self.token)
        assert status == 200, status
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def kill(self, node: Node) -> None:
        """SIGKILL one node's raylet, agents and workers (a machine that died)."""
        kill_process_group(node.group)

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            kill_process_group(node.group)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)


def tidal_submit(env: dict, *args: str, wait: bool = True):
    """`tidal submit` as a user runs it: the module through the venv's Python, from the checkout
    (tests/ on PYTHONPATH for the e2e reward functions). wait=False: the running Popen."""
    from e2e_support import REPO, TESTS_DIR

    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "tidal.commands.cli", "submit", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
