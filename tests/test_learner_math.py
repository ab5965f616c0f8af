"""RLHF math (tidal.learner.advantages / losses / kl) against plain-Python loops on random padded
batches, against hand-worked numbers, and for padding invariance (garbage, even inf/NaN, in
padded positions must change nothing)."""

from __future__ import annotations

import math

import pytest
import torch

from tidal.learner.advantages import (
    gae, grpo_advantages, last_token_index, reinforce_advantages, rloo_advantages, token_rewards,
)
from tidal.learner.algorithms import ALGORITHMS, algorithm_for
from tidal.learner.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate
from tidal.learner.losses import (
    entropy_bonus, pairwise_reward_loss, policy_loss, ranking_reward_loss, sft_loss,
    truncated_is_weights, value_loss,
)

LENGTHS = [7, 3, 5, 1]  # real response tokens per row; T = 7
T = 7


def padded_mask(lengths=LENGTHS, t=T) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths], dtype=torch.float64)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def garbage_pad(x: torch.Tensor, mask: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """x with its padded positions overwritten by garbage (inf, NaN, huge) and `extra` more
    garbage columns appended; pair with extend_mask(mask, extra)."""
    junk = torch.tensor([float("nan"), float("inf"), -1e30, 123.0], dtype=x.dtype)
    fill = junk[torch.arange(x.numel()) % len(junk)].reshape(x.shape)
    x = torch.where(mask.bool(), x, fill)
    tail = junk[torch.arange(x.shape[0] * extra) % len(junk)].reshape(x.shape[0], extra)
    return torch.cat([x, tail], dim=1)


def extend_mask(mask: torch.Tensor, extra: int = 3) -> torch.Tensor:
    return torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=mask.dtype)], dim=1)


# ------------------------------------------------------------------------------------- gae

def gae_loop(rewards, values, lengths, gamma, lam):
    adv = [[0.0] * T for _ in lengths]
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + (values[b][t] if t < n else 0.0) for t in range(T)] for b, n in enumerate(lengths)]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.9)])
def test_gae_matches_loop_and_ignores_padding(gamma, lam):
    mask = padded_mask()
    rewards, values = rand(4, T, seed=1), rand(4, T, seed=2)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    adv2, ret2 = gae(garbage_pad(rewards, mask), garbage_pad(values, mask), extend_mask(mask), gamma, lam)
    torch.testing.assert_close(adv2[:, :T], adv)
    torch.testing.assert_close(ret2[:, :T], ret)
    assert (adv2[:, T:] == 0).all() and (ret2[:, T:] == 0).all()


def test_gae_hand_gamma1_lam095():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], V after the last token = 0:
    # t=2: delta = 1 + 0 - 0.7 = 0.3                 A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1               A1 = 0.1 + 0.95 * 0.3   = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1               A0 = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = [0.96575, 0.985, 1.0]
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.6, 0.7, 9.0]]),
                   torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46575, 0.385, 0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96575, 0.985, 1.0, 0.0]]))


def test_gae_lam1_returns_are_discounted_reward_to_go():
    # lam = 1: returns = sum_k gamma^k r_{t+k}, whatever V is. r = [1, 0, 2], gamma = 0.9:
    # G2 = 2, G1 = 0 + 0.9 * 2 = 1.8, G0 = 1 + 0.9 * 1.8 = 2.62; A = G - V = [2.32, 2.0, 1.5]
    adv, ret = gae(torch.tensor([[1.0, 0.0, 2.0, 5.0]]), torch.tensor([[0.3, -0.2, 0.5, 7.0]]),
                   torch.tensor([[1, 1, 1, 0]]), gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.62, 1.8, 2.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2.32, 2.0, 1.5, 0.0]]))


# --------------------------------------------------------------------------- token rewards

