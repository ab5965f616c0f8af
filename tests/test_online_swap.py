"""A reward-model version travels from the online reward learner to the reward workers the way
the policy's weights travel (a weight transport), without Ray: a reward-role learner rank
(real DeepSpeed, in-process) publishes its value model, a reward worker hot-swaps to it between
scoring calls and then scores (and extracts features) exactly as the learner does; a worker
restarted after the swap loads the new version's folder, not the first one."""

from __future__ import annotations

import pytest
import torch

from reward_fixtures import make_reward_model
from tidal.actors.weights import InProcessTransport
from tidal.common.config import load_config
from tidal.common.data import ComparisonRecord
from tidal.learner.group import LearnerGroup
from tidal.learner.reward_model import build_preference_batch
from tidal.reward_service.worker import RewardInput, RewardPool

PROMPTS = ["Tell me about rain.", "Review the film:"]
COMPLETIONS = ["It was lovely and warm.", "Awful, just awful."]


@pytest.fixture(scope="module", autouse=True)
def _leave_no_process_group():
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def test_a_published_version_hot_swaps_into_the_reward_workers(tiny_model, tmp_path):
    v0 = make_reward_model(tiny_model, tmp_path / "v0", seed=0, extra={"reward_mean": 0.0, "reward_std": 1.0})
    cfg = load_config(None, ["learner.num_workers=1", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
                             "learner.lr=5e-3"])
    group = LearnerGroup(cfg, v0, role="reward", local=True)
    pool = RewardPool(v0, local=True)
    try:
        batch = build_preference_batch(group.tokenizer, [ComparisonRecord(p, c, "no.") for p in PROMPTS
                                                         for c in COMPLETIONS], 16, 16, False)
        before = pool.score(RewardInput(PROMPTS, COMPLETIONS))
        fit = group.fit_reward(batch, None, loss="pairwise", max_steps=3)
        v1 = group.save_pretrained(tmp_path / "v1", extra={"reward_mean": fit.reward_mean,
                                                           "reward_std": fit.reward_std, "version": 1})
        handle = group._call("export_reward_weights", lambda a: a.export_reward_weights.remote(
            1, 1, InProcessTransport()))[0]  # 1 MB buckets: several of them
        assert handle.version == 1 and len(handle.bucket_refs) > 1
        assert pool.load_version(handle, str(v1), fit.reward_mean, fit.reward_std) == 1

        data = RewardInput(PROMPTS, COMPLETIONS)
        ids = [pool.group.actor(0).obj.encode(data)[i] for i in range(2)]  # what the worker reads
        mask = torch.ones(2, max(map(len, ids)), dtype=torch.long)
        padded = torch.zeros_like(mask)
        for i, s in enumerate(ids):
            padded[i, :len(s)] = torch.tensor(s)
            mask[i, len(s):] = 0
        learner = (group.compute_scores(padded, mask) - fit.reward_mean) / fit.reward_std
        after = pool.score(data)
        assert not torch.allclose(after, before) and torch.allclose(after, learner, atol=1e-5)
        assert torch.allclose(pool.features(data), group.compute_features(padded, mask), atol=1e-5)

        pool.group.mark_unhealthy(0)  # a worker lost after the swap comes back with version 1
        assert torch.allclose(pool.score(data), learner, atol=1e-5)
        assert pool.group.actor(0).obj.version == 1
    finally:
        pool.shutdown()
        group.shutdown()
