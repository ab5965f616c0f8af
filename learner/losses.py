"""Training losses: the policy-gradient losses (PPO's clipped surrogate, GSPO, CISPO) and their
aggregation, the value loss, reward-model losses, SFT, entropy, DPO.

Pure torch. Per-token tensors are (B, T) over response tokens, `mask` is 1 on real response
tokens; a policy-gradient loss is aggregated over them as `Aggregation` says (the token mean by
default); the other per-token losses are token means over all real tokens of the batch. Padded inputs
are zeroed with `torch.where` before any arithmetic, so garbage there (even inf/NaN) can change
neither a loss nor its gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tidal.common.ops import entropy_from_logits, masked_mean


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


@dataclass(frozen=True)
class Aggregation:
    """How a policy-gradient loss weighs its tokens and sequences (algorithm.loss_agg,
    docs/algorithms.md#loss-aggregation). Over per-token losses l (B, T):

        loss = sum_{i,t} w_it * l_it / mass

      token_mean           w = 1,        mass = real tokens   every token weighs the same (DAPO)
      seq_mean_token_mean  w = 1 / |y_i|, mass = responses     every response weighs the same (GRPO paper)
      seq_mean_token_sum   w = 1 / L,     mass = responses     token sums, L = rollout.max_new_tokens
                                                               a constant (Dr. GRPO): no length normalisation

    w is 0 on padding; a response with no real token (a zero-weight fill row, a filtered one) is
    not counted. Split over micro-batches and ranks, each micro-batch's loss is scaled by its
    mass's share of the minibatch's (LearnerWorker.token_scale): the minibatch's loss is then this
    formula over the whole minibatch."""

    weights: torch.Tensor  # (B, T)
    mass: float

    @staticmethod
    def of(mask: torch.Tensor, mode: str = "token_mean", max_len: int | None = None) -> "Aggregation":
        """The aggregation of `mode` over the real tokens of mask (B, T)."""
        mask = mask if mask.is_floating_point() else mask.float()
        lengths = mask.sum(-1)  # (B,)
        if mode == "token_mean":
            return Aggregation(mask, lengths.sum().item())
        rows = (lengths > 0).sum().item()
        if mode == "seq_mean_token_mean":
            return Aggregation(mask / lengths.clamp(min=1.0)[:, None], rows)
        if mode == "seq_mean_token_sum":
            if not max_len or max_len <= 0:
                raise ValueError("seq_mean_token_sum divides by the constant response budget: pass max_len > 0")
            return Aggregation(mask / float(max_len), rows)
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")

    def __call__(self, per_token: torch.Tensor) -> torch.Tensor:
        """sum(w * l) / mass of per-token values (B, T), finite on padding (the losses zero it)."""
        w = self.weights.to(per_token.device, per_token.dtype)
        return torch.where(w != 0, per_token * w, 0.0).sum() / max(self.mass, 1.0)


def _sanitized(logprobs, old_logprobs, advantages, mask):
    """(real, logratio, advantages, logprobs), padding zeroed before any arithmetic."""
    real = mask.bool()
    logratio = torch.where(real, logprobs - old_logprobs, 0.0)  # (B, T)
    return real, logratio, torch.where(real, advantages, 0.0).detach(), torch.where(real, logprobs, 0.0)


def _aggregate(per_token, ratio, logratio, clipped, mask, is_weights, agg):
    """The aggregated loss of per-token losses (B, T), times `is_weights` where given, and the
    metrics every policy loss reports (token means over the real tokens of mask)."""
    real = mask.bool()
    if is_weights is not None:
        per_token = per_token * torch.where(real, is_weights, 0.0).detach()
    loss = (agg or Aggregation.of(mask))(per_token)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - logratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def policy_loss(
    logprobs: torch.Tensor,  # (B, T) log pi_theta(a_t), with grad
    old_logprobs: torch.Tensor,  # (B, T) log pi_old(a_t) at collection
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    clip_eps: float,
    clip_eps_high: float | None = None,
    *,
    is_weights: torch.Tensor | None = None,  # (B, T) mismatch-correction weights, or None
    agg: Aggregation | None = None,  # None: token mean over mask
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), minimized, with DAPO's clip-higher
    (Yu et al. 2025: a separate upper range, clip_eps_high, default clip_eps):

        ratio = pi_theta / pi_old
        l_t   = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))

    aggregated by `agg` (default: the token mean). `is_weights` (B, T): per-token weights,
    treated as constants, that multiply each token's loss before the aggregation: the
    corrections for samples drawn by an older or numerically different behaviour policy (the
    rollout engine) than pi_old (tidal.learner.mismatch).

    Metrics (detached float tensors, token means over mask):
      clipfrac   - fraction of real tokens with the ratio outside the clip range (CleanRL's |ratio - 1| > eps)
      approx_kl  - k3 estimate of KL(pi_old || pi_theta): (ratio - 1) - log ratio,
                   unbiased with samples from pi_old and never negative
      ratio_mean - mean ratio
    """
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    _, logratio, advantages, _ = _sanitized(logprobs, old_logprobs, advantages, mask)
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi)
    per_token = torch.max(pg_loss1, pg_loss2)  # (B, T) pessimistic bound
    clipped = (ratio < 1.0 - clip_eps) | (ratio > 1.0 + hi)
    return _aggregate(per_token, ratio, logratio, clipped, mask, is_weights, agg)


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float, clip_eps_high: float | None = None, *, is_weights: torch.Tensor | None = None,
              agg: Aggregation | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one importance ratio per
    response, length-normalised, clipped as a whole. Tensors as policy_loss's, (B, T).

        s_i   = (pi_theta(y_i) / pi_old(y_i)) ^ (1 / |y_i|) = exp(mean_t log ratio_it)
        l_it  = max(-A_it * s_it, -A_it * clip(s_it, 1 - clip_eps, 1 + clip_eps_high))
        s_it  = sg(s_i) * pi_theta(y_it) / sg(pi_theta(y_it))      (GSPO-token: value s_i)

    With the advantage constant along a response (GRPO's, without a per-token KL penalty) and
    the seq_mean_token_mean aggregation (the entry's default), the loss and its gradient are the
    paper's sequence-level objective (1/G) sum_i max(-A_i s_i, -A_i clip(s_i)): the gradient of
    s_i is s_i / |y_i| * sum_t grad log pi_theta(y_it). clipfrac counts the tokens of clipped responses."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    real, logratio, advantages, lp = _sanitized(logprobs, old_logprobs, advantages, mask)
    seq_logratio = logratio.sum(-1) / mask.to(logratio.dtype).sum(-1).clamp(min=1.0)  # (B,) log s_i
    log_s = lp - lp.detach() + seq_logratio.detach()[:, None]  # (B, T): value log s_i, gradient d log pi_theta
    s = log_s.exp()
    per_token = torch.max(-advantages * s, -advantages * torch.clamp(s, 1.0 - clip_eps, 1.0 + hi))
    clipped = ((s < 1.0 - clip_eps) | (s > 1.0 + hi)) & real
    return _aggregate(per_token, logratio.exp(), logratio, clipped, mask, is_weights, agg)


def cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_eps: float, clip_eps_high: float | None = None, *, is_weights: torch.Tensor | None = None,
               agg: Aggregation | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention"): a REINFORCE loss whose importance weight is clipped and carries no gradient,
    so no token's gradient is ever dropped (PPO's clip zeroes the gradient of clipped tokens).
    Tensors as policy_loss's, (B, T).

        l_t = -sg(clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high)) * A_t * log pi_theta(y_t)

    The paper clips only from above (set clip_eps >= 1 for no lower bound). clipfrac: the share
    of tokens whose weight was clipped."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    _, logratio, advantages, lp = _sanitized(logprobs, old_logprobs, advantages, mask)
    ratio = logratio.exp()
    weight = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + hi).detach()
    per_token = -weight * advantages * lp
    clipped = (ratio < 1.0 - clip_eps) | (ratio > 1.0 + hi)
    return _aggregate(per_token, ratio, logratio, clipped, mask, is_weights, agg)


