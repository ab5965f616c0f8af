"""The same fault tests for the role groups on the one actor layer: a worker killed in the middle
of a call is named at once (learner) or restarted with its work redone (reward pool), and local
mode. (The rollout pool's versions of these live in test_rollout_pool.py: kill mid-batch, restart
with the current weights, local mode.) A learner group is not restarted in place: a process group
cannot take back one member, so a run that lost a rank resumes from its checkpoint."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from reward_fixtures import make_reward_model

from tidal.common.config import load_config
from tidal.common.data import DemonstrationRecord
from tidal.learner.group import LearnerError, LearnerGroup
from tidal.learner.sft import build_sft_batch
from tidal.reward_service.worker import RewardInput, RewardPool, RewardWorker

pytestmark = pytest.mark.ray


def _kill_during(call, kill, delay_s: float):
    """Run call() in a thread, kill a worker after delay_s, return (result or error, seconds)."""
    out = {}

    def run():
        t0 = time.perf_counter()
        try:
            out["value"] = call()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            out["error"] = e
        out["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(delay_s)
    kill()
    thread.join(timeout=300)
    return out


def test_learner_rank_killed_mid_call_is_named_at_once(ray_cluster, tiny_model):
    import ray

    cfg = load_config(None, ["learner.num_workers=2", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
                             "learner.zero_stage=2", "cluster.sync_timeout_s=120"])
    group = LearnerGroup(cfg, tiny_model)
    try:
        recs = [DemonstrationRecord(f"Review {i}:", "It was lovely, thanks!") for i in range(64)]
        demos = build_sft_batch(group.tokenizer, recs, 32, 16, use_chat_template=False)
        # enough epochs that the fit cannot end before the kill on a fast machine (8 epochs took 2.7 s)
        out = _kill_during(lambda: group.fit_sft(demos, epochs=400), lambda: ray.kill(group.ranks.actor(1)), 3.0)
        assert isinstance(out.get("error"), LearnerError) and "learner rank 1/2 died" in str(out["error"])
        assert out["seconds"] < 60  # fail-fast: not after rank 0 times out in the collective (120 s)
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def rm_path(tiny_model, tmp_path_factory):
    return make_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "rm")


def test_reward_worker_killed_mid_call_is_restarted_and_its_chunk_rescored(ray_cluster, rm_path):
    import ray

    batch = RewardInput([f"prompt {i} " * 30 for i in range(3000)], [f"answer {i} " * 20 for i in range(3000)])
    expected = RewardWorker(str(rm_path), micro_batch_size=16).score(batch)
    pool = RewardPool(rm_path, num_workers=2, micro_batch_size=4, timeout_s=120)
    try:
        assert pool.group.restarts(0) == 0
        out = _kill_during(lambda: pool.score(batch), lambda: ray.kill(pool.group.actor(0)), 1.0)
        assert "error" not in out, out.get("error")
        torch.testing.assert_close(out["value"], expected, atol=1e-5, rtol=1e-5)  # every row, once, in order
        assert pool.group.restarts(0) == 1 and pool.group.num_healthy == 2
    finally:
        pool.shutdown()


def test_reward_pool_local_mode_runs_in_process(rm_path):
    pool = RewardPool(rm_path, num_workers=3, local=True)  # local: one in-process worker, no Ray
    batch = RewardInput(["a", "b", "c"], ["x", "y", "z"])
    assert pool.num_workers == 1 and pool.group.local
    torch.testing.assert_close(pool.score(batch), RewardWorker(str(rm_path)).score(batch))
    pool.shutdown()
