"""The policy-gradient toolkit against the papers' equations, written out by hand below as
plain-Python loops over random padded batches (float64, to 1e-6): the loss aggregations, DAPO's
clip-higher and soft overlong punishment, GSPO, CISPO, Dr. GRPO's and REINFORCE++'s advantages,
and the engine/trainer mismatch corrections (TIS, sequence masking, IcePop). Losses are checked
in value and in gradient (autograd against the gradient derived by hand). The equations are
the papers' as we know them (no reference code was at hand); docs/implementation.md#d12 notes
where tidal agrees with the peers' implementations and where it differs on purpose."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tidal.common.config import ConfigError, load_config
from tidal.learner.advantages import dr_grpo_advantages, outcome_advantages, overlong_penalty
from tidal.learner.algorithms import ALGORITHMS, algorithm_for, check_config, clip_range, loss_aggregation
from tidal.learner.experience import ForwardPass, assemble_experience
from tidal.learner.losses import Aggregation, cispo_loss, gspo_loss, policy_loss
from tidal.learner.mismatch import Correction, correction_for

LENGTHS = [6, 2, 4, 1, 6, 3]  # real response tokens per row; T = 6
T = 6
TOL = dict(rtol=0, atol=1e-6)


def mask_of(lengths=LENGTHS) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)


def rand(*shape, seed=0, scale=1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(got, want) -> None:
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               **TOL)


def agg_loop(per_token, lengths, mode, max_len=T) -> float:
    """The three aggregations as written in the papers (rows with no token do not count):
    token_mean (DAPO):            sum_i sum_t l_it / sum_i |y_i|
    seq_mean_token_mean (GRPO):   1/G sum_i (1/|y_i|) sum_t l_it
    seq_mean_token_sum (Dr. GRPO): 1/G sum_i sum_t l_it / L"""
    rows = [(i, n) for i, n in enumerate(lengths) if n > 0]
    sums = {i: sum(per_token[i][t] for t in range(n)) for i, n in rows}
    if mode == "token_mean":
        return sum(sums.values()) / sum(n for _, n in rows)
    if mode == "seq_mean_token_mean":
        return sum(sums[i] / n for i, n in rows) / len(rows)
    return sum(sums[i] / max_len for i, _ in rows) / len(rows)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_loss_aggregations_hand(mode):
    lengths = LENGTHS[:-1] + [0]  # a row with no token (a zero-weight fill row) counts for nothing
    l = rand(len(lengths), T, seed=1) * mask_of(lengths)
    got = Aggregation.of(mask_of(lengths), mode, max_len=T)(l)
    close(got, agg_loop(l.tolist(), lengths, mode))


def test_aggregations_weigh_a_short_and_a_long_response_as_the_docs_say():
    """docs/algorithms.md#loss-aggregation's worked example: a 2-token and an 8-token response,
    budget L = 16: the share of the loss (and gradient) each token gets, w_it / mass."""
    m = torch.tensor([[1.0] * 2 + [0.0] * 14, [1.0] * 8 + [0.0] * 8], dtype=torch.float64)
    weights = {mode: Aggregation.of(m, mode, 16) for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")}
    per_token = {mode: (a.weights[:, 0] / a.mass).tolist() for mode, a in weights.items()}
    assert per_token["token_mean"] == pytest.approx([1 / 10, 1 / 10])
    assert per_token["seq_mean_token_mean"] == pytest.approx([1 / 4, 1 / 16])
    assert per_token["seq_mean_token_sum"] == pytest.approx([1 / 32, 1 / 32])


def _inputs(seed, spread=0.3):
    mask = mask_of()
    old = rand(len(LENGTHS), T, seed=seed) - 2.0
    lp = (old + rand(len(LENGTHS), T, seed=seed + 1, scale=spread)).requires_grad_(True)
    adv = rand(len(LENGTHS), T, seed=seed + 2)
    return lp, old, adv, mask


def _grad(loss, lp):
    (g,) = torch.autograd.grad(loss, lp)
    return g


def test_clip_higher_hand():
    """DAPO (Yu et al. 2025), eq. 10: l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)),
    token mean. d l / d log pi = -A r where the unclipped term is the max (or r is inside the
    range), else 0."""
    lo, hi = 0.2, 0.28
    lp, old, adv, mask = _inputs(3)
    loss, m = policy_loss(lp, old, adv, mask, lo, hi)
    n = sum(LENGTHS)
    want_loss, want_grad, clipped = 0.0, torch.zeros(len(LENGTHS), T, dtype=torch.float64), 0
    for i, length in enumerate(LENGTHS):
        for t in range(length):
            r, a = math.exp(lp[i, t].item() - old[i, t].item()), adv[i, t].item()
            c = min(max(r, 1 - lo), 1 + hi)
            want_loss += max(-a * r, -a * c) / n
            inside = 1 - lo <= r <= 1 + hi
            clipped += not inside
            want_grad[i, t] = -a * r / n if inside or -a * r > -a * c else 0.0
    close(loss, want_loss)
    close(_grad(loss, lp), want_grad)
    close(m["clipfrac"], clipped / n)
    # the upper range matters on this batch: a symmetric clip at 0.2 gives another loss
    assert abs(policy_loss(lp, old, adv, mask, lo)[0].item() - want_loss) > 1e-4


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean"])
def test_gspo_hand(mode):
    """GSPO (Zheng et al. 2025), eq. 5-7: s_i = exp(1/|y_i| sum_t log(pi/pi_old)),
    J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps) A_i); grad s_i = s_i / |y_i| sum_t grad log pi.
    Sequence advantages A_i (broadcast over the response), a clip narrow enough to bite."""
    lo, hi = 0.03, 0.04
    lp, old, _, mask = _inputs(7, spread=0.1)
    a_seq = rand(len(LENGTHS), seed=9)
    adv = a_seq[:, None] * mask
    loss, m = gspo_loss(lp, old, adv, mask, lo, hi, agg=Aggregation.of(mask, mode))
    seq_loss, seq_grad, clipped_rows = [], [], []
    for i, n in enumerate(LENGTHS):
        s = math.exp(sum(lp[i, t].item() - old[i, t].item() for t in range(n)) / n)
        a, c = a_seq[i].item(), min(max(s, 1 - lo), 1 + hi)
        seq_loss.append(max(-a * s, -a * c))
        inside = 1 - lo <= s <= 1 + hi
        clipped_rows.append(not inside)
        seq_grad.append(-a * s / n if inside or -a * s > -a * c else 0.0)  # d l_i / d log pi_it, every t
    total, g = sum(LENGTHS), len(LENGTHS)
    if mode == "seq_mean_token_mean":  # the paper's objective
        want = sum(seq_loss) / g
        want_grad = [[seq_grad[i] / g if t < n else 0.0 for t in range(T)] for i, n in enumerate(LENGTHS)]
    else:  # every token of response i carries l_i: response i weighs |y_i| / sum |y|
        want = sum(n * l for n, l in zip(LENGTHS, seq_loss)) / total
        want_grad = [[seq_grad[i] * n / total if t < n else 0.0 for t in range(T)] for i, n in enumerate(LENGTHS)]
    close(loss, want)
    close(_grad(loss, lp), want_grad)
    assert any(clipped_rows) and not all(clipped_rows)
    close(m["clipfrac"], sum(n for n, c in zip(LENGTHS, clipped_rows) if c) / total)


def test_cispo_hand():
    """CISPO (MiniMax-M1, eq. 4): J = 1/sum|y| sum_i sum_t sg(clip(r_it, 1 - eps_low, 1 + eps_high)) A_it log pi_it;
    the gradient of every token is -clip(r) A / sum|y|, clipped or not."""
    lo, hi = 1.0, 0.1  # the paper: no lower bound, an upper one
    lp, old, adv, mask = _inputs(11)
    loss, m = cispo_loss(lp, old, adv, mask, lo, hi)
    n = sum(LENGTHS)
    want, want_grad, clipped = 0.0, torch.zeros(len(LENGTHS), T, dtype=torch.float64), 0
    for i, length in enumerate(LENGTHS):
        for t in range(length):
            r = math.exp(lp[i, t].item() - old[i, t].item())
            w = min(max(r, 1 - lo), 1 + hi)
            clipped += r > 1 + hi
            want += -w * adv[i, t].item() * lp[i, t].item() / n
            want_grad[i, t] = -w * adv[i, t].item() / n
    close(loss, want)
    close(_grad(loss, lp), want_grad)
    close(m["clipfrac"], clipped / n)
    assert clipped > 0


def test_policy_losses_ignore_padding_garbage_and_take_is_weights():
    lp, old, adv, mask = _inputs(13)
    w = rand(len(LENGTHS), T, seed=14).abs()
    junk = torch.full_like(old, float("nan"))
    for fn in (policy_loss, gspo_loss, cispo_loss):
        clean, _ = fn(lp, old, adv, mask, 0.2, 0.3, is_weights=w)
        dirty, _ = fn(torch.where(mask.bool(), lp, junk), torch.where(mask.bool(), old, junk),
                      torch.where(mask.bool(), adv, junk), mask, 0.2, 0.3, is_weights=torch.where(mask.bool(), w, junk))
        close(dirty, clean)
        assert torch.isfinite(_grad(dirty, lp)).all()
        plain, _ = fn(lp, old, adv, mask, 0.2, 0.3)
        assert abs(plain.item() - clean.item()) > 1e-4  # the weights are used


# ------------------------------------------------------------------------------------- advantages

def _fwd(scores_len, kl, mask):
    B = scores_len
    zeros = torch.zeros(B, T, dtype=torch.float64)
    return ForwardPass(torch.zeros(B, 4, dtype=torch.long), torch.ones(B, 4, dtype=torch.long), mask,
                       old_logprobs=kl, ref_logprobs=zeros)


def test_dr_grpo_advantages_hand():
    """Dr. GRPO (Liu et al. 2025), eq. 3: A_i = r_i - mean_j r_j over the group, no std division;
    plus the KL penalty to go as every critic-free entry; never whitened."""
    g, scores = 3, rand(6, seed=21)
    s = scores.tolist()
    close(dr_grpo_advantages(scores, g), [x - sum(s[i // g * g:i // g * g + g]) / g for i, x in enumerate(s)])
    mask, kl, beta = mask_of(), rand(6, T, seed=22).abs(), 0.1
    exp = assemble_experience(_fwd(6, kl, mask), scores, "dr_grpo", g, beta, "k1", 1.0, 0.95, whiten=True)
    want = [[(s[i] - sum(s[i // g * g:i // g * g + g]) / g - beta * sum(kl[i, u].item() for u in range(t, n)))
             if t < n else 0.0 for t in range(T)] for i, n in enumerate(LENGTHS)]
    close(exp.advantages, want)
    assert algorithm_for("dr_grpo").loss_agg == "seq_mean_token_sum"


@pytest.mark.parametrize("whiten", [True, False])
def test_reinforce_pp_advantages_hand(whiten):
    """REINFORCE++ (Hu 2025), eq. 5-7: r_t = -beta KL_t (+ the score at the last token),
    G_t = sum_{t' >= t} r_t' (gamma 1), A = (G - mean G) / std G over every real token of the
    batch (Bessel-corrected std, + 1e-8 under the root: tidal's masked_whiten), whatever
    whiten_advantages says."""
    scores, mask, kl, beta = rand(6, seed=31), mask_of(), rand(6, T, seed=32).abs(), 0.05
    exp = assemble_experience(_fwd(6, kl, mask), scores, "reinforce_pp", 1, beta, "k1", 1.0, 0.95, whiten=whiten)
    ret = {(i, t): scores[i].item() - beta * sum(kl[i, u].item() for u in range(t, n))
           for i, n in enumerate(LENGTHS) for t in range(n)}
    mean = sum(ret.values()) / len(ret)
    std = math.sqrt(sum((v - mean) ** 2 for v in ret.values()) / (len(ret) - 1) + 1e-8)
    want = [[(ret[i, t] - mean) / std if t < n else 0.0 for t in range(T)] for i, n in enumerate(LENGTHS)]
    close(exp.advantages, want)
    close(outcome_advantages(scores, 1), scores)


def test_overlong_penalty_hand():
    """DAPO eq. 13: R_length = 0 for |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache
    inside the buffer, -1 past L_max; times the penalty factor."""
    lengths = torch.tensor([1, 11, 12, 13, 15, 16, 17])
    L, buf, f = 16, 4, 0.5
    want = [0.0 if n <= L - buf else (-1.0 if n > L else ((L - buf) - n) / buf) for n in lengths.tolist()]
    close(overlong_penalty(lengths, L, buf, f), [f * w for w in want])
    close(overlong_penalty(lengths, L, 0, f), [0.0] * len(lengths))


# ------------------------------------------------------------------------------------- mismatch

def _mismatch_inputs():
    mask = mask_of()
    old = rand(len(LENGTHS), T, seed=41) - 2.0
    engine = old + rand(len(LENGTHS), T, seed=42, scale=0.3)
    return old, engine, mask


@pytest.mark.parametrize("kind", ["tis", "seq_mask", "icepop"])
def test_mismatch_corrections_hand(kind):
    """TIS (Yao et al. 2025): w_t = min(pi_old / pi_engine, C); sequence masking (Liu et al. 2025,
    sequence-level MIS): w_it = 1[prod_t pi_old / pi_engine in [1/C, C]]; IcePop (Ring-1T):
    w_t = 1[pi_old / pi_engine in [1/C, C]]. token_share: tokens truncated or masked; seq_share:
    responses holding one."""
    C = 1.5
    old, engine, mask = _mismatch_inputs()
    w, touched = Correction(kind, C).weights(old, engine, mask)
    want, hit = torch.zeros(len(LENGTHS), T, dtype=torch.float64), []
    for i, n in enumerate(LENGTHS):
        ratios = [math.exp(old[i, t].item() - engine[i, t].item()) for t in range(n)]
        seq = math.prod(ratios)
        row = []
        for t, r in enumerate(ratios):
            if kind == "tis":
                want[i, t], h = min(r, C), r > C
            elif kind == "icepop":
                want[i, t], h = float(1 / C <= r <= C), not 1 / C <= r <= C
            else:
                want[i, t], h = float(1 / C <= seq <= C), not 1 / C <= seq <= C
            row.append(h)
        hit.append(row)
    close(w, want)
    close(touched["token_share"], sum(map(sum, hit)) / sum(LENGTHS))
    close(touched["seq_share"], sum(any(r) for r in hit) / len(LENGTHS))
    assert 0 < touched["token_share"] < 1


def test_mismatch_threshold_and_auto():
    with pytest.raises(ValueError, match="> 1"):
        Correction("icepop", 1.0)
    assert correction_for(load_config(None, []), off_policy=False) is None
    assert correction_for(load_config(None, []), off_policy=True) == Correction("tis", 2.0)
    assert correction_for(load_config(None, ["algorithm.mismatch_correction=none"]), off_policy=True) is None


# ------------------------------------------------------------------------------------- the table

def test_every_entry_cites_its_paper_and_resolves_its_settings():
    for algo in ALGORITHMS.values():
        assert re.search(r"\b(19|20)\d\d\b", algo.doc), f"{algo.name}: cite the paper (author year) in its doc"
        assert algo.whiten in ("never", "option", "always") and algo.loss_agg in (
            "token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
    cfg = load_config(None, ["algorithm.name=gspo", "rollout.n_samples=2"])
    assert loss_aggregation(cfg) == "seq_mean_token_mean" and clip_range(cfg) == (0.2, 0.2)
    cfg = load_config(None, ["algorithm.name=gspo", "algorithm.loss_agg=token_mean", "algorithm.clip_eps_high=0.28"])
    assert loss_aggregation(cfg) == "token_mean" and clip_range(cfg) == (0.2, 0.28)
    assert algorithm_for("gspo").loss is gspo_loss and algorithm_for("cispo").loss is cispo_loss


def test_no_code_outside_the_table_compares_algorithm_names():
    root = Path(__file__).resolve().parents[1]
    names = "|".join(ALGORITHMS)
    pattern = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*["']({names})["']|["']({names})["']\s*(==|!=|\bin\b)""")
    skip = {root / "learner" / "algorithms.py", root / "common" / "config_schema.py"}
    bad = [f"{p.relative_to(root)}:{n + 1}" for pkg in ("common", "actors", "driver", "commands", "rollout", "learner",
                                                         "reward_service", "feedback")
           for p in (root / pkg).glob("**/*.py") if p not in skip
           for n, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not bad, f"algorithm names compared outside learner/algorithms.py: {bad}"


@pytest.mark.parametrize("overrides, match", [
    (["algorithm.dynamic_sampling=true"], r"dynamic_sampling=true .* rollout\.n_samples >= 2 \(got 1\)"),
    (["algorithm.overlong_buffer=40"], r"overlong_buffer=40 is longer than rollout\.max_new_tokens=32"),
    (["algorithm.mismatch_correction=icepop", "algorithm.mismatch_threshold=1"], r"mismatch_threshold=1\.0 must be > 1"),
])
def test_toolkit_settings_that_cannot_work_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(load_config(None, overrides))
