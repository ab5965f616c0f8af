"""DPO on a real DeepSpeed engine, one rank in-process (no Ray): the reference log-probs come
from the group before any update, and training moves the chosen log-ratios above the rejected
ones on pairs where the chosen responses are full of the letter 'e'."""

from __future__ import annotations

import pytest
import torch

from tidal.common.config import load_config
from tidal.common.data import ComparisonRecord
from tidal.learner.dpo import build_dpo_batch, sequence_logps
from tidal.learner.group import LearnerGroup

BASE = ["learner.num_workers=1", "learner.zero_stage=2", "learner.mini_batch_size=4", "learner.micro_batch_size=2",
        "learner.lr=2e-3", "learner.lr_schedule=constant", "stages.dpo.beta=0.5"]
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


def _margin(group, batch) -> torch.Tensor:
    """Per pair: (chosen log-ratio) - (rejected log-ratio) against the batch's reference."""
    lp = sequence_logps(group.compute_logprobs(batch.input_ids, batch.attention_mask, batch.response_len, 1.0),
                        batch.response_mask)
    ratio = lp - batch.ref_logps
    n = len(batch)
    return ratio[:n] - ratio[n:]


# IPO regresses the log-ratio margin h to 1 / (2 beta) = 1 (its squared loss has a steep gradient
# in h, a sum over tokens, so it needs a smaller step); DPO keeps pushing h up.
@pytest.mark.parametrize("loss,lr,min_margin,max_margin", [("sigmoid", 2e-3, 0.5, None), ("ipo", 3e-5, 0.3, 2.0)])
def test_dpo_fit_raises_the_chosen_log_ratio(tiny_model, loss, lr, min_margin, max_margin):
    cfg = load_config(None, BASE + [f"stages.dpo.loss={loss}", f"stages.dpo.lr={lr}"])
    g = LearnerGroup(cfg, tiny_model, local=True)
    try:
        train = g.dpo_reference(build_dpo_batch(g.tokenizer, letter_pairs(16), 32, 16, False))
        held = g.dpo_reference(build_dpo_batch(g.tokenizer, letter_pairs(8, 100), 32, 16, False))
        # before any update the policy IS the reference: every log-ratio is zero
        assert torch.allclose(_margin(g, held), torch.zeros(len(held)), atol=1e-4)
        history = g.fit_dpo(train, epochs=3)
        assert len(history) == 3 * 16 // 4
        assert history[-1]["losses/dpo"] < history[0]["losses/dpo"]
        assert {"dpo/rewards/margin", "dpo/rewards/accuracy", "dpo/pairs"} <= set(history[-1])
        margin = _margin(g, held)  # unseen prompts, same responses
        assert margin.min() > min_margin, margin
        if max_margin is not None:
            assert margin.max() < max_margin, margin
        assert history[-1]["dpo/rewards/accuracy"] == 1.0
    finally:
        g.shutdown()