def test_token_rewards_hand():
    # coef 0.5: row 0 -> -0.5 * [0.1, 0.2, 0.3] + score 2 at t=2 = [-0.05, -0.1, 1.85]
    #           row 1 -> -0.5 * 0.5 + score -1 at t=0 = -1.25, padding 0
    r = token_rewards(torch.tensor([2.0, -1.0]), torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]]),
                      torch.tensor([[1, 1, 1], [1, 0, 0]]), kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, 1.85], [-1.25, 0.0, 0.0]]))


def test_token_rewards_matches_loop_and_ignores_padding():
    mask, kl, scores = padded_mask(), rand(4, T, seed=3), rand(4, seed=4)
    r = token_rewards(scores, kl, mask, kl_coef=0.05)
    ref = [[0.0] * T for _ in LENGTHS]
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            ref[b][t] = -0.05 * kl[b, t].item()
        ref[b][n - 1] += scores[b].item()
    torch.testing.assert_close(r, torch.tensor(ref, dtype=torch.float64))
    assert last_token_index(mask).tolist() == [n - 1 for n in LENGTHS]
    r2 = token_rewards(scores, garbage_pad(kl, mask), extend_mask(mask), kl_coef=0.05)
    torch.testing.assert_close(r2, torch.cat([r, torch.zeros(4, 3, dtype=r.dtype)], 1))


def test_token_rewards_rejects_empty_response():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


# ------------------------------------------------------------------------ group baselines

def test_group_baselines_hand():
    # grpo, g=3: [1, 2, 3] has mean 2, std 1 -> [-1, 0, 1]; [5, 5, 5] has std 0 -> [0, 0, 0]
    torch.testing.assert_close(grpo_advantages(torch.tensor([1.0, 2, 3, 5, 5, 5]), 3),
                               torch.tensor([-1.0, 0, 1, 0, 0, 0]), atol=1e-5, rtol=0)
    # rloo, g=4 on [1, 2, 3, 6]: leave-one-out means 11/3, 10/3, 9/3, 6/3
    #   -> [1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2] = [-8/3, -4/3, 0, 4]
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2, 3, 6]), 4),
                               torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    # reinforce: batch mean of [1, 2, 3, 6] is 3 -> [-2, -1, 0, 3] (group_size does not matter)
    torch.testing.assert_close(reinforce_advantages(torch.tensor([1.0, 2, 3, 6]), 2),
                               torch.tensor([-2.0, -1, 0, 3]))


