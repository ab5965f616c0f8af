"""The actors of the GPU configs on a Ray cluster of logical GPUs (cluster.num_gpus on this CPU
machine): each lands where its config's placement puts it and starts with the device its plan
says - DeepSpeed's accelerator, the GPUs it may see, the dtype - with the model work stubbed (a
probe in each role's slot, built through the same ActorGroup and placement options the roles use).
Runs in a subprocess: the logical-GPU cluster must not collide with the test session's own Ray."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys
import ray
from tidal.actors.actor_group import ActorGroup
from tidal.actors.devices import enter_device, plan_devices
from tidal.actors.placement import Placement, plan_placement, role_counts
from tidal.common.config import ClusterConfig, load_config
from tidal.driver.runtime import ray_session

sys.path.insert(0, sys.argv[2])  # tests/: the NCCL test's own actor options
from test_cluster_weights import NCCL_ACTOR_OPTIONS


class Probe:
    """A role's slot with the model work stubbed: what the process started with, and the device the
    role's own entry (tidal.actors.devices.enter_device) makes of it."""

    def __init__(self, cfg, role):
        from deepspeed.accelerator import get_accelerator  # reads DS_ACCELERATOR once, as a learner's would

        plan = plan_devices(cfg)[role]
        try:
            device = str(enter_device(plan.device == "cuda", role))
        except RuntimeError as e:  # a GPU role on logical GPUs: Ray's grant checks out, then CUDA is absent
            device = f"error: {e}"
        self.facts = {"ds_accelerator_env": os.environ.get("DS_ACCELERATOR"),
                      "ds_accelerator": get_accelerator().device_name(),
                      "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "gpu_ids": [str(i) for i in ray.get_gpu_ids()], "dtype": plan.dtype, "device": device}

    def get(self):
        return self.facts


def facts(cfg):
    placement = Placement(plan_placement(cfg, role_counts(cfg, reference=True, reward_model=False)), 120)
    out, groups = {}, []
    try:
        for role, n in role_counts(cfg, reference=True, reward_model=False).items():
            if n == 0:
                continue
            group = ActorGroup(Probe, n, args=(cfg, role), options_fn=placement.actor_options(role), name=role)
            groups.append(group)
            out[role] = [r.get() for r in group.call(lambda a: a.get.remote(), timeout_s=300)]
    finally:
        for group in groups:
            group.shutdown()
        placement.shutdown()
    return out


configs = sys.argv[1]
cases = {
    "grpo_0.5b_1gpu": [],
    "ppo_7b_8gpu": ["learner.num_workers=2", "rollout.num_workers=2"],
    "grpo_7b_2node": ["cluster.address=null", "cluster.learner_node_resource=null", "cluster.rollout_node_resource=null",
                      "learner.num_workers=2", "rollout.num_workers=2"],
    "cpu": None,
}
out = {}
with ray_session(ClusterConfig(num_cpus=16, num_gpus=6), verbose=False):
    for name, overrides in cases.items():
        if overrides is None:  # a CPU config on the same GPU cluster
            cfg = load_config(os.path.join(configs, "tiny_grpo.yaml"), ["rollout.num_workers=1"])
        else:
            cfg = load_config(os.path.join(configs, "gpu", name + ".yaml"), overrides)
        out[name] = facts(cfg)
    nccl = ActorGroup(Probe, 3, args=(load_config(None, ["learner.gpus_per_worker=1"]), "learner"),
                      options={"num_cpus": 0, **NCCL_ACTOR_OPTIONS}, name="nccl")
    out["nccl_test"] = [r.get() for r in nccl.call(lambda a: a.get.remote(), timeout_s=300)]
    nccl.shutdown()
print("RESULT " + json.dumps(out), flush=True)
'''


@pytest.fixture(scope="module")
def landed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpuplan")
    env = {**os.environ, "TMPDIR": "/tmp"}  # Ray's socket paths stay short
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "configs"), str(REPO / "tests")], capture_output=True,
                         text=True, timeout=900, env=env, cwd=tmp)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    assert res.returncode == 0 and lines, (res.stdout[-3000:], res.stderr[-5000:])
    return json.loads(lines[0][len("RESULT "):])


def _assert_gpu_role(actor: dict) -> None:
    """A GPU role's process: DeepSpeed on CUDA, exactly Ray's GPUs visible, bf16, and its own entry
    checks pass up to the missing CUDA device (logical GPUs)."""
    assert actor["ds_accelerator_env"] == "cuda" and actor["ds_accelerator"] == "cuda", actor
    assert actor["gpu_ids"] and actor["visible"] == ",".join(actor["gpu_ids"]), actor
    assert actor["dtype"] == "bfloat16"
    assert actor["device"].startswith("error:") and "sees no CUDA device" in actor["device"], actor


@pytest.mark.ray
def test_colocated_gpu_configs_share_each_gpu_between_a_rank_and_its_engine(landed):
    one = landed["grpo_0.5b_1gpu"]
    for role in ("learner", "reference", "rollout"):
        _assert_gpu_role(one[role][0])
    assert one["learner"][0]["gpu_ids"] == one["rollout"][0]["gpu_ids"] == one["reference"][0]["gpu_ids"]
    ppo = landed["ppo_7b_8gpu"]
    ranks = [a["gpu_ids"] for a in ppo["learner"]]
    assert len({tuple(g) for g in ranks}) == 2 and all(len(g) == 1 for g in ranks)  # a GPU per DeepSpeed rank
    assert [a["gpu_ids"] for a in ppo["rollout"]] == ranks  # engine k on rank k's GPU (rollout.weight_transport=ipc)
    assert ppo["reference"][0]["gpu_ids"] == ranks[0]
    for actor in ppo["learner"] + ppo["rollout"]:
        _assert_gpu_role(actor)


@pytest.mark.ray
def test_disaggregated_gpu_config_gives_engines_gpus_of_their_own(landed):
    two = landed["grpo_7b_2node"]
    learners = {g for a in two["learner"] for g in a["gpu_ids"]}
    engines = {g for a in two["rollout"] for g in a["gpu_ids"]}
    assert len(learners) == 2 and len(engines) == 2 and not learners & engines  # NCCL: a device per rank
    for actor in two["learner"] + two["rollout"] + two["reference"]:
        _assert_gpu_role(actor)


@pytest.mark.ray
def test_cpu_actors_on_a_gpu_cluster_see_no_gpu(landed):
    for role, actors in landed["cpu"].items():
        for actor in actors:
            assert actor["ds_accelerator_env"] == actor["ds_accelerator"] == "cpu", (role, actor)
            assert actor["visible"] == "" and actor["gpu_ids"] == [] and actor["device"] == "cpu", (role, actor)
            assert actor["dtype"] == "float32"


@pytest.mark.ray
def test_the_nccl_test_puts_its_three_ranks_on_three_gpus(landed):
    gpus = [tuple(a["gpu_ids"]) for a in landed["nccl_test"]]
    assert len(set(gpus)) == 3 and all(len(g) == 1 for g in gpus)
