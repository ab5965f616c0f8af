"""`tidal submit` against a real `ray start --head` cluster started by the test."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from e2e_support import DATA_DIR, REPO, rl_records
from tidal.cluster.submit import build_entrypoint, job_runtime_env, submit
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


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster with the dashboard (job server) on a free port."""
    temp_dir = tempfile.mkdtemp(prefix="trh-")
    gcs, dash, client, agent, agent_grpc, metrics, renv = _free_ports(7)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `tidal` for the job's shell
    env["RAY_AUTH_MODE"] = "disabled"  # a private test cluster; no token file to share with the client
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--temp-dir={temp_dir}", f"--port={gcs}",
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
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 60
        while True:  # the job server may answer a moment after `ray start` returns
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        _stop_head(starter.pid)


def _overrides(tmp_path, name, *extra):
    return [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", f"data.data_dir={DATA_DIR}",
            "logging.wandb_mode=disabled", "logging.progress=false", *extra]


@pytest.mark.slow
@pytest.mark.ray
def test_submit_runs_tidal_train_as_a_job_and_reports_success(ray_head, tmp_path, capfd):
    code = submit("configs/tiny_ppo.yaml", _overrides(tmp_path, "job", "algorithm.steps=2"),
                  address=ray_head, follow=True, working_dir=str(REPO))
    out = capfd.readouterr().out
    assert code == 0, out[-3000:]
    assert "SUCCEEDED" in out and "tidal: run directory" in out  # the job's own log came back
    assert [r["step"] for r in rl_records(tmp_path / "job")] == [1, 2]
    assert (tmp_path / "job" / "policy" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_submit_reports_a_failing_job(ray_head, tmp_path, capfd):
    code = submit("configs/tiny_ppo.yaml", _overrides(tmp_path, "bad", "model.policy=/nonexistent/model"),
                  address=ray_head, follow=True, working_dir=str(REPO))
    out = capfd.readouterr()
    assert code == 1
    assert "FAILED" in out.out and "/nonexistent/model" in out.out + out.err


def test_entrypoint_is_the_local_command_quoted():
    assert build_entrypoint("configs/a b.yaml", ["x.y=1", "n='q r'"]) == \
        "tidal train 'configs/a b.yaml' x.y=1 'n='\"'\"'q r'\"'\"''"
    env = job_runtime_env(REPO)
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    assert env["env_vars"]["DS_ACCELERATOR"] and env["env_vars"]["OMP_NUM_THREADS"]


def test_submit_validates_locally_before_contacting_the_cluster(tmp_path):
    with pytest.raises(ConfigError, match="learner.lrr"):
        submit("configs/tiny_ppo.yaml", ["learner.lrr=1"], address="http://127.0.0.1:9", working_dir=str(REPO))
    outside = tmp_path / "c.yaml"
    outside.write_text((REPO / "configs" / "tiny_ppo.yaml").read_text())
    with pytest.raises(ConfigError, match="outside the working directory"):
        submit(str(outside), [], address="http://127.0.0.1:9", working_dir=str(REPO))