def truncated_is_weights(
    old_logprobs: torch.Tensor,  # (B, T) log pi_old, recomputed by the trainer
    rollout_logprobs: torch.Tensor,  # (B, T) log pi_behaviour, as reported by the rollout engine
    mask: torch.Tensor,  # (B, T)
    cap: float,
) -> torch.Tensor:
    """Truncated importance sampling weights min(pi_old / pi_behaviour, cap), detached, 0 on
    padding -> (B, T). Truncation (as in IMPALA's V-trace rho-bar) trades a small bias for
    bounded variance when the engine's sampler drifts from the trainer (docs/implementation.md#c5)."""
    if cap <= 0:
        raise ValueError(f"is-weight cap must be > 0, got {cap}")
    real = mask.bool()
    log_w = torch.where(real, old_logprobs - rollout_logprobs, 0.0)
    return torch.where(real, log_w.exp().clamp(max=cap), 0.0).detach()


def value_loss(
    values: torch.Tensor,  # (B, T) V_theta(s_t), with grad
    old_values: torch.Tensor,  # (B, T) values at collection
    returns: torch.Tensor,  # (B, T) GAE returns
    mask: torch.Tensor,  # (B, T)
    clip_eps: float,
) -> torch.Tensor:
    """Clipped value loss (docs/implementation.md#d8): 0.5 * token-mean of
    max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2). The clip keeps the critic
    from moving further than eps from its collection-time prediction in one update."""
    real = mask.bool()
    values = torch.where(real, values, 0.0)
    old_values = torch.where(real, old_values, 0.0).detach()
    returns = torch.where(real, returns, 0.0).detach()
    v_loss_unclipped = (values - returns) ** 2
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)


