"""A job on a real multi-node Ray cluster: a head and two worker nodes, each its own `ray start`
on this machine (tests/raystart_support.py), `tidal submit` of a tiny GRPO run with
disaggregated placement, and the rollout node killed mid-run.

What tidal does when the only rollout node dies: the pool restarts the lost worker, which waits
for a node with room for it (an autoscaler or KubeRay may bring one); when none comes within
cluster.node_wait_s the run stops with one line naming the lost workers, its newest
checkpoint and the resume command, and the job fails (exit 1). The run then resumes from that
checkpoint on the nodes that are left (`tidal submit --resume RUN`, with a cluster.* override
that no longer pins the rollout side to the dead node's resource) and finishes every step once.

Why minutes: three `ray start` nodes (~15 s each), two job starts (vLLM engine and DeepSpeed
ranks, ~30-60 s each on a 2-core machine), the bounded wait for the lost worker
(cluster.node_wait_s below) and the steps themselves.
"""

import json
import time

import pytest

from e2e_support import rl_records, tiny_overrides
from raystart_support import RayNodes, tidal_submit

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STEPS = 6
WAIT_S = 10  # cluster.node_wait_s: how long the job waits for a replacement of the lost rollout node


def _overrides(out, name):
    return tiny_overrides(out, name, f"algorithm.steps={STEPS}", "logging.checkpoint_every=1", "logging.eval_samples=4",
                          "cluster.placement=disaggregated", "cluster.learner_node_resource=learner_node",
                          "cluster.rollout_node_resource=rollout_node", f"cluster.node_wait_s={WAIT_S}")


def _wait_for_checkpoint(proc, run, step, timeout_s=600):
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and int(latest.read_text().strip().split("-")[1]) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step-{step} checkpoint before the job ended:\n{proc.stdout.read()[-4000:]}")


def test_rollout_node_lost_mid_run_stops_clearly_and_resumes_on_the_nodes_left(tmp_path):
    nodes = RayNodes("tmn-")
    run = tmp_path / "mn"
    try:
        address = nodes.start_head(num_cpus=0)  # the job's driver only, as in deploy/rayjob.yaml
        learner = nodes.add_worker(3, {"learner_node": 1})  # learner rank + reference; one CPU spare
        rollout = nodes.add_worker(1, {"rollout_node": 1})
        proc = tidal_submit(nodes.env, "configs/tiny_grpo.yaml", "--address", address,
                            *_overrides(tmp_path, "mn"), wait=False)
        _wait_for_checkpoint(proc, run, 2)
        where = json.loads((run / "placement.json").read_text())["roles"]
        assert set(where["learner"] + where["reference"]) == {learner.node_id}
        assert where["rollout"] == [rollout.node_id]
        nodes.kill(rollout)
        out, _ = proc.communicate(timeout=WAIT_S + 300)  # without the bound: a hang (until the pipeline's 4 x sync_timeout_s)
        assert proc.returncode == 1, out[-4000:]
        assert f"tidal: run directory {run} (on the cluster's storage)" in out  # printed before the job ran
        stop = next(ln for ln in out.splitlines() if "were lost and none restarted" in ln)
        assert "rollout-0" in stop and f"tidal submit --resume {run} --address" in stop, stop
        stopped_at = max(r["step"] for r in rl_records(run))
        assert 2 <= stopped_at < STEPS, out[-3000:]

        res = tidal_submit(nodes.env, "--resume", str(run), "--address", address,
                           "cluster.rollout_node_resource=null")  # the rollout worker takes the spare CPU
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
        assert "SUCCEEDED" in res.stdout
        assert json.loads((run / "placement.json").read_text())["roles"]["rollout"] == [learner.node_id]
    finally:
        nodes.stop()
    # every step trained exactly once across the two jobs, and the outputs outlive the cluster
    assert [r["step"] for r in rl_records(run)] == list(range(1, STEPS + 1))
    assert (run / "policy" / "config.json").is_file() and (run / "summary.json").is_file()