def test_group_baselines_match_loops():
    g, scores = 4, rand(12, seed=5)
    s = scores.tolist()
    grpo, rloo = [], []
    for i in range(0, 12, g):
        grp = s[i:i + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
        grpo += [(x - mean) / (std + 1e-6) for x in grp]
        rloo += [x - (sum(grp) - x) / (g - 1) for x in grp]
    torch.testing.assert_close(grpo_advantages(scores, g), torch.tensor(grpo, dtype=torch.float64))
    torch.testing.assert_close(rloo_advantages(scores, g), torch.tensor(rloo, dtype=torch.float64))
    reinforce = [x - sum(s) / len(s) for x in s]
    torch.testing.assert_close(reinforce_advantages(scores, g), torch.tensor(reinforce, dtype=torch.float64))
    grpo_t = grpo_advantages(scores, g).reshape(-1, g)
    torch.testing.assert_close(grpo_t.mean(-1), torch.zeros(3, dtype=torch.float64))  # zero-mean per group
    for algo in ALGORITHMS.values():  # one shared signature for every table entry that has advantages
        if algo.advantages is None:  # expert iteration: select + SFT, no advantages and no ratio
            assert algo.selects and not algo.ratio, algo.name
            continue
        values = None if not algo.uses_critic else torch.zeros(12, 3)
        adv, ret = algo.advantages(scores, torch.zeros(12, 3), torch.ones(12, 3), values, 0.1, g, 1.0, 0.95)
        assert adv.shape == ret.shape == (12, 3), algo.name
    assert rloo_advantages(torch.tensor([0, 1, 1, 1]), 2).dtype.is_floating_point


def test_group_baselines_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size=4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size=1"):
        rloo_advantages(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="unknown algorithm 'a2c'"):
        algorithm_for("a2c")


# ---------------------------------------------------------------------------- policy loss

def policy_loss_loop(lp, old, adv, lengths, eps, w=None):
    total, n_tok, clipped, kl, ratio_sum = 0.0, 0, 0, 0.0, 0.0
    for b, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(lp[b][t] - old[b][t])
            loss = max(-adv[b][t] * ratio, -adv[b][t] * min(max(ratio, 1 - eps), 1 + eps))
            total += loss * (w[b][t] if w else 1.0)
            n_tok += 1
            clipped += abs(ratio - 1) > eps
            kl += (ratio - 1) - math.log(ratio)
            ratio_sum += ratio
    return total / n_tok, clipped / n_tok, kl / n_tok, ratio_sum / n_tok


def test_policy_loss_matches_loop_and_ignores_padding():
    mask = padded_mask()
    old, adv = rand(4, T, seed=6), rand(4, T, seed=7)
    lp = old + 0.3 * rand(4, T, seed=8)  # ratios spread around 1, some beyond 1 +- 0.2
    w = truncated_is_weights(old, old + 0.2 * rand(4, T, seed=9), mask, cap=1.1)
    for weights in (None, w):
        loss, m = policy_loss(lp, old, adv, mask, 0.2, is_weights=weights)
        ref = policy_loss_loop(lp.tolist(), old.tolist(), adv.tolist(), LENGTHS, 0.2,
                               weights.tolist() if weights is not None else None)
        got = (loss.item(), m["clipfrac"].item(), m["approx_kl"].item(), m["ratio_mean"].item())
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert 0 < m["clipfrac"] < 1 and m["approx_kl"] >= 0
    assert all(not v.requires_grad for v in m.values())

    lp1 = lp.clone().requires_grad_()
    loss, m = policy_loss(lp1, old, adv, mask, 0.2, is_weights=w)
    loss.backward()
    lp2 = garbage_pad(lp, mask).requires_grad_()
    loss2, m2 = policy_loss(lp2, garbage_pad(old, mask), garbage_pad(adv, mask), extend_mask(mask), 0.2,
                            is_weights=garbage_pad(w, mask))
    loss2.backward()
    # appended columns only reorder the float sums, hence 1e-12 and not ==
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    assert all(m2[k].item() == pytest.approx(m[k].item(), rel=1e-12) for k in m)
    torch.testing.assert_close(lp2.grad[:, :T], lp1.grad)
    assert (lp2.grad * (1 - extend_mask(mask)) == 0).all()  # no gradient (and no NaN) on padding


def test_policy_loss_clipping_hand():
    # eps = 0.2, 5 tokens (A, ratio): loss terms max(-A r, -A clip(r)), d/dlogp = -A r / 5 if unclipped
    #  (+1, 1.5) clipped:  max(-1.5, -1.2) = -1.2, grad 0   (would push ratio further up)
    #  (+1, 0.5) unclipped: max(-0.5, -0.8) = -0.5, grad -0.1 (pulls ratio back up)
    #  (-1, 0.5) clipped:  max( 0.5,  0.8) =  0.8, grad 0   (would push ratio further down)
    #  (-1, 1.5) unclipped: max( 1.5,  1.2) =  1.5, grad  0.3
    #  (+1, 1.1) inside:   -1.1, grad -0.22
    # loss = (-1.2 - 0.5 + 0.8 + 1.5 - 1.1) / 5 = -0.1; clipfrac = 4 / 5 = 0.8
    # approx_kl = mean((r - 1) - ln r) = (2 * 0.0945349 + 2 * 0.1931472 + 0.0046898) / 5 = 0.1160108
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]])).requires_grad_()
    loss, m = policy_loss(logp, torch.zeros(1, 5), adv, torch.ones(1, 5), clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-0.1, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.1, 0.0, 0.3, -0.22]]))
    assert m["clipfrac"].item() == pytest.approx(0.8)
    assert m["approx_kl"].item() == pytest.approx(0.1160108, abs=1e-6)
    assert m["ratio_mean"].item() == pytest.approx(1.02)  # (1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5


