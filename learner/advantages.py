"""Advantage estimation: GAE for PPO with a critic, group baselines for critic-free RL.

Pure torch. Per-token tensors are (B, T) over response tokens, `mask` is 1 on real response
tokens and 0 on padding (tidal.common.types: responses are right-padded). Nothing a padded
position holds may reach a real position's result, so padded inputs are zeroed with
`torch.where` (not `x * mask`, which turns garbage inf/NaN into NaN).
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,  # (B, T) per-token rewards
    values: torch.Tensor,  # (B, T) critic values V(s_t)
    mask: torch.Tensor,  # (B, T) 1 on real response tokens
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), backward recursion:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V   (the critic's regression target)

    V beyond the last real token is 0 (the episode ends there). Padded positions are skipped:
    they count as r = V = 0, carry nothing, and come back as 0 in both outputs.
    Returns (advantages, returns), both (B, T), detached.
    """
    real = mask.bool()
    rewards = torch.where(real, rewards, 0.0).detach()
    values = torch.where(real, values, 0.0).detach()
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # (B,) V_{t+1} of the next real token
    next_adv = rewards.new_zeros(B)  # (B,) A_{t+1} of the next real token
    advantages = torch.zeros_like(rewards)  # (B, T)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = delta + gamma * lam * next_adv
        # A padded column must not break the chain between real tokens: keep the carry.
        next_adv = torch.where(real[:, t], adv, next_adv)
        next_value = torch.where(real[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(real[:, t], adv, 0.0)
    returns = advantages + values
    return advantages, returns


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row. (B, T) -> (B,) long.
    Raises on a row with no real token: its reward would have nowhere to go."""
    real = mask.bool()
    empty = (~real.any(-1)).nonzero().flatten()
    if len(empty):
        raise ValueError(
            f"response mask rows {empty.tolist()} have no real token; drop empty responses "
            "before computing rewards (every sample needs at least its EOS token)"
        )
    cols = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(real, cols, -1).argmax(-1)  # the largest real column


def token_rewards(
    scores: torch.Tensor,  # (B,) sequence reward-model scores
    kl: torch.Tensor,  # (B, T) per-token KL estimate, policy vs reference
    mask: torch.Tensor,  # (B, T)
    kl_coef: float,
) -> torch.Tensor:
    """Per-token PPO reward (docs/implementation.md#d5): -kl_coef * kl at every real token, plus the
    sequence score at the last real token (docs/implementation.md#d1). Padding gets 0. -> (B, T)."""
    real = mask.bool()
    rewards = torch.where(real, -kl_coef * kl.detach(), 0.0)  # (B, T)
    last = last_token_index(mask)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards.detach()


# ---------------------------------------------------------------------------------------------
# Group baselines (critic-free). Rows [i*g, (i+1)*g) are the g samples of prompt i
# (tidal.common.types.RolloutBatch). Every entry: (scores (B,), group_size) -> advantages (B,).

GRPO_EPS = 1e-6  # keeps a zero-std group (all samples scored alike) at advantage 0, not NaN


def _groups(scores: torch.Tensor, group_size: int, min_size: int = 1) -> torch.Tensor:
    """(B,) -> (B // g, g), with the errors a misconfigured rollout produces."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if group_size < min_size:
        raise ValueError(
            f"group_size={group_size} but this baseline needs >= {min_size} samples per prompt; "
            "raise the number of samples per prompt (rollout n)"
        )
    if scores.shape[0] % group_size:
        raise ValueError(
            f"batch of {scores.shape[0]} scores is not a multiple of group_size={group_size}; "
            "keep every prompt's samples together (rows [i*g, (i+1)*g) = prompt i)"
        )
    if not scores.is_floating_point():  # integer rewards (e.g. 0/1 correctness)
        scores = scores.float()
    return scores.reshape(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): (r - mean(group)) / (std(group) + eps), with the
    Bessel-corrected std. A group of one has no baseline, hence group_size >= 2."""
    s = _groups(scores, group_size, min_size=2)  # (G, g)
    mean, std = s.mean(-1, keepdim=True), s.std(-1, keepdim=True)
    return ((s - mean) / (std + GRPO_EPS)).flatten()


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): r_i - mean of the other g-1 samples.
    The baseline excludes r_i, so it stays independent of the sample it scores (unbiased)."""
    s = _groups(scores, group_size, min_size=2)  # (G, g)
    loo_mean = (s.sum(-1, keepdim=True) - s) / (group_size - 1)
    return (s - loo_mean).flatten()


def reinforce_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE with a batch-mean baseline: r - mean(all scores). group_size is only checked."""
    s = _groups(scores, group_size).flatten()  # (B,)
    return s - s.mean()


def dr_grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"):
    r - mean(group), without GRPO's division by the group's std, which weighs groups that are
    nearly all right or all wrong up (a question-difficulty bias)."""
    s = _groups(scores, group_size, min_size=2)  # (G, g)
    return (s - s.mean(-1, keepdim=True)).flatten()


def outcome_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """The score itself, no baseline (REINFORCE++, Hu 2025: the normalisation over the whole
    batch that follows subtracts the batch mean). group_size is only checked."""
    return _groups(scores, group_size).flatten()


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), the score added to a response of
    `lengths` (B,) tokens with the budget max_len and a buffer of the last `buffer` tokens:

        0                                          |y| <= max_len - buffer
        -factor * (|y| - (max_len - buffer)) / buffer     max_len - buffer < |y| <= max_len
        -factor                                    |y| > max_len

    (the paper's R_length with factor 1). buffer 0: no penalty. -> (B,) float."""
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_len:
        raise ValueError(f"overlong buffer {buffer} is longer than the budget {max_len}")
    over = (lengths - (max_len - buffer)).clamp(min=0.0, max=float(buffer))
    return -factor * over / buffer


def kl_penalty_to_go(kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Critic-free KL shaping: -kl_coef * sum_{t' >= t} kl_t' over real tokens (gamma = 1). (B, R)."""
    per_token = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    return per_token.flip(-1).cumsum(-1).flip(-1) * mask
