"""DPO / IPO losses against hand computations, and the DPO batch built from comparisons and
rankings with the tiny model's tokenizer."""

from __future__ import annotations

import math

import pytest
import torch

from tidal.common.data import ComparisonRecord, RankingRecord
from tidal.common.models import load_causal_lm, load_tokenizer, sequence_logprobs
from tidal.learner.dpo import (
    DPOBatch, build_dpo_batch, dpo_batch_loss, pairs_per_record, preference_pairs, ranking_pairs, sequence_logps,
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
    # the K = 3 ranking's C(3, 2) = 3 pairs share one comparison's weight; a comparison keeps its own
    assert [p.weight for p in pairs] == [1.0, 1 / 3, 1 / 3, 1 / 3]
    weighted, _ = preference_pairs([ComparisonRecord("p", "a", "b", 0.25)] + RECORDS[1:])
    assert [p.weight for p in weighted] == [0.25, 1 / 3, 1 / 3, 1 / 3]


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


def _sum_by_loop(token_lp: torch.Tensor, mask: torch.Tensor, row: int) -> float:
    return sum(float(token_lp[row, t]) for t in range(mask.shape[1]) if mask[row, t] == 1)


def test_dpo_batch_loss_on_the_tiny_model(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model)
    batch = build_dpo_batch(tok, RECORDS, 16, 8, use_chat_template=False)
    assert batch.weight.tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
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
    # The reference is another model (the tiny model with its weights perturbed), so no log-ratio is 0
    # by construction; the loss is rebuilt pair by pair with loops over the unpadded tokens.
    reference = load_causal_lm(tiny_model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        ref_token_lp = sequence_logprobs(reference, batch.input_ids, batch.attention_mask, batch.response_len)
    mask, n, beta = batch.response_mask, len(batch), 0.1
    pol = [_sum_by_loop(token_lp, mask, r) for r in range(2 * n)]
    ref = [_sum_by_loop(ref_token_lp, mask, r) for r in range(2 * n)]
    h = [(pol[i] - ref[i]) - (pol[n + i] - ref[n + i]) for i in range(n)]
    assert min(abs(x) for x in h) > 1e-3
    w = [1.0, 1 / 3, 1 / 3, 1 / 3]
    attached = batch.with_reference(sequence_logps(ref_token_lp, mask))
    loss, m = dpo_batch_loss(token_lp, attached, beta=beta)
    want = sum(wi * math.log1p(math.exp(-beta * hi)) for wi, hi in zip(w, h)) / sum(w)
    assert loss.item() == pytest.approx(want, rel=1e-5) and m["dpo/pairs"] == 4.0
    assert m["dpo/rewards/margin"] == pytest.approx(beta * sum(h) / n, rel=1e-5)  # metrics: per pair, unweighted
    loss, _ = dpo_batch_loss(token_lp, attached, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(sum(wi * (hi - 5.0) ** 2 for wi, hi in zip(w, h)) / sum(w), rel=1e-5)


# Two hand-made pairs over R = 4 response positions; -77 marks padded positions, which must not count.
# pair 0 (weight 1):   chosen  [-1, -2]          sum -3, mean -1.5;  reference sum -4, mean -2
#                      rejected [-1, -1, -1, -1]  sum -4, mean -1;    reference sum -2, mean -0.5
# pair 1 (weight 1/3): chosen  [-0.5]            sum -0.5, mean -0.5; reference sum -1.5, mean -1.5
#                      rejected [-1, -3]          sum -4, mean -2;    reference sum -3, mean -1.5
# Summed h: pair 0 (-3 + 4) - (-4 + 2) = 3, pair 1 (-0.5 + 1.5) - (-4 + 3) = 2.
# Mean h:   pair 0 (-1.5 + 2) - (-1 + 0.5) = 1, pair 1 (-0.5 + 1.5) - (-2 + 1.5) = 1.5.
TOKEN_LP = torch.tensor([[-1.0, -2.0, -77.0, -77.0], [-0.5, -77.0, -77.0, -77.0],
                         [-1.0, -1.0, -1.0, -1.0], [-1.0, -3.0, -77.0, -77.0]])
MASK = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


def _hand_batch(weight=(1.0, 1 / 3)) -> DPOBatch:
    ids = torch.ones(4, 6, dtype=torch.long)
    return DPOBatch(ids, torch.ones_like(ids), MASK, torch.tensor([0, 1]), torch.tensor(weight),
                    torch.tensor([-4.0, -1.5, -2.0, -3.0]))


def test_ipo_summed_and_length_normalised_by_hand():
    # beta = 1: target margin 1 / (2 beta) = 0.5.
    # ipo (summed): (3 - 0.5)^2 = 6.25 and (2 - 0.5)^2 = 2.25; weighted (6.25 + 2.25 / 3) / (4 / 3) = 5.25
    loss, _ = dpo_batch_loss(TOKEN_LP, _hand_batch(), beta=1.0, loss_type="ipo")
    assert loss.item() == pytest.approx(5.25, rel=1e-6)
    # ipo_mean (TRL's): (1 - 0.5)^2 = 0.25 and (1.5 - 0.5)^2 = 1; weighted (0.25 + 1 / 3) / (4 / 3) = 0.4375
    loss, m = dpo_batch_loss(TOKEN_LP, _hand_batch(), beta=1.0, loss_type="ipo_mean")
    assert loss.item() == pytest.approx(0.4375, rel=1e-6)
    assert m["dpo/rewards/margin"] == pytest.approx((1 + 1.5) / 2, rel=1e-6)  # implicit rewards per token
    # unweighted, for contrast: (6.25 + 2.25) / 2 = 4.25 and (0.25 + 1) / 2 = 0.625
    assert dpo_batch_loss(TOKEN_LP, _hand_batch((1.0, 1.0)), 1.0, "ipo")[0].item() == pytest.approx(4.25, rel=1e-6)
    assert dpo_batch_loss(TOKEN_LP, _hand_batch((1.0, 1.0)), 1.0, "ipo_mean")[0].item() == pytest.approx(0.625, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_batch_loss(TOKEN_LP, _hand_batch(), beta=1.0, loss_type="ipo_sum")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_batch_loss(TOKEN_LP, _hand_batch(), beta=1.0, loss_type="ipo_mean", label_smoothing=0.1)


def test_dpo_weighted_mean_by_hand_and_over_micro_batches():
    # sigmoid, beta = 1: -log sigmoid(3) = log(1 + e^-3), -log sigmoid(2) = log(1 + e^-2)
    l0, l1 = math.log1p(math.exp(-3.0)), math.log1p(math.exp(-2.0))
    loss, _ = dpo_batch_loss(TOKEN_LP, _hand_batch(), beta=1.0)
    assert loss.item() == pytest.approx((l0 + l1 / 3) / (4 / 3), rel=1e-6)
    # Split into one-pair micro-batches, each micro loss weighted by its share of the weight
    # (loss_mass / total, what LearnerWorker.run_step does) gives the same weighted mean.
    batch, parts = _hand_batch(), []
    for i in range(2):
        mb = batch.select(torch.tensor([i]))
        mb_loss, _ = dpo_batch_loss(TOKEN_LP[batch.rows(torch.tensor([i]))], mb, beta=1.0)
        parts.append(mb_loss * mb.loss_mass / batch.loss_mass)
    assert batch.loss_mass == pytest.approx(4 / 3)
    assert sum(parts).item() == pytest.approx(loss.item(), rel=1e-6)
    # a weight scales its pair's pull on the gradient
    lp = TOKEN_LP.clone().requires_grad_()
    dpo_batch_loss(lp, _hand_batch(), beta=1.0)[0].backward()
    g_chosen = lp.grad[:2, 0]  # d loss / d (first token of each chosen response)
    want = torch.tensor([-1 / (1 + math.exp(3.0)), -(1 / 3) / (1 + math.exp(2.0))]) / (4 / 3)
    torch.testing.assert_close(g_chosen, want, atol=1e-6, rtol=1e-5)