def weighted_mean(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum(w x) / sum(w) over (B,) values, or their plain mean without weights."""
    if weights is None:
        return x.mean()
    if weights.shape != x.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and values {tuple(x.shape)} differ")
    weights = weights.to(x.device, x.dtype)
    return (x * weights).sum() / weights.sum()


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry loss for a reward model: mean of -log sigmoid(r_chosen - r_rejected), weighted
    by `weights` (B,) when given (a comparison's weight, see tidal.common.data).
    chosen, rejected (B,). logsigmoid stays finite for large margins where log(sigmoid) is -inf."""
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
    return weighted_mean(-F.logsigmoid(chosen - rejected), weights)


def ranking_reward_loss(scores: torch.Tensor, ranks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """InstructGPT reward-model loss (Ouyang et al. 2022; docs/implementation.md#d11): K ranked
    responses per prompt give C(K, 2) comparisons; each prompt's sum over its pairs is scaled by
    1 / C(K, 2), then averaged over prompts (weighted by `weights` (B,) when given). scores (B, K)
    float, ranks (B, K) long with 0 = best; every row of ranks is a permutation of 0..K-1 or, with
    ties, a standard competition ranking ([0, 0, 2]; tidal.common.data.ranking_problem). A tied pair
    is no comparison: it adds no term (the 1 / C(K, 2) stays, so a prompt with ties weighs what its
    preferences hold)."""
    if scores.dim() != 2 or scores.shape != ranks.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and ranks {tuple(ranks.shape)} must both be (B, K)")
    B, K = scores.shape
    if K < 2:
        raise ValueError(f"ranking needs K >= 2 responses per prompt, got K={K}")
    ordered = ranks.sort(-1).values  # (B, K): each place holds its index, or ties the place before
    before = torch.cat([torch.full_like(ordered[:, :1], -1), ordered[:, :-1]], dim=1)
    place = torch.arange(K, device=ranks.device)
    bad = ((ordered != place) & (ordered != before)).any(-1).nonzero().flatten()
    if len(bad):
        raise ValueError(f"ranks rows {bad.tolist()} are not rankings of 0..{K - 1} (0 = best; ties share a rank "
                         "and the next rank skips their places: [0, 0, 2])")
    margin = scores[:, :, None] - scores[:, None, :]  # (B, K, K): s_i - s_j
    i_better = ranks[:, :, None] < ranks[:, None, :]  # (B, K, K): pair (i, j) with i preferred
    pair_losses = torch.where(i_better, -F.logsigmoid(margin), 0.0)  # one term per ordered pair
    return weighted_mean(pair_losses.sum((1, 2)) / math.comb(K, 2), weights)


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood, token-mean over real tokens. logprobs (B, T), mask (B, T)."""
    return -masked_mean(torch.where(mask.bool(), logprobs, 0.0), mask)


def entropy_bonus(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Token-mean policy entropy over real tokens. logits (B, T, V), mask (B, T) -> scalar.
    The trainer subtracts coef * this from its loss to keep exploration alive."""
    entropy = entropy_from_logits(logits, temperature)  # (B, T)
    return masked_mean(torch.where(mask.bool(), entropy, 0.0), mask)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,  # (B,) sum of log pi_theta over the chosen response, with grad
    policy_rejected_logps: torch.Tensor,  # (B,) same for the rejected response
    ref_chosen_logps: torch.Tensor,  # (B,) log pi_ref of the chosen response (frozen SFT model)
    ref_rejected_logps: torch.Tensor,  # (B,)
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    weights: torch.Tensor | None = None,  # (B,) each pair's weight; None: all 1
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation on sequence log-probs, mean over the B pairs, weighted by
    `weights` when given: sum(w_i loss_i) / sum(w_i). The pairs of one K-wise ranking each weigh
    1 / C(K, 2) (tidal.learner.dpo), so a ranking counts as one comparison, as in InstructGPT's
    ranking loss, instead of C(K, 2) of them.

    With the log-ratios rho_c = pc - rc and rho_r = pr - rr and h = rho_c - rho_r:
      sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta * h); with label_smoothing eps
          (conservative DPO: each label is wrong with probability eps) it becomes
          -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h);
      ipo (IPO, Azar et al. 2023):  (h - 1 / (2 beta))^2, which regresses the margin to a finite
          target instead of pushing it to infinity when the preferences are deterministic.
          On summed log-probs as the paper writes it; pass per-token means for TRL's
          length-normalised form (`dpo_batch_loss` with loss_type "ipo_mean").
    Reference log-probs are constants (detached). Metrics (detached): rewards/chosen and
    rewards/rejected are the implicit rewards beta * rho averaged over pairs, rewards/margin
    their difference, rewards/accuracy the share of pairs with chosen reward > rejected reward
    (per pair, unweighted).
    """
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"dpo_loss takes four (B,) tensors of one shape, got shapes {sorted(shapes)}")
    if not beta > 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()  # (B,)
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("dpo label_smoothing applies to loss_type 'sigmoid' only; set it to 0 for 'ipo'")
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo loss_type {loss_type!r}; choose 'sigmoid' (DPO) or 'ipo'")
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        }
    return weighted_mean(losses, weights), metrics