def test_truncated_is_weights_hand():
    # pi_old / pi_behaviour = [2, 0.5, (padding)], cap 1.5 -> [1.5, 0.5, 0]
    w = truncated_is_weights(torch.log(torch.tensor([[0.4, 0.1, 0.3]])), torch.log(torch.tensor([[0.2, 0.2, 0.0]])),
                             torch.tensor([[1, 1, 0]]), cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 0.0]]))


# ----------------------------------------------------------------------------- value loss

def test_value_loss_hand():
    # eps = 0.2; per token (V, V_old, R) -> unclipped (V-R)^2, clipped (V_old + clip(V-V_old) - R)^2
    #  (1.0, 0.5, 1.0): 0,   (0.7 - 1)^2 = 0.09  -> 0.09 (clipped branch: no gradient)
    #  (0.0, 0.1, 1.0): 1.0, (0.0 - 1)^2 = 1.0   -> 1.0
    #  (2.0, 1.0, 0.0): 4.0, (1.2 - 0)^2 = 1.44  -> 4.0  (gradient 2 (V-R) = 4)
    # loss = 0.5 * (0.09 + 1 + 4) / 3 = 0.8483333
    v = torch.tensor([[1.0, 0.0, 2.0, 5.0]], requires_grad=True)
    loss = value_loss(v, torch.tensor([[0.5, 0.1, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0, 3.0]]),
                      torch.tensor([[1, 1, 1, 0]]), clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.8483333, abs=1e-6)
    assert v.grad[0, 0].item() == 0.0 and v.grad[0, 3].item() == 0.0
    assert v.grad[0, 2].item() == pytest.approx(0.5 * 4 / 3)


def test_value_loss_matches_loop_and_ignores_padding():
    mask, v, old, ret = padded_mask(), rand(4, T, seed=10), rand(4, T, seed=11), rand(4, T, seed=12)
    loss = value_loss(v, old, ret, mask, 0.2)
    terms = []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            clipped = old[b, t].item() + min(max(v[b, t].item() - old[b, t].item(), -0.2), 0.2)
            terms.append(max((v[b, t].item() - ret[b, t].item()) ** 2, (clipped - ret[b, t].item()) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), rel=1e-12)
    loss2 = value_loss(garbage_pad(v, mask), garbage_pad(old, mask), garbage_pad(ret, mask), extend_mask(mask), 0.2)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)


# ------------------------------------------------------------------- reward-model losses

def test_pairwise_reward_loss_hand_and_stable():
    # -log sigmoid(0) = ln 2 = 0.693147; -log sigmoid(1) = ln(1 + e^-1) = 0.313262
    loss = pairwise_reward_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((0.693147 + 0.313262) / 2, abs=1e-6)
    big = pairwise_reward_loss(torch.tensor([-200.0]), torch.tensor([0.0]))  # log(sigmoid) would be -inf
    assert big.item() == pytest.approx(200.0)
    # weights 1 and 1/6 (a pair of a K = 4 ranking): (0.693147 + 0.313262 / 6) / (7 / 6)
    weighted = pairwise_reward_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1 / 6]))
    assert weighted.item() == pytest.approx((0.693147 + 0.313262 / 6) / (7 / 6), abs=1e-6)


def test_ranking_loss_k2_equals_pairwise():
    scores = rand(5, 2, seed=13)
    ranks = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]])
    chosen = scores.gather(1, ranks.argmin(1, keepdim=True)).squeeze(1)
    rejected = scores.gather(1, ranks.argmax(1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(ranking_reward_loss(scores, ranks), pairwise_reward_loss(chosen, rejected))
    # hand: scores [1, 0], ranks [0, 1] -> -log sigmoid(1) = 0.313262
    assert ranking_reward_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]])).item() == pytest.approx(0.313262, abs=1e-6)


