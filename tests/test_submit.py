"""`tidal submit` against a real `ray start --head` cluster started by the test, and its checks
before anything waits: the address, the cluster's resources, the job agent, the outputs."""

import asyncio
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from e2e_support import DATA_DIR, REPO, rl_records
from raystart_support import RayNodes, free_ports, http_get, tidal_submit, user_env
from tidal.actors.placement import plan_placement, plan_shortfall, role_counts
from tidal.commands.submit import build_entrypoint, job_runtime_env, link_loops, submit, submit_job
from tidal.common.config import ConfigError, load_config


@pytest.fixture(scope="module")
def ray_head():
    """A one-node cluster started the way Ray documents it, `ray start --head` (4 CPUs), at Ray's
    default authentication: a token exists in ~/.ray/auth_token, so the head turns token auth on."""
    nodes = RayNodes("trh-")
    try:
        address = nodes.start_head(num_cpus=4)
        assert http_get(f"{address}/api/jobs/", None)[0] == 401  # authentication really is on
        yield address, nodes.env, nodes.token
    finally:
        nodes.stop()


def _overrides(tmp_path, name, *extra):
    return [f"logging.output_dir={tmp_path}", f"logging.run_name={name}", f"data.data_dir={DATA_DIR}",
            "logging.wandb_mode=disabled", "logging.progress=false", *extra]


