"""One optimizer step does not depend on how its minibatch is split: micro-batch 4 vs 16 on one
rank, and 1 vs 2 data-parallel ranks, give the same step (every token of the minibatch weighs the
same for the SFT loss and the RL losses; every DPO pair weighs its weight), and the step IS the
gradient of the whole minibatch's loss (the SFT token mean, DPO's weighted mean over pairs),
computed here by plain torch autograd on the model file.

The optimizer is AdamW with eps = 1e4, far above every gradient entry: its first step is
-lr * g / (|g| + eps) ~ -(lr / eps) g, plain SGD, linear in the gradient, so a wrong uniform loss
scale (a micro-batch count or the world size missing from LearnerWorker.token_scale, a weight
total floored at 1) moves every entry of the step by that factor. With the default eps = 1e-5 the
first AdamW step is ~ -lr * sign(g), the same for any scale, and such a bug shows only on the
few entries whose |g| is near 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from tidal.common.config import load_config
from tidal.common.data import ComparisonRecord, DemonstrationRecord
from tidal.common.models import load_causal_lm, sequence_logprobs
from tidal.common.types import Experience
from tidal.learner.dpo import build_dpo_batch, dpo_batch_loss, sequence_logps
from tidal.learner.group import LearnerGroup
from tidal.learner.losses import sft_loss
from tidal.learner.sft import build_sft_batch

LR, EPS, BETA = 1e3, 1e4, 0.5  # step = -LR * g / (|g| + EPS) ~ -0.1 g
BASE = ["learner.zero_stage=0", "learner.mini_batch_size=16", f"learner.lr={LR}", f"learner.critic_lr={LR}",
        f"learner.adam_eps={EPS}", "learner.lr_schedule=constant", "algorithm.update_epochs=1", "learner.max_grad_norm=0",
        "rollout.n_samples=1", f"stages.dpo.beta={BETA}"]
WORDS = ["great", "truly wonderful and moving, a delight from start to end", "ok", "lovely, thanks"]


def _demos(tokenizer):
    # responses of very different lengths: a per-micro-batch token mean would weigh them unequally
    recs = [DemonstrationRecord(f"Review {i}:", WORDS[i % 4] + (" really" * (i % 5))) for i in range(16)]
    return build_sft_batch(tokenizer, recs, 32, 32, use_chat_template=False)


def _pairs(tokenizer):
    """16 pairs weighing what the comparisons export gives the pairs of a K = 9 ranking (1/36) and
    of a K = 3 one (1/3): micro-batches of unequal weight, 0.75 in all (less than 1)."""
    recs = [ComparisonRecord(f"Review {i}:", WORDS[i % 4] + " really" * (i % 3), WORDS[(i + 1) % 4],
                             1 / 3 if i == 5 else 1 / 36) for i in range(16)]
    return build_dpo_batch(tokenizer, recs, 32, 32, use_chat_template=False)


def _experience(group, demos) -> Experience:
    R = demos.response_len
    old = group.compute_logprobs(demos.input_ids, demos.attention_mask, R, 1.0)
    adv = torch.linspace(-1, 1, len(demos))[:, None] * demos.response_mask
    zeros = torch.zeros_like(adv)
    return Experience(demos.input_ids, demos.attention_mask, demos.response_mask, old, old, adv, zeros, zeros,
                      torch.zeros(len(demos)))


def _one_step(tiny_model, local, kind, *overrides) -> dict[str, torch.Tensor]:
    """The parameter change of one optimizer step of `kind` (sft | rl | dpo) on 16 rows/pairs."""
    rl = kind == "rl"
    cfg = load_config(None, BASE + ["algorithm.name=grpo" if rl else "algorithm.name=ppo"] + list(overrides)
                      + (["rollout.n_samples=2"] if rl else []))
    group = LearnerGroup(cfg, tiny_model, local=local)
    try:
        before = group.parameter_snapshots()[0]
        if kind == "rl":
            group.update_rl(_experience(group, _demos(group.tokenizer)))
        elif kind == "sft":
            group.fit_sft(_demos(group.tokenizer), max_steps=1)
        else:
            group.fit_dpo(_pairs(group.tokenizer), max_steps=1)
        return {k: v - before[k] for k, v in group.parameter_snapshots()[0].items()}
    finally:
        group.shutdown()


def _assert_same(step, want):
    """Equal steps, to 1e-4 of the largest entry (float32 parameters hold a step to ~1e-6 of it)."""
    assert step.keys() == want.keys()
    size = max(v.abs().max().item() for v in want.values())
    worst = max((step[k] - want[k]).abs().max().item() for k in want)
    assert size > 1e-4 and worst < 1e-4 * size, (worst, size)


def _autograd_step(tiny_model, tokenizer, kind) -> dict[str, torch.Tensor]:
    """The AdamW first step -LR * g / (|g| + EPS) for g = the gradient of the whole minibatch's
    loss, from the model file by plain autograd (no DeepSpeed, no micro-batches)."""
    model = load_causal_lm(tiny_model)
    if kind == "sft":
        demos = _demos(tokenizer)
        lp = sequence_logprobs(model, demos.input_ids, demos.attention_mask, demos.response_len)
        loss = sft_loss(lp, demos.response_mask)
    else:
        pairs = _pairs(tokenizer)
        with torch.no_grad():  # the reference: the same model before the step
            ref = sequence_logps(sequence_logprobs(model, pairs.input_ids, pairs.attention_mask, pairs.response_len),
                                 pairs.response_mask)
        lp = sequence_logprobs(model, pairs.input_ids, pairs.attention_mask, pairs.response_len)
        loss, _ = dpo_batch_loss(lp, pairs.with_reference(ref), BETA)
    loss.backward()
    return {n: -LR * p.grad / (p.grad.abs() + EPS) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["sft", "rl", "dpo"])
def test_micro_batch_size_does_not_change_the_step(tiny_model, kind):
    small = _one_step(tiny_model, True, kind, "learner.micro_batch_size=4", "learner.num_workers=1")
    whole = _one_step(tiny_model, True, kind, "learner.micro_batch_size=16", "learner.num_workers=1")
    _assert_same(small, whole)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_the_step_is_the_gradient_of_the_minibatch_loss(tiny_model, kind):
    from tidal.common.models import load_tokenizer

    step = _one_step(tiny_model, True, kind, "learner.micro_batch_size=4", "learner.num_workers=1")
    _assert_same(step, _autograd_step(tiny_model, load_tokenizer(tiny_model), kind))


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_ranks_take_the_same_step_as_one(ray_cluster, tiny_model, kind):
    one = _one_step(tiny_model, True, kind, "learner.micro_batch_size=16", "learner.num_workers=1")
    two = _one_step(tiny_model, False, kind, "learner.micro_batch_size=4", "learner.num_workers=2")
    _assert_same(one, two)
