"""DPO / IPO losses against hand computations, and the DPO batch built from comparisons and
rankings with the tiny model's tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from tidal.common.data import ComparisonRecord, RankingRecord
from tidal.common.models import load_causal_lm, load_tokenizer, sequence_logprobs
from tidal.learner.dpo import (
    build_dpo_batch, dpo_batch_loss, pairs_per_record, preference_pairs, ranking_pairs, sequence_logps,
)
from tidal.learner.losses import dpo_loss
from tidal.learner.reward_model import build_preference_batch
from tidal.learner.sft import tokenize_response

# Two pairs. Pair 0: chosen log-ratio -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5, h = 1.
#            Pair 1: chosen -3 - (-2) = -1, rejected -1 - (-1) = 0, h = -1.
PC, PR = [-1.0, -3.0], [-2.0, -1.0]
RC, RR = [-1.5, -2.0], [-1.5, -1.0]


def _t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_dpo_sigmoid_equals_hand_computation():
    loss, m = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=0.5)
    # -log sigmoid(0.5 * 1) = log(1 + e^-0.5) = 0.474077; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974077
    assert loss.item() == pytest.approx((0.4740769841801067 + 0.9740769841801067) / 2, abs=1e-12)
    # implicit rewards beta * log-ratio: chosen (0.25, -0.5), rejected (-0.25, 0)
    assert m["rewards/chosen"].item() == pytest.approx(-0.125)
    assert m["rewards/rejected"].item() == pytest.approx(-0.125)
    assert m["rewards/margin"].item() == pytest.approx(0.0)
    assert m["rewards/accuracy"].item() == 0.5


def test_dpo_label_smoothing_hand_computation():
    loss, _ = dpo_loss(_t(PC[:1]), _t(PR[:1]), _t(RC[:1]), _t(RR[:1]), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * 0.4740769841801067 + 0.1 * 0.9740769841801067, abs=1e-12)


def test_ipo_equals_hand_computation():
    # beta = 0.5: target margin 1 / (2 beta) = 1; (1 - 1)^2 = 0, (-1 - 1)^2 = 4 -> mean 2
    loss, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(2.0)
    # beta = 0.25: target 2; (1 - 2)^2 = 1, (-1 - 2)^2 = 9 -> mean 5
    loss, _ = dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(5.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_gradient_raises_chosen_and_lowers_rejected_log_ratio(loss_type):
    pc, pr = _t(PC, grad=True), _t(PR, grad=True)
    rc, rr = _t(RC, grad=True), _t(RR, grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type=loss_type)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent: chosen up, rejected down
    assert rc.grad is None and rr.grad is None  # the reference is a constant
    if loss_type == "sigmoid":
        # d/d pc of mean_i -log sigmoid(beta h_i) = -beta * sigmoid(-beta h_i) / B
        expected = [-0.25 * (1 / (1 + math.exp(0.25 * h))) / 2 for h in (1.0, -1.0)]
        assert pc.grad.tolist() == pytest.approx(expected, abs=1e-12)
        assert pr.grad.tolist() == pytest.approx([-g for g in expected], abs=1e-12)
    # One gradient step moves the margin the right way.
    with torch.no_grad():
        before = (pc - _t(RC)) - (pr - _t(RR))
        after = (pc - 0.5 * pc.grad - _t(RC)) - (pr - 0.5 * pr.grad - _t(RR))
    assert (after > before).all()


def test_dpo_is_finite_for_huge_margins_and_checks_inputs():
    loss, _ = dpo_loss(_t([0.0]), _t([-1e4]), _t([0.0]), _t([0.0]), beta=1.0)
    assert loss.item() == 0.0
    loss, _ = dpo_loss(_t([-1e4]), _t([0.0]), _t([0.0]), _t([0.0]), beta=1.0)
    assert loss.item() == pytest.approx(1e4)  # -log sigmoid(-1e4), not inf
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=0.5, loss_type="hinge2")
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(_t(PC), _t(PR[:1]), _t(RC), _t(RR), beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(_t(PC), _t(PR), _t(RC), _t(RR), beta=0.0)


# ---------------------------------------------------------------------------- pairs and batches

def test_ranking_pairs_are_all_pairs_better_first():
    # ranking[i] = rank of response i: response 1 is best, then 2, then 0
    assert ranking_pairs([2, 0, 1]) == [(1, 2), (1, 0), (2, 0)]
    assert len(ranking_pairs([3, 1, 0, 2])) == math.comb(4, 2)
    for better, worse in ranking_pairs([3, 1, 0, 2]):
        assert [3, 1, 0, 2][better] < [3, 1, 0, 2][worse]
    # a tie (responses 0 and 2 share rank 0) is no preference: no pair for it
    assert ranking_pairs([0, 2, 0]) == [(0, 1), (2, 1)]
    assert pairs_per_record(RankingRecord("p", ["a", "b", "c"], [0, 2, 0])) == 2


RECORDS = [
    ComparisonRecord("Review the film:", "a wonderful movie", "terrible"),
    RankingRecord("Say something nice:", ["bad bad", "great and lovely", "okay"], [2, 0, 1]),
]


def test_preference_pairs_expand_rankings():
    pairs, source = preference_pairs(RECORDS)
    assert source == [0, 1, 1, 1]
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("a wonderful movie", "terrible"), ("great and lovely", "okay"),
        ("great and lovely", "bad bad"), ("okay", "bad bad")]
    assert [pairs_per_record(r) for r in RECORDS] == [1, 3]


def _unpad(ids, mask):
    return ids[mask.bool()].tolist()


def test_build_dpo_batch_layout(tiny_model):
    tok = load_tokenizer(tiny_model)
    batch = build_dpo_batch(tok, RECORDS, max_prompt_tokens=16, max_response_tokens=8, use_chat_template=False)
    n = len(batch)
    assert n == 4 and batch.input_ids.shape[0] == 8 and batch.source.tolist() == [0, 1, 1, 1]
    pairs, _ = preference_pairs(RECORDS)
    P = batch.input_ids.shape[1] - batch.response_len
    for i, pair in enumerate(pairs):
        for row, text in ((i, pair.chosen), (n + i, pair.rejected)):
            want = tokenize_response(tok, text, 8)  # ends with EOS
            got = batch.input_ids[row, P:][batch.response_mask[row].bool()].tolist()
            assert got == want and got[-1] == tok.eos_token_id
        # chosen and rejected rows of a pair share the prompt tokens exactly
        assert torch.equal(batch.input_ids[i, :P], batch.input_ids[n + i, :P])
    # The same tokens as the reward model's batch for the comparison record.
    rm = build_preference_batch(tok, RECORDS[:1], 16, 8, use_chat_template=False)
    assert _unpad(batch.input_ids[0], batch.attention_mask[0]) == _unpad(rm.input_ids[0], rm.attention_mask[0])
    assert _unpad(batch.input_ids[n], batch.attention_mask[n]) == _unpad(rm.input_ids[1], rm.attention_mask[1])
    sub = batch.select(torch.tensor([2]))
    assert torch.equal(sub.input_ids, batch.input_ids[[2, n + 2]]) and sub.source.tolist() == [1]


def test_dpo_batch_loss_on_the_tiny_model(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model)
    batch = build_dpo_batch(tok, RECORDS, 16, 8, use_chat_template=False)
    with torch.no_grad():
        token_lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_len)
    logps = sequence_logps(token_lp, batch.response_mask)  # (2N,)
    # Padding-invariant: a row alone (no padding) gives the same sequence log-prob.
    one = build_dpo_batch(tok, [ComparisonRecord("Say something nice:", "great and lovely", "okay")], 16, 8, False)
    with torch.no_grad():
        alone = sequence_logps(sequence_logprobs(model, one.input_ids, one.attention_mask, one.response_len),
                               one.response_mask)
    torch.testing.assert_close(alone, logps[[1, 5]], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="reference"):
        dpo_batch_loss(token_lp, batch, beta=0.1)
    # Policy == reference: every log-ratio is 0, so the loss is log 2 and the margin 0.
    loss, m = dpo_batch_loss(token_lp, batch.with_reference(logps), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and m["dpo/rewards/margin"] == pytest.approx(0, abs=1e-6)
    # A shifted reference: the loss equals dpo_loss on the hand-split halves.
    ref = logps + torch.tensor([0.3, -0.2, 0.1, 0.0, -0.4, 0.5, 0.0, 0.2])
    loss, m = dpo_batch_loss(token_lp, batch.with_reference(ref), beta=0.1, loss_type="ipo")
    want, _ = dpo_loss(logps[:4], logps[4:], ref[:4], ref[4:], beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and m["dpo/pairs"] == 4.0
