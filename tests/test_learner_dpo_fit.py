"""DPO on a real DeepSpeed engine, one rank in-process (no Ray): the reference log-probs the group
computes before any update are the model file's (checked against a forward pass outside the
group), and training moves the chosen log-ratios above the rejected ones, measured against that
outside reference, on pairs where the chosen responses are full of the letter 'e'."""

from __future__ import annotations

import pytest
import torch

from tidal.common.config import load_config
from tidal.common.data import ComparisonRecord
from tidal.common.models import load_causal_lm, sequence_logprobs
from tidal.learner.dpo import build_dpo_batch, sequence_logps
from tidal.learner.group import LearnerGroup

BASE = ["learner.num_workers=1", "learner.zero_stage=2", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
        "learner.lr=2e-3", "learner.lr_schedule=constant", "stages.dpo.beta=0.5"]
LR_IPO_MEAN = 1e-3
TOPICS = ("the film", "the book", "dinner", "the trip", "the show", "the game", "the song", "the park")


def letter_pairs(n: int, offset: int = 0) -> list[ComparisonRecord]:
    """Chosen: many 'e'; rejected: none. The same preference any letter-rate reward would have."""
    return [ComparisonRecord(f"Tell me about {TOPICS[i % 8]} ({i}).", "eee see the eerie tree,ee",
                             "a dull grey cat sat, calm") for i in range(offset, offset + n)]


@pytest.fixture(scope="module", autouse=True)
def _leave_no_process_group():
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


def _file_reference(tiny_model, batch) -> torch.Tensor:
    """(2N,) sequence log-probs of the batch under the model file, loaded and run here by plain
    transformers code: a reference the group's own forward passes have no part in."""
    with torch.no_grad():
        token_lp = sequence_logprobs(load_causal_lm(tiny_model), batch.input_ids, batch.attention_mask,
                                     batch.response_len)
    return sequence_logps(token_lp, batch.response_mask)


def _margin(group, batch, per_token: bool = False) -> torch.Tensor:
    """Per pair: (chosen log-ratio) - (rejected log-ratio) against the batch's reference, of
    summed log-probs or (per_token) of per-token means."""
    lp = sequence_logps(group.compute_logprobs(batch.input_ids, batch.attention_mask, batch.response_len, 1.0),
                        batch.response_mask)
    ratio = lp - batch.ref_logps
    if per_token:
        ratio = ratio / batch.response_mask.sum(-1)
    n = len(batch)
    return ratio[:n] - ratio[n:]


# IPO regresses the log-ratio margin h to 1 / (2 beta) = 1 (its squared loss has a steep gradient
# in h, a sum over tokens, so it needs a smaller step); DPO keeps pushing h up. ipo_mean regresses the
# per-token mean margin to 1, about ten times the summed margin ipo settles at on these responses.
@pytest.mark.parametrize("loss,lr,min_margin,max_margin", [("sigmoid", 2e-3, 0.5, None), ("ipo", 3e-5, 0.3, 2.0),
                                                           ("ipo_mean", LR_IPO_MEAN, 0.5, 2.0)])
def test_dpo_fit_raises_the_chosen_log_ratio(tiny_model, loss, lr, min_margin, max_margin):
    cfg = load_config(None, BASE + [f"stages.dpo.loss={loss}", f"stages.dpo.lr={lr}"])
    g = LearnerGroup(cfg, tiny_model, local=True)
    try:
        train = g.dpo_reference(build_dpo_batch(g.tokenizer, letter_pairs(16), 32, 16, False))
        held = build_dpo_batch(g.tokenizer, letter_pairs(8, 100), 32, 16, False)
        # before any update the group's reference is the model file it loaded (dropout off, no
        # update, float32), computed here without the group; the margins below are against it
        reference = _file_reference(tiny_model, held)
        torch.testing.assert_close(g.dpo_reference(held).ref_logps, reference, atol=1e-4, rtol=0)
        held = held.with_reference(reference)
        history = g.fit_dpo(train, epochs=3)
        assert len(history) == 3 * 16 // 4
        assert history[-1]["losses/dpo"] < history[0]["losses/dpo"]
        assert {"dpo/rewards/margin", "dpo/rewards/accuracy", "dpo/pairs"} <= set(history[-1])
        margin = _margin(g, held, per_token=loss == "ipo_mean")  # unseen prompts, same responses
        assert margin.min() > min_margin, margin
        if max_margin is not None:
            assert margin.max() < max_margin, margin
        assert history[-1]["dpo/rewards/accuracy"] == 1.0
    finally:
        g.shutdown()
