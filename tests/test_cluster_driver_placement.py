"""Placement on several Ray nodes (ray.cluster_utils.Cluster on this machine): disaggregated
rollout bundles land on rollout nodes, learner-side bundles on learner nodes; the rollout side
grows without touching the learners. Runs in a subprocess: the multi-node cluster must not
collide with the test session's own Ray."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

SCRIPT = r'''
import json, sys
import ray
from ray.cluster_utils import Cluster
from tidal.actors.placement import Placement, plan_placement, role_counts
from tidal.common.config import load_config

temp_dir, ports = sys.argv[1], [int(p) for p in sys.argv[2].split(",")]
cluster = Cluster(initialize_head=True, head_node_args=dict(
    num_cpus=1, temp_dir=temp_dir, include_dashboard=False, dashboard_agent_listen_port=ports[0]))
learner_node = cluster.add_node(num_cpus=4, resources={"learner_node": 1})
rollout_node = cluster.add_node(num_cpus=4, resources={"rollout_node": 1})
ray.init(address=cluster.address)

@ray.remote
class Probe:
    def node(self):
        return ray.get_runtime_context().get_node_id()

def where(placement, role, i):
    actor = Probe.options(**placement.options(role, i)).remote()
    node = ray.get(actor.node.remote(), timeout=120)
    ray.kill(actor)
    return node

out = {"learner_node": learner_node.node_id, "rollout_node": rollout_node.node_id,
       "head": cluster.head_node.node_id}
for mode in ("disaggregated", "colocated"):
    cfg = load_config(None, [f"cluster.placement={mode}", "cluster.rollout_node_resource=rollout_node",
                             "cluster.learner_node_resource=learner_node", "rollout.num_workers=2",
                             "learner.num_workers=2", "learner.mini_batch_size=8"])
    placement = Placement(plan_placement(cfg, role_counts(cfg, reference=True, reward_model=False)), 120)
    nodes = {"learner": [where(placement, "learner", i) for i in range(2)],
             "reference": [where(placement, "reference", 0)],
             "rollout": [where(placement, "rollout", i) for i in range(2)]}
    options = placement.actor_options("rollout")
    actor = Probe.options(**options(2)).remote()  # the pool grows to 3 workers: a new group of its own
    nodes["rollout_added"] = [ray.get(actor.node.remote(), timeout=120)]
    nodes["groups_grown"] = sorted(placement.pgs)
    ray.kill(actor)
    options.release(2)  # ... and shrinks back: the group is freed
    nodes["groups"] = sorted(placement.pgs)
    placement.shutdown()
    out[mode] = nodes
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
cluster.shutdown()
'''


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_disaggregated_rollout_bundles_land_on_rollout_nodes():
    temp_dir = tempfile.mkdtemp(prefix="tpl-")
    # Cluster() writes RAY_TMPDIR/ray/ray_current_cluster (default /tmp/ray, which exists only where
    # Ray ran before, and is shared with other clusters): a private folder, made here, works on a
    # fresh machine and leaves the machine's /tmp/ray alone.
    ray_tmp = tempfile.mkdtemp(prefix="tpl-raytmp-")
    os.makedirs(os.path.join(ray_tmp, "ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, temp_dir, str(_free_port())], env=env,
                              capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(lines[0][len("RESULT "):])
    dis = res["disaggregated"]
    assert set(dis["learner"] + dis["reference"]) == {res["learner_node"]}
    assert set(dis["rollout"] + dis["rollout_added"]) == {res["rollout_node"]}
    assert dis["groups_grown"] == ["learner", "rollout-0", "rollout-1", "rollout-2"]
    assert dis["groups"] == ["learner", "rollout-0", "rollout-1"]
    # colocated: one shared group; nothing asks for the node resources
    assert res["colocated"]["groups"] == ["shared"]
    assert res["colocated"]["groups_grown"] == ["rollout-2", "shared"]  # an added worker gets its own group