def _one_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stdout[-2000:] + res.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.ray
def test_submit_runs_tidal_train_as_a_job_and_reports_success(ray_head, tmp_path):
    address, env, _ = ray_head
    res = tidal_submit(env, "configs/tiny_grpo.yaml", "--address", address,  # overrides after --address
                       *_overrides(tmp_path, "job", "algorithm.steps=2", "logging.eval_samples=4"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "SUCCEEDED" in res.stdout and f"tidal: run directory {tmp_path / 'job'}" in res.stdout
    assert "python -m tidal.commands.cli train" in res.stdout
    assert [r["step"] for r in rl_records(tmp_path / "job")] == [1, 2]
    assert (tmp_path / "job" / "policy" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_submit_reports_a_failing_job(ray_head, tmp_path):
    # A hub id passes the local preflight when the user allows downloads (HF_HUB_OFFLINE=0, which
    # the job's environment carries too); the job cannot reach the hub, so it fails there, naming
    # the model. (A hub id that may not be downloaded is refused locally: tests/test_first_hour.py.)
    address, env, _ = ray_head
    env = {**{k: v for k, v in env.items() if k != "TRANSFORMERS_OFFLINE"}, "HF_HUB_OFFLINE": "0"}
    res = tidal_submit(env, "configs/tiny_grpo.yaml", "--address", address,
                       *_overrides(tmp_path, "bad", "model.policy=nobody/no-such-model"))
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "FAILED" in res.stdout and "nobody/no-such-model" in res.stdout + res.stderr


@pytest.mark.ray
@pytest.mark.parametrize("extra, says", [
    (["rollout.num_workers=5"], r"needs 7 CPUs \(learner 1 x 1, reference 1 x 1, rollout 5 x 1\) and the cluster has 4; "
                                r".*`ray start --head --num-cpus=7`"),
    (["cluster.placement=disaggregated", "cluster.rollout_node_resource=rollout_node"],
     r"no node advertises the custom resource 'rollout_node' \(cluster.rollout_node_resource\); start rollout nodes "
     r"with `ray start --address=HEAD:6379 --resources='\{\"rollout_node\": 1\}'`"),
])
def test_a_cluster_too_small_for_the_job_is_one_line_at_once(ray_head, tmp_path, extra, says):
    """Before: the job waited cluster.sync_timeout_s (300 s) for placement groups that never
    schedule, then printed a TimeoutError traceback."""
    address, env, _ = ray_head
    t0 = time.monotonic()
    res = tidal_submit(env, "configs/tiny_grpo.yaml", "--address", address, *_overrides(tmp_path, "big", *extra))
    took = time.monotonic() - t0
    line = _one_line(res)
    assert re.search(says, line), line
    assert line.startswith(f"tidal: config error: the Ray cluster at {address} cannot place this job")
    assert took < 30, took  # 4-6 s measured here (Python and Ray imports included); room for a busy machine
    assert not (tmp_path / "big").exists()


@pytest.mark.ray
def test_a_relative_output_dir_is_refused_and_the_run_directory_is_printed_absolute(ray_head, tmp_path):
    """A relative logging.output_dir lands in Ray's temporary copy of the working dir, which
    vanishes; submit refuses it, and names an unnamed run before the job starts."""
    from ray.job_submission import JobSubmissionClient

    address, env, token = ray_head
    res = tidal_submit(env, "configs/tiny_grpo.yaml", "--address", address, "logging.output_dir=runs")
    line = _one_line(res)
    assert "logging.output_dir=runs is relative" in line and f"logging.output_dir={REPO / 'runs'}" in line
    res = tidal_submit(env, "configs/tiny_grpo.yaml", "--no-wait", "--address", address,
                       f"logging.output_dir={tmp_path}", "algorithm.steps=1", f"data.data_dir={DATA_DIR}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    printed = re.search(r"tidal: run directory (\S+) \(on the cluster's storage\)", res.stdout).group(1)
    assert Path(printed).parent == tmp_path and Path(printed).name.startswith("tiny_grpo-")
    assert f"logging.run_name={Path(printed).name}" in res.stdout  # the job writes exactly there
    job = re.search(r"submitted job (\S+) to", res.stdout).group(1)
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    client.stop_job(job)  # it was only submitted to see what was printed; the head's CPUs go to the other tests
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job)).split(".")[-1] not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)


WORKER_SEES = ("import os, ray; from tidal.common.config import ClusterConfig; from tidal.driver.runtime import connect; "
               "connect(ClusterConfig(), verbose=False); "
               "names = ('DS_ACCELERATOR', 'VLLM_ENABLE_V1_MULTIPROCESSING', 'OMP_NUM_THREADS', 'NCCL_DEBUG'); "
               "print('WORKER', ray.get(ray.remote(lambda: [os.environ.get(k) for k in names]).remote()))")


@pytest.mark.ray
def test_a_job_with_a_few_env_vars_gives_its_workers_tidals_environment(ray_head):
    """A KubeRay RayJob (deploy/rayjob*.yaml) names a few variables in its runtime_env; the
    driver that joins the job's cluster adds the rest of tidal's worker environment. Before:
    a worker had only the job's, so e.g. the vLLM settings were missing. DS_ACCELERATOR is not
    shipped at all: each actor picks its own accelerator (tidal.actors.devices), so a GPU
    learner is never forced onto the CPU."""
    from ray.job_submission import JobSubmissionClient

    address, _, token = ray_head
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(entrypoint=f"{sys.executable} -c \"{WORKER_SEES}\"",
                            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN"}})
    deadline = time.monotonic() + 180
    while str(client.get_job_status(job)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert "WORKER [None, '0', '1', 'WARN']" in logs, logs[-3000:]


def test_an_address_without_a_scheme_is_one_line_at_once(tmp_path):
    """Before: `--address 127.0.0.1:PORT` hung ~45 s looking for a local Ray, then a GCS traceback."""
    t0 = time.monotonic()
    res = tidal_submit(user_env(tmp_path), "configs/tiny_grpo.yaml", "--address", "127.0.0.1:6379")
    line = _one_line(res)
    assert "--address http://127.0.0.1:8265" in line and "dashboard" in line, line
    assert time.monotonic() - t0 < 30


def _serve(app) -> tuple[asyncio.AbstractEventLoop, int]:
    """Serve an aiohttp app on a free port from a background thread; (its loop, the port)."""
    from aiohttp import web

    loop, port = asyncio.new_event_loop(), free_ports(1)[0]
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop, port


class _FakeJobServer:
    """A job server whose agent is 'not up yet' for the first `busy` submissions (what Ray's
    dashboard answers right after `ray start`), then accepts; every package already exists."""

    def __init__(self, busy: float):
        from aiohttp import web

        self.busy, self.posts = busy, 0
        app = web.Application()
        app.router.add_get("/api/version", lambda r: web.json_response({"ray_version": "2.60.0", "version": "4"}))
        app.router.add_get("/api/packages/{protocol}/{name}", lambda r: web.Response(status=200))
        app.router.add_post("/api/jobs/", self._post)
        self.loop, self.port = _serve(app)

    async def _post(self, request):
        from aiohttp import web

        self.posts += 1
        if self.posts <= self.busy:
            return web.Response(status=500, text="No available agent to submit job, please try again later.")
        return web.json_response({"job_id": "raysubmit_fake", "submission_id": "raysubmit_fake"})

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_submission_waits_for_a_job_agent_that_is_starting(monkeypatch, capsys):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    server = _FakeJobServer(busy=2)
    try:
        job = submit_job(JobSubmissionClient(f"http://127.0.0.1:{server.port}"), "true", job_runtime_env(REPO))
    finally:
        server.close()
    assert job == "raysubmit_fake" and server.posts == 3
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "job agent is not up yet" in ln]
    assert len(notes) == 1  # one note, not one per try


def test_a_job_agent_that_never_comes_up_is_one_line_after_the_bound(monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    server = _FakeJobServer(busy=float("inf"))
    t0 = time.monotonic()
    try:
        with pytest.raises(ConfigError, match=r"job agent did not come up within 2 s; check the head with `ray status`"):
            submit_job(JobSubmissionClient(f"http://127.0.0.1:{server.port}"), "true", job_runtime_env(REPO), wait_s=2)
    finally:
        server.close()
    assert 2 <= time.monotonic() - t0 < 10


def _nodes(*specs):
    return [dict(spec) for spec in specs]


def test_plan_shortfall_names_what_the_cluster_lacks():
    cfg = load_config(None, ["cluster.placement=disaggregated", "cluster.rollout_node_resource=rollout_node",
                             "cluster.learner_node_resource=learner_node", "rollout.num_workers=2",
                             "learner.cpus_per_worker=2"])
    plan = plan_placement(cfg, role_counts(cfg, reference=True, reward_model=False))  # learner bundle: 4 CPUs
    learner, rollout = {"CPU": 4.0, "learner_node": 1.0}, {"CPU": 2.0, "rollout_node": 1.0}
    assert plan_shortfall(plan, _nodes(learner, rollout)) == []
    assert "'rollout_node'" in plan_shortfall(plan, _nodes(learner, {"CPU": 8.0}))[0]
    assert "needs 4 CPU on a node with learner_node, and no node has that much" in " ".join(
        plan_shortfall(plan, _nodes({"CPU": 2.0, "learner_node": 1.0}, {"CPU": 2.0, "learner_node": 1.0}, rollout)))
    assert "the nodes with 'rollout_node' have 1" in plan_shortfall(plan, _nodes(learner, {"CPU": 1.0, "rollout_node": 1}))[0]
    gpu = load_config(None, ["learner.gpus_per_worker=1"])
    missing = plan_shortfall(plan_placement(gpu, role_counts(gpu, reference=True)), _nodes({"CPU": 8.0}))
    # colocated: learner, reference, reward model and rollout worker share one bundle
    assert "needs 4 CPU, 1 GPU" in missing[0] and "`ray start ... --num-cpus=4 --num-gpus=1`" in missing[0], missing


def test_a_link_back_into_the_working_dir_is_not_uploaded(tmp_path):
    """Ray's upload follows links: a link to the folder itself (e.g. kept for PYTHONPATH) would be
    packed again inside itself until paths hit the length limit."""
    (tmp_path / "configs").mkdir()
    (tmp_path / ".pkg").mkdir()
    (tmp_path / ".pkg" / "tidal").symlink_to(tmp_path)
    (tmp_path / "up").symlink_to(tmp_path.parent)
    (tmp_path / "cfg").symlink_to(tmp_path / "configs")  # into the folder, not above it: uploaded
    assert sorted(link_loops(tmp_path)) == ["/.pkg/tidal", "/up"]
    assert "/.pkg/tidal" in job_runtime_env(tmp_path)["excludes"]


def test_submit_refuses_data_that_would_not_be_uploaded(tmp_path):
    local = REPO / "runs" / f"not-uploaded-{uuid.uuid4().hex[:8]}.jsonl"
    local.parent.mkdir(exist_ok=True)
    local.write_text('{"prompt": "hi"}\n')
    try:
        with pytest.raises(ConfigError, match=r"data.prompts=runs/not-uploaded-.* is under runs, which `tidal submit` "
                                              r"does not upload"):
            submit("configs/tiny_grpo.yaml", ["data.task=null", f"data.prompts={local.relative_to(REPO)}",
                                              f"logging.output_dir={tmp_path}"],
                   address="http://127.0.0.1:9", working_dir=str(REPO))
    finally:
        local.unlink()


def test_submit_without_a_token_says_what_to_set(tmp_path):
    """A job server that wants a token this client does not have: one line naming what to set."""
    from aiohttp import web

    async def deny(request):
        return web.Response(status=401, text="Unauthorized: Missing authentication token")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", deny)
    loop, port = _serve(app)
    try:
        env = {**user_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"}
        res = tidal_submit(env, "configs/tiny_grpo.yaml", "--address", f"http://127.0.0.1:{port}",
                           f"logging.output_dir={tmp_path}")
    finally:
        loop.call_soon_threadsafe(loop.stop)
    line = _one_line(res)
    assert "RAY_AUTH_TOKEN" in line and "ray get-auth-token" in line, line


def test_entrypoint_runs_tidal_through_python_quoted():
    assert build_entrypoint("configs/a b.yaml", ["x.y=1", "n='q r'"]) == \
        "python -m tidal.commands.cli train 'configs/a b.yaml' x.y=1 'n='\"'\"'q r'\"'\"''"
    assert build_entrypoint(None, ["cluster.rollout_node_resource=null"], resume="/data/runs/a") == \
        "python -m tidal.commands.cli train --resume /data/runs/a cluster.rollout_node_resource=null"
    env = job_runtime_env(REPO)
    assert env["working_dir"] == str(REPO) and ".venv" in env["excludes"]
    assert env["env_vars"]["PATH"] == f"{Path(sys.executable).parent}:${{PATH}}"
    assert env["env_vars"]["OMP_NUM_THREADS"] and "DS_ACCELERATOR" not in env["env_vars"]  # each actor's own (tidal.actors.devices)


def test_submit_validates_locally_before_contacting_the_cluster(tmp_path):
    with pytest.raises(ConfigError, match="learner.lrr"):
        submit("configs/tiny_ppo.yaml", ["learner.lrr=1"], address="http://127.0.0.1:9", working_dir=str(REPO))
    outside = tmp_path / "c.yaml"
    outside.write_text((REPO / "configs" / "tiny_ppo.yaml").read_text())
    with pytest.raises(ConfigError, match="outside the working directory"):
        submit(str(outside), [f"logging.output_dir={tmp_path}"], address="http://127.0.0.1:9", working_dir=str(REPO))
    with pytest.raises(ConfigError, match="--resume runs/r: pass the run's absolute directory"):
        submit(None, [], address="http://127.0.0.1:9", working_dir=str(REPO), resume="runs/r")


def test_a_resume_may_move_the_run_to_other_nodes(tmp_path):
    """A rollout node died: the run resumes on the nodes left, which needs cluster.* overrides."""
    from tidal.commands.train import resume_config
    from tidal.common.config import to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, [
        "cluster.placement=disaggregated", "cluster.rollout_node_resource=rollout_node"])))
    cfg = resume_config(tmp_path, ["cluster.rollout_node_resource=null", "cluster.node_wait_s=60"])
    assert cfg.cluster.rollout_node_resource is None and cfg.cluster.node_wait_s == 60
