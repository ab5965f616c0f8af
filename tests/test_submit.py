"""`tidal submit` against a real `ray start --head` cluster started by the test."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from e2e_support import DATA_DIR, REPO, rl_records
from tidal.commands.submit import build_entrypoint, job_runtime_env, submit
from tidal.common.config import ConfigError


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stop_head(proc_group: int) -> None:
    """Kill the processes of OUR head only: its process group and their descendants
    (other Ray clusters on this machine are left alone; no `ray stop`)."""
    procs = set()
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == proc_group:
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


def _user_env(home: Path) -> dict:
    """A shell as a user has it: the venv NOT activated (its bin not on PATH), RAY_AUTH_MODE unset
    (Ray's default), and a HOME of the test's own, so ~/.ray/auth_token is ours to create."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env["HOME"] = str(home)
    return env


def _get(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def ray_head():
    """A one-node cluster started the way Ray documents it, `ray start --head`, at Ray's default
    authentication: a token exists in ~/.ray/auth_token, so the head turns token auth on."""
    temp_dir = tempfile.mkdtemp(prefix="trh-")
    home = Path(tempfile.mkdtemp(prefix="trh-home-"))
    (home / ".ray").mkdir()
    token = uuid.uuid4().hex
    (home / ".ray" / "auth_token").write_text(token)
    gcs, dash, client, agent, agent_grpc, metrics, renv = _free_ports(7)
    env = _user_env(home)
    # `python -m` rather than the `ray` script: a copied venv keeps the shebang of its original
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--temp-dir={temp_dir}", f"--port={gcs}",
           "--include-dashboard=true", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={renv}", "--num-cpus=4", "--disable-usage-stats"]
    starter = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, out[-3000:]
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 60
        while _get(f"{address}/api/jobs/", token) != 200:  # the job server may answer a moment after `ray start`
            assert time.monotonic() < deadline, "job server did not come up"
            time.sleep(1)
        assert _get(f"{address}/api/jobs/", None) == 401  # authentication really is on
        yield address, env
    finally:
        _stop_head(starter.pid)


def _submit(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`tidal submit` as a user runs it: the module through the venv's Python, from the checkout."""
    return subprocess.run([sys.executable, "-m", "tidal.commands.cli", "submit", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def _overrides(tmp_path, name, *extra):
    return [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", f"data.data_dir={DATA_DIR}",
            "logging.wandb_mode=disabled", "logging.progress=false", *extra]


@pytest.mark.slow
@pytest.mark.ray
def test_submit_runs_tidal_train_as_a_job_and_reports_success(ray_head, tmp_path):
    address, env = ray_head
    res = _submit(env, "configs/tiny_grpo.yaml", "--address", address,  # overrides after --address
                  *_overrides(tmp_path, "job", "algorithm.steps=2", "logging.eval_samples=4"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SUCCEEDED" in res.stdout and "tidal: run directory" in res.stdout  # the job's own log came back
    assert "python -m tidal.commands.cli train" in res.stdout
    assert [r["step"] for r in rl_records(tmp_path / "job")] == [1, 2]
    assert (tmp_path / "job" / "policy" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_submit_reports_a_failing_job(ray_head, tmp_path):
    # A hub id passes the local preflight when the user allows downloads (HF_HUB_OFFLINE=0, which
    # the job's environment carries too); the job cannot reach the hub, so it fails there, naming
    # the model. (A hub id that may not be downloaded is refused locally: tests/test_first_hour.py.)
    address, env = ray_head
    env = {**{k: v for k, v in env.items() if k != "TRANSFORMERS_OFFLINE"}, "HF_HUB_OFFLINE": "0"}
    res = _submit(env, "configs/tiny_grpo.yaml", "--address", address,
                  *_overrides(tmp_path, "bad", "model.policy=nobody/no-such-model"))
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED" in res.stdout and "nobody/no-such-model" in res.stdout + res.stderr


def test_submit_refuses_data_that_would_not_be_uploaded(tmp_path):
    local = REPO / "runs" / f"not-uploaded-{uuid.uuid4().hex[:8]}.jsonl"
    local.parent.mkdir(exist_ok=True)
    local.write_text('{"prompt": "hi"}\n')
    try:
        with pytest.raises(ConfigError, match=r"data.prompts=runs/not-uploaded-.* is under runs, which `tidal submit` "
                                              r"does not upload"):
            submit("configs/tiny_grpo.yaml", ["data.task=null", f"data.prompts={local.relative_to(REPO)}"],
                   address="http://127.0.0.1:9", working_dir=str(REPO))
    finally:
        local.unlink()


def test_submit_without_a_token_says_what_to_set(tmp_path):
    """A job server that wants a token this client does not have: one line naming what to set."""
    import asyncio
    import threading

    from aiohttp import web

    async def deny(request):
        return web.Response(status=401, text="Unauthorized: Missing authentication token")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", deny)
    loop, port = asyncio.new_event_loop(), _free_ports(1)[0]
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        env = {**_user_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"}
        res = _submit(env, "configs/tiny_grpo.yaml", "--address", f"http://127.0.0.1:{port}")
    finally:
        loop.call_soon_threadsafe(loop.stop)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0] and "ray get-auth-token" in lines[0], res.stderr


def test_entrypoint_runs_tidal_through_python_quoted():
    assert build_entrypoint("configs/a b.yaml", ["x.y=1", "n='q r'"]) == \
        "python -m tidal.commands.cli train 'configs/a b.yaml' x.y=1 'n='\"'\"'q r'\"'\"''"
    env = job_runtime_env(REPO)
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    assert env["env_vars"]["PATH"] == f"{Path(sys.executable).parent}:${{PATH}}"
    assert env["env_vars"]["DS_ACCELERATOR"] and env["env_vars"]["OMP_NUM_THREADS"]


def test_submit_validates_locally_before_contacting_the_cluster(tmp_path):
    with pytest.raises(ConfigError, match="learner.lrr"):
        submit("configs/tiny_ppo.yaml", ["learner.lrr=1"], address="http://127.0.0.1:9", working_dir=str(REPO))
    outside = tmp_path / "c.yaml"
    outside.write_text((REPO / "configs" / "tiny_ppo.yaml").read_text())
    with pytest.raises(ConfigError, match="outside the working directory"):
        submit(str(outside), [], address="http://127.0.0.1:9", working_dir=str(REPO))
