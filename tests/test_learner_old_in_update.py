"""pi_old taken inside the update (tidal.learner.experience.old_in_update): the decision, and on a
real one-rank learner the same update as with a forward pass first, without that forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tidal.common.config import load_config
from tidal.learner.experience import ForwardPass, assemble_experience, old_in_update, pad_prompt_response

GRPO = ["algorithm.name=grpo", "algorithm.kl_coef=0", "algorithm.kl_loss=0.1", "rollout.n_samples=2",
        "algorithm.prompts_per_step=4", "learner.mini_batch_size=8", "learner.micro_batch_size=4",
        "learner.num_workers=1", "learner.lr=1e-3", "learner.lr_schedule=constant", "algorithm.ppo_epochs=2"]


def test_the_decision():
    assert old_in_update(load_config(None, GRPO))  # 4 x 2 rows = one minibatch of 8, no KL penalty
    assert not old_in_update(load_config(None, GRPO), rows=6)  # some rows dropped: not one whole minibatch
    for off in (["learner.mini_batch_size=4"], ["algorithm.kl_coef=0.05"], ["algorithm.adaptive_kl=true"],
                ["algorithm.old_logprobs=trainer"], ["algorithm.name=expert_iteration"]):
        assert not old_in_update(load_config(None, GRPO + off)), off


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
    given = group.update_rl(dataclasses.replace(exp, old_logprobs=old))  # a forward pass, then the update
    after_given = group.parameter_snapshots()[0]
    group.load_checkpoint(ckpt)
    taken = group.update_rl(exp)  # pi_old taken inside the update
    after_taken = group.parameter_snapshots()[0]
    assert given["ppo/minibatches"] == taken["ppo/minibatches"] == 2  # two epochs: the second reuses pi_old
    assert taken["policy/ratio_mean"] == pytest.approx(given["policy/ratio_mean"], abs=1e-5)
    for name, p in after_given.items():
        assert torch.allclose(after_taken[name], p, atol=1e-5), name
    assert max((after_taken[n] - p).abs().max().item() for n, p in start.items()) > 1e-4  # it did train
    kl = ((old - exp.ref_logprobs) * mask).sum(-1).mean().item()
    assert taken["experience/kl_per_seq"] == pytest.approx(kl, abs=1e-4)
    with pytest.raises(Exception, match="without pi_old"):
        group.update_rl(exp.select(torch.arange(12) % 8))  # 12 rows: not one whole minibatch, refused
