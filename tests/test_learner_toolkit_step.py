"""Every setting of the policy-gradient toolkit reaches the optimizer step: one RL step, split in
4 micro-batches on a local learner, is the gradient of the whole minibatch's loss as the config
asks for it (the entry's loss, algorithm.loss_agg, clip_eps_high, overlong_filter, the mismatch
correction), computed by plain autograd on the model file; and that loss's step differs from the
default config's, so a setting the update ignored would fail its case. The step arithmetic
(AdamW with a huge eps: the step is -(lr / eps) x the gradient) is tests/test_learner_token_weighting.py's."""

from __future__ import annotations

import pytest
import torch

from test_learner_token_weighting import BASE, EPS, LR, _assert_same, _demos
from tidal.common.config import load_config
from tidal.common.models import load_causal_lm, load_tokenizer, sequence_logprobs
from tidal.learner.algorithms import algorithm_for, clip_range, loss_aggregation
from tidal.learner.experience import ForwardPass, assemble_experience
from tidal.learner.group import LearnerGroup
from tidal.learner.losses import Aggregation
from tidal.learner.mismatch import correction_for
from tidal.learner.rl import train_mask

DEFAULT = ("algorithm.name=grpo",)
CASES = [
    ("algorithm.loss_agg=seq_mean_token_mean",),
    ("algorithm.loss_agg=seq_mean_token_sum", "rollout.max_new_tokens=20"),
    ("algorithm.clip_eps_high=0.6",),
    ("algorithm.name=gspo", "algorithm.clip_eps=0.02"),
    ("algorithm.name=cispo", "algorithm.clip_eps_high=0.1"),
    ("algorithm.name=dr_grpo",),
    ("algorithm.name=reinforce_pp", "algorithm.whiten_advantages=false"),
    ("algorithm.overlong_filter=true",),
    ("algorithm.mismatch_correction=tis", "algorithm.mismatch_threshold=1.2"),
    ("algorithm.mismatch_correction=seq_mask", "algorithm.mismatch_threshold=3"),
    ("algorithm.mismatch_correction=icepop", "algorithm.mismatch_threshold=1.3"),
]


def _cfg(*overrides):
    return load_config(None, BASE + ["rollout.n_samples=2", "learner.micro_batch_size=4", *DEFAULT, *overrides])


def _forward(tiny_model) -> ForwardPass:
    """16 rows of very different lengths; pi_old off the current policy by ~0.4 nats (ratios
    reach the clip ranges), the engine off pi_old by ~0.3, every third response truncated."""
    demos = _demos(load_tokenizer(tiny_model))
    model = load_causal_lm(tiny_model)
    with torch.no_grad():
        lp = sequence_logprobs(model, demos.input_ids, demos.attention_mask, demos.response_len)
    gen = torch.Generator().manual_seed(0)
    mask = demos.response_mask
    old = (lp + 0.4 * torch.randn(lp.shape, generator=gen)) * mask
    engine = (old + 0.3 * torch.randn(lp.shape, generator=gen)) * mask
    return ForwardPass(demos.input_ids, demos.attention_mask, mask, old_logprobs=old, ref_logprobs=old,
                       rollout_logprobs=engine, truncated=torch.arange(len(mask)) % 3 == 0)


SCORES = torch.tensor([0.1, 0.9, -0.5, 0.3, 1.0, 0.2, -1.0, 0.0, 0.4, 0.6, -0.2, 0.8, 0.5, 0.7, -0.3, 0.1])


def _experience(cfg, fwd):
    a = cfg.algorithm
    return assemble_experience(fwd, SCORES, algorithm_for(cfg), cfg.rollout.n_samples, 0.0, a.kl_estimator,
                               a.gamma, a.lam, a.whiten_advantages, overlong_filter=a.overlong_filter)


def _learner_step(tiny_model, cfg, fwd):
    """The parameter change of one update_rl on a local learner, the experience assembled by the group."""
    group = LearnerGroup(cfg, tiny_model, local=True)
    try:
        exp, _ = group.assemble(fwd, SCORES, 0.0)
        before = group.parameter_snapshots()[0]
        group.update_rl(exp, correction=correction_for(cfg, off_policy=False))
        return {k: v - before[k] for k, v in group.parameter_snapshots()[0].items()}
    finally:
        group.shutdown()


def _autograd_step(tiny_model, cfg, fwd):
    """-LR g / (|g| + EPS) for g the gradient of the configured loss over the whole minibatch."""
    exp = _experience(cfg, fwd)
    model = load_causal_lm(tiny_model)
    lp = sequence_logprobs(model, exp.input_ids, exp.attention_mask, exp.response_mask.shape[1])
    mask = train_mask(exp)
    correction = correction_for(cfg, off_policy=False)
    weights = None if correction is None else correction.weights(exp.old_logprobs, exp.rollout_logprobs, mask)[0]
    agg = Aggregation.of(mask, loss_aggregation(cfg), cfg.rollout.max_new_tokens)
    loss, _ = algorithm_for(cfg).loss(lp, exp.old_logprobs, exp.advantages, mask, *clip_range(cfg),
                                      is_weights=weights, agg=agg)
    loss.backward()
    return {n: -LR * p.grad / (p.grad.abs() + EPS) for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def fwd(tiny_model):
    return _forward(tiny_model)


@pytest.fixture(scope="module")
def default_step(tiny_model, fwd):
    return _autograd_step(tiny_model, _cfg(), fwd)


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: " ".join(x.split(".")[-1] for x in o))
def test_the_step_is_the_gradient_of_the_configured_loss(tiny_model, fwd, default_step, overrides):
    cfg = _cfg(*overrides)
    want = _autograd_step(tiny_model, cfg, fwd)
    size = max(v.abs().max().item() for v in want.values())
    apart = max((want[k] - default_step[k]).abs().max().item() for k in want)
    assert apart > 1e-2 * size, f"{overrides} does not change this batch's step: the case tests nothing"
    _assert_same(_learner_step(tiny_model, cfg, fwd), want)
