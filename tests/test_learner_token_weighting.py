"""One optimizer step does not depend on how its minibatch is split: micro-batch 4 vs 16 on one
rank, and 1 vs 2 data-parallel ranks, give the same parameters (every token of the minibatch
weighs the same, for the SFT loss and the RL losses alike)."""

from __future__ import annotations

import pytest
import torch

from tidal.common.config import load_config
from tidal.common.data import DemonstrationRecord
from tidal.common.types import Experience
from tidal.learner.group import LearnerGroup
from tidal.learner.sft import build_sft_batch

BASE = ["learner.zero_stage=0", "learner.mini_batch_size=16", "learner.lr=1e-2", "learner.critic_lr=1e-2",
        "learner.lr_schedule=constant", "algorithm.update_epochs=1", "learner.max_grad_norm=0", "rollout.n_samples=1"]
WORDS = ["great", "truly wonderful and moving, a delight from start to end", "ok", "lovely, thanks"]


def _demos(tokenizer):
    # responses of very different lengths: a per-micro-batch token mean would weigh them unequally
    recs = [DemonstrationRecord(f"Review {i}:", WORDS[i % 4] + (" really" * (i % 5))) for i in range(16)]
    return build_sft_batch(tokenizer, recs, 32, 32, use_chat_template=False)


def _experience(group, demos) -> Experience:
    R = demos.response_len
    old = group.compute_logprobs(demos.input_ids, demos.attention_mask, R, 1.0)
    adv = torch.linspace(-1, 1, len(demos))[:, None] * demos.response_mask
    zeros = torch.zeros_like(adv)
    return Experience(demos.input_ids, demos.attention_mask, demos.response_mask, old, old, adv, zeros, zeros,
                      torch.zeros(len(demos)))


def _one_step(tiny_model, local, *overrides, rl=False):
    cfg = load_config(None, BASE + ["algorithm.name=grpo" if rl else "algorithm.name=ppo"] + list(overrides)
                      + (["rollout.n_samples=2"] if rl else []))
    group = LearnerGroup(cfg, tiny_model, local=local)
    try:
        demos = _demos(group.tokenizer)
        if rl:
            group.update_rl(_experience(group, demos))
        else:
            group.fit_sft(demos, max_steps=1)
        return group.parameter_snapshots()[0]
    finally:
        group.shutdown()


def _assert_same(a, b):
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("rl", [False, True], ids=["sft", "rl"])
def test_micro_batch_size_does_not_change_the_step(tiny_model, rl):
    small = _one_step(tiny_model, True, "learner.micro_batch_size=4", "learner.num_workers=1", rl=rl)
    whole = _one_step(tiny_model, True, "learner.micro_batch_size=16", "learner.num_workers=1", rl=rl)
    _assert_same(small, whole)


@pytest.mark.ray
def test_two_ranks_take_the_same_step_as_one(ray_cluster, tiny_model):
    one = _one_step(tiny_model, True, "learner.micro_batch_size=16", "learner.num_workers=1")
    two = _one_step(tiny_model, False, "learner.micro_batch_size=4", "learner.num_workers=2")
    _assert_same(one, two)
