"""pi_old taken inside the update (tidal.learner.pi_old, source `update`): on a real one-rank
learner the same update as with a forward pass first, without that forward. And a step short of
a minibatch (rows dropped for invalid rewards) trains its rows exactly, pi_old given or taken."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tidal.common.config import load_config
from tidal.learner.experience import ForwardPass, assemble_experience, pad_prompt_response

GRPO = ["algorithm.name=grpo", "algorithm.kl_coef=0", "algorithm.kl_loss=0.1", "rollout.n_samples=2",
        "algorithm.prompts_per_step=4", "learner.mini_batch_size=8", "learner.micro_batch_size=4",
        "learner.num_workers=1", "learner.lr=1e-3", "learner.lr_schedule=constant", "algorithm.update_epochs=2"]


def _forward(n=8, seed=0, pad_id=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 400, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(3, 400, (6 - i % 3,), generator=g).tolist() for i in range(n)]
    ids, attn, rmask = pad_prompt_response(prompts, responses, pad_id)
    ref = -torch.rand(rmask.shape, generator=g) * rmask
    return ForwardPass(ids, attn, rmask, None, ref)


def test_no_kl_penalty_without_pi_old():
    fwd = _forward()
    with pytest.raises(ValueError, match="cannot carry a KL penalty"):
        assemble_experience(fwd, torch.zeros(8), "grpo", 2, kl_coef=0.1, kl_estimator="k1", gamma=1.0, lam=1.0,
                            whiten=False)
    exp = assemble_experience(fwd, torch.arange(8.0), "grpo", 2, kl_coef=0.0, kl_estimator="k1", gamma=1.0, lam=1.0,
                              whiten=False)
    assert exp.old_logprobs is None and exp.advantages.abs().sum() > 0


@pytest.fixture(scope="module")
def group(tiny_model):
    from tidal.learner.group import LearnerGroup

    g = LearnerGroup(load_config(None, GRPO), tiny_model, local=True)
    yield g
    g.shutdown()
    import torch.distributed as dist

    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def test_update_without_the_forward_is_the_same_update(group, tmp_path):
    fwd = _forward(pad_id=group.tokenizer.pad_token_id)
    exp = assemble_experience(fwd, torch.tensor([1.0, -1.0] * 4), "grpo", 2, kl_coef=0.0, kl_estimator="k1",
                              gamma=1.0, lam=1.0, whiten=False)
    R, mask = exp.response_mask.shape[1], exp.response_mask
    ckpt = group.checkpoint(tmp_path / "start")  # weights, optimizer and the shuffle counters
    start = group.parameter_snapshots()[0]
    old = group.compute_logprobs(exp.input_ids, exp.attention_mask, R, 1.0) * mask
    given = group.update_rl(dataclasses.replace(exp, old_logprobs=old)).metrics  # a forward pass, then the update
    after_given = group.parameter_snapshots()[0]
    group.load_checkpoint(ckpt)
    taken = group.update_rl(exp)  # pi_old taken inside the update
    after_taken = group.parameter_snapshots()[0]
    assert given["update/minibatches"] == taken.metrics["update/minibatches"] == 2  # the second epoch reuses pi_old
    assert taken.optimizer_steps == 2 and taken.logprob_gap is None  # no engine log-probs here
    assert taken.metrics["policy/ratio_mean"] == pytest.approx(given["policy/ratio_mean"], abs=1e-5)
    for name, p in after_given.items():
        assert torch.allclose(after_taken[name], p, atol=1e-5), name
    assert max((after_taken[n] - p).abs().max().item() for n, p in start.items()) > 1e-4  # it did train
    kl = ((old - exp.ref_logprobs) * mask).sum(-1).mean().item()
    assert taken.kl_per_seq == pytest.approx(kl, abs=1e-4) and "experience/kl_per_seq" not in taken.metrics
    with pytest.raises(Exception, match="without pi_old"):
        group.update_rl(exp.select(torch.arange(12) % 8))  # 12 rows: more than one minibatch, refused


def _short_step(tiny_model, exp, *overrides, take_pi_old: bool):
    """One update_rl on a fresh one-rank learner: its result and parameters after."""
    from tidal.learner.group import LearnerGroup

    g = LearnerGroup(load_config(None, GRPO + list(overrides)), tiny_model, local=True)
    try:
        if not take_pi_old:
            old = g.compute_logprobs(exp.input_ids, exp.attention_mask, exp.response_mask.shape[1], 1.0)
            exp = dataclasses.replace(exp, old_logprobs=old * exp.response_mask)
        return g.update_rl(exp), g.parameter_snapshots()[0]
    finally:
        g.shutdown()


@pytest.mark.parametrize("rows, take_pi_old", [(6, False), (1, True)])
def test_a_step_short_of_a_minibatch_trains_its_rows_exactly(tiny_model, rows, take_pi_old):
    # reward.on_invalid: drop left `rows` of a step of exactly one minibatch (8 rows, 2 micro-batches
    # of 4); the update used to raise ("a minibatch needs 8"). It trains them as one smaller minibatch
    # in as many micro-batches (1 row: one zero-weight fill row), the same step as a learner whose
    # minibatch is exactly those rows.
    from tidal.common.models import load_tokenizer

    fwd = _forward(pad_id=load_tokenizer(tiny_model).pad_token_id)
    exp = assemble_experience(fwd, torch.tensor([1.0, -1.0, 0.5, 2.0] * 2), "grpo", 2, kl_coef=0.0,
                              kl_estimator="k1", gamma=1.0, lam=1.0, whiten=False).select(torch.arange(rows))
    short, after_short = _short_step(tiny_model, exp, take_pi_old=take_pi_old)
    exact, after_exact = _short_step(tiny_model, exp, f"learner.mini_batch_size={rows}",
                                     f"learner.micro_batch_size={rows}", take_pi_old=take_pi_old)
    worst = max((after_short[k] - p).abs().max().item() for k, p in after_exact.items())
    assert worst < 1e-5, worst
    for key in ("losses/policy", "losses/kl"):  # exact token means (the other stats average micro-batches)
        assert short.metrics[key] == pytest.approx(exact.metrics[key], abs=1e-5), key
    assert short.optimizer_steps == exact.optimizer_steps == 2  # one per epoch
    assert short.metrics["update/short_minibatch"] == 1 and exact.metrics["update/short_minibatch"] == 0
    assert short.metrics["update/rows_padding"] == max(0, 2 - rows)
    if take_pi_old:
        assert short.kl_per_seq == pytest.approx(exact.kl_per_seq, abs=1e-5)