def test_ranking_loss_k4_is_mean_of_pairwise_terms():
    K, scores = 4, rand(3, 4, seed=14)
    ranks = torch.stack([torch.randperm(K, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    per_prompt = []
    for b in range(3):
        pairs = [(i, j) for i in range(K) for j in range(K) if ranks[b, i] < ranks[b, j]]
        assert len(pairs) == math.comb(K, 2) == 6
        per_prompt.append(sum(math.log1p(math.exp(-(scores[b, i] - scores[b, j]).item())) for i, j in pairs) / 6)
    assert ranking_reward_loss(scores, ranks).item() == pytest.approx(sum(per_prompt) / 3, rel=1e-12)
    w = torch.tensor([2.0, 1.0, 0.5], dtype=scores.dtype)  # weighted mean over prompts
    want = sum(wi * p for wi, p in zip(w.tolist(), per_prompt)) / 3.5
    assert ranking_reward_loss(scores, ranks, w).item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        ranking_reward_loss(scores, torch.tensor([[0, 1, 2, 3], [0, 0, 1, 3], [3, 2, 1, 0]]))


def test_ranking_loss_leaves_tied_pairs_out():
    # ranks [0, 0, 2]: responses 0 and 1 tie for best; only (0, 2) and (1, 2) are comparisons,
    # each -log sigmoid(s_i - s_2), over C(3, 2) = 3 as without ties
    scores = torch.tensor([[2.0, -1.0, 0.5]])
    want = (math.log1p(math.exp(-(2.0 - 0.5))) + math.log1p(math.exp(-(-1.0 - 0.5)))) / 3
    assert ranking_reward_loss(scores, torch.tensor([[0, 0, 2]])).item() == pytest.approx(want, rel=1e-6)
    # swapping the tied pair's scores changes nothing the tie says nothing about
    assert ranking_reward_loss(scores[:, [1, 0, 2]], torch.tensor([[0, 0, 2]])).item() == pytest.approx(want, rel=1e-6)


def test_sft_loss_and_entropy_hand():
    # NLL token-mean over real tokens: (1 + 2 + 3) / 3 = 2; padding is NaN and ignored
    lp = torch.tensor([[-1.0, -2.0], [-3.0, float("nan")]])
    assert sft_loss(lp, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(2.0)
    # uniform logits over V = 4 have entropy ln 4 = 1.386294; padded logits are garbage
    logits = torch.zeros(2, 3, 4)
    logits[1, 2] = torch.tensor([float("nan"), 1e30, 0.0, 1.0])
    ent = entropy_bonus(logits, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert ent.item() == pytest.approx(math.log(4), abs=1e-6)


# ------------------------------------------------------------------------------------- kl

def test_kl_estimators_hand():
    # p = 0.5, q = 0.25: k1 = ln 2 = 0.693147; k2 = 0.5 * ln(2)^2 = 0.240227;
    # k3: r = q / p = 0.5 -> (0.5 - 1) - ln 0.5 = 0.193147
    lp, lq = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    got = [kl_estimate(lp, lq, k).item() for k in ("k1", "k2", "k3")]
    assert got == pytest.approx([0.693147, 0.240227, 0.193147], abs=1e-6)
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(lp, lq, "k4")


def test_kl_estimators_loop_nonneg_and_unbiased():
    lp, lq = rand(4, T, seed=15), rand(4, T, seed=16)
    for kind, fn in {"k1": lambda a, b: a - b, "k2": lambda a, b: 0.5 * (a - b) ** 2,
                     "k3": lambda a, b: math.exp(b - a) - 1 - (b - a)}.items():
        ref = [[fn(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(lp.tolist(), lq.tolist())]
        torch.testing.assert_close(kl_estimate(lp, lq, kind), torch.tensor(ref, dtype=torch.float64))
    assert (kl_estimate(lp, lq, "k3") >= 0).all() and (kl_estimate(lp, lq, "k2") >= 0).all()
    # Monte Carlo: tokens sampled from p, k1 and k3 average to the exact KL(p || q)
    gen = torch.Generator().manual_seed(17)
    p, q = torch.softmax(torch.randn(6, generator=gen), 0), torch.softmax(torch.randn(6, generator=gen), 0)
    exact = (p * (p / q).log()).sum().item()
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=gen)
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[tokens], q.log()[tokens], kind).mean().item()
        assert est == pytest.approx(exact, abs=0.01), kind


def test_adaptive_kl_controller_hand_and_clip():
    # Ziegler: init 0.15, target 6, horizon 10000, n_steps 256
    # KL 6.6: error = 6.6/6 - 1 = 0.1 -> mult = 1 + 0.1 * 256/10000 = 1.00256 -> 0.150384
    c = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    c.update(6.6, 256)
    assert c.value == pytest.approx(0.150384)
    # KL 60: error 9 clipped to +0.2 -> mult 1.00512; KL 0: error -1 clipped to -0.2 -> mult 0.99488
    c.update(60.0, 256)
    assert c.value == pytest.approx(0.150384 * 1.00512)
    c.update(torch.tensor(0.0), 256)
    assert c.value == pytest.approx(0.150384 * 1.00512 * 0.99488)
    resumed = AdaptiveKLController(0.15, target=6.0, horizon=10_000)
    resumed.load_state_dict(c.state_dict())
    assert resumed.value == c.value
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.15, target=0.0, horizon=10_000)


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 256)
    assert c.value == 0.05
    d = FixedKLController(0.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05


@pytest.mark.parametrize("ranks,stage,offload,runs", [
    (1, 2, False, 0), (1, 1, False, 0), (1, 0, False, 0), (1, 3, False, 3), (1, 2, True, 2),
    (2, 2, False, 2), (2, 1, False, 1), (4, 3, False, 3),
])
def test_one_rank_zero_1_2_runs_as_stage_0(ranks, stage, offload, runs):
    from tidal.common.config import load_config
    from tidal.learner.engine import ds_config, effective_zero_stage

    lc = load_config(None, [f"learner.zero_stage={stage}", f"learner.offload={str(offload).lower()}",
                            f"learner.num_workers={ranks}", "learner.mini_batch_size=8",
                            "learner.micro_batch_size=2"]).learner
    assert effective_zero_stage(lc, ranks) == runs
    assert ds_config(lc, ranks, bf16=False)["zero_optimization"]["stage"] == runs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_equal_the_separate_ops(temperature):
    from tidal.common.ops import entropy_from_logits, logprobs_and_entropy, logprobs_from_logits

    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0), requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    lp, ent = logprobs_and_entropy(logits, labels, temperature)
    assert torch.allclose(lp, logprobs_from_logits(logits, labels, temperature), atol=1e-6)
    assert torch.allclose(ent, entropy_from_logits(logits, temperature), atol=1e-6)
    assert lp.requires_grad and not ent.requires_grad  # the entropy is a metric unless entropy_grad
    lp2, ent2 = logprobs_and_entropy(logits, labels, temperature, entropy_grad=True)
    (g,) = torch.autograd.grad(ent2.sum(), logits)
    (want,) = torch.autograd.grad(entropy_from_logits(logits, temperature).sum(), logits)
    assert torch.allclose(g, want, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_divides_the_float32_logits(temperature):
    """bf16 logits (autocast): the temperature divides their float32 values, so the quotient is
    not rounded to bf16's 8 mantissa bits before the log-softmax; the gradient still reaches them."""
    from tidal.common.ops import entropy_from_logits, logprobs_from_logits

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 1000, generator=g) * 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 1000, (3, 5), generator=g)
    want = torch.log_softmax(logits.detach().float() / temperature, -1)  # (3, 5, V)
    lp = logprobs_from_logits(logits, labels, temperature)
    assert lp.dtype == torch.float32
    assert torch.equal(lp, want.gather(-1, labels[..., None]).squeeze(-1))
    assert torch.equal(entropy_from_logits(logits.detach(), temperature), -(want.exp() * want).sum(-1))
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.abs().sum() > 0
    # float32 logits are not modified in place by the division
    f32 = logits.detach().float()
    before = f32.clone()
    logprobs_from_logits(f32, labels, temperature)
    assert torch.equal(f32, before)
