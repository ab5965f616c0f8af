"""Threads per role (tidal.actors.threads): pure logic, plus one Ray test that the counts reach
the actors. (The choice of pi_old's source, which decides whether the reference forward runs
alone, is tested in tests/test_learner_pi_old.py.)"""

from __future__ import annotations

import pytest
import torch

from tidal.actors import threads
from tidal.actors.threads import ThreadPlan, apply_threads, plan_threads, threads_during
from tidal.common.config import load_config


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_sync_roles_take_turns_and_each_splits_the_whole_machine():
    cfg = _cfg("rollout.num_workers=2", "learner.num_workers=4", "learner.mini_batch_size=16", "reward.num_workers=1")
    # the learner ranks' forward beside the reference: the reference's share, 16 // 5
    assert plan_threads(cfg, 16) == ThreadPlan(rollout=8, reward=16, learner=4, reference=3, learner_forward=3)
    # the reference alone in the forward phase (engine old logprobs, no critic): all cores
    assert plan_threads(cfg, 16, reference_alone=True).reference == 16
    assert plan_threads(_cfg(), 1) == ThreadPlan(1, 1, 1, 1, 1)  # never zero
    # the 2-core default: a rank updates on 2 threads, and computes beside the reference on 1
    assert plan_threads(_cfg("learner.num_workers=1"), 2) == ThreadPlan(2, 2, 2, 1, 1)


def test_async_splits_the_cores_between_the_sides_by_their_logical_cpus():
    cfg = _cfg("algorithm.mode=async", "rollout.num_workers=1", "rollout.cpus_per_worker=1",
               "learner.num_workers=2", "learner.cpus_per_worker=1.5")
    plan = plan_threads(cfg, 16)  # rollout side 16 * 1/4 = 4, learner side 12
    assert plan == ThreadPlan(rollout=4, reward=4, learner=6, reference=4, learner_forward=4)
    assert plan_threads(cfg, 16, reference_alone=True).reference == 12
    assert plan_threads(cfg, 2) == ThreadPlan(1, 1, 1, 1, 1)  # each side keeps at least one core


def test_settings_override_the_plan_and_a_joined_cluster_uses_reserved_cpus():
    cfg = _cfg("rollout.num_threads=3", "learner.num_threads=5", "reward.num_threads=7")
    assert plan_threads(cfg, 64) == ThreadPlan(rollout=3, reward=7, learner=5, reference=5, learner_forward=5)
    joined = _cfg("rollout.cpus_per_worker=4", "learner.cpus_per_worker=2")
    assert plan_threads(joined, None) == ThreadPlan(rollout=4, reward=2, learner=2, reference=2, learner_forward=2)


def test_apply_threads_leaves_a_process_that_is_not_a_ray_actor_alone():
    before = torch.get_num_threads()
    assert apply_threads(before + 3) == before


def test_threads_during_switches_inside_an_actor_and_goes_back(monkeypatch):
    before = torch.get_num_threads()
    with threads_during(before + 1):  # not a Ray actor: left alone
        assert torch.get_num_threads() == before
    monkeypatch.setattr(threads, "_in_ray_actor", lambda: True)
    try:
        with threads_during(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before
        with threads_during(0):  # 0: leave them
            assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


@pytest.mark.ray
def test_thread_counts_reach_the_learner_and_reference_actors(ray_cluster, tiny_model):
    from tidal.learner.group import LearnerGroup

    cfg = _cfg("learner.num_workers=1", "learner.num_threads=2", "learner.mini_batch_size=4",
               "learner.micro_batch_size=2", "cluster.sync_timeout_s=120")
    group = LearnerGroup(cfg, tiny_model, reference_path=tiny_model)
    try:
        assert group.describe()[0]["num_threads"] == 2  # Ray workers start with OMP_NUM_THREADS=1
        assert group.describe()[0]["forward_threads"] == 2  # the override holds in the forward phase too
        assert group.reference.collect(group.reference.start(lambda a: a.describe.remote()))[0].value["num_threads"] == 2
    finally:
        group.shutdown()
