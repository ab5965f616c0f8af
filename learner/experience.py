"""Building an RL `Experience` from a scored rollout: the pure-tensor part.

No ray / deepspeed here. The driver (or `LearnerGroup.make_experience`) does

    input_ids, attention_mask, response_mask = pad_rollout(scored.rollout, pad_id)
    old_logprobs = group.compute_logprobs(...)        # policy, logits / temperature
    ref_logprobs = group.compute_ref_logprobs(...)    # frozen reference
    values       = group.compute_values(...)          # critic (PPO only)
    exp = assemble_experience(...)                    # KL-penalised rewards, advantages, whitening

Layout (tidal.common.types): [prompt LEFT-padded to P | response RIGHT-padded to R]; per-token
tensors are (B, R), column t belongs to response token t.
"""

from __future__ import annotations

import torch

from tidal.common.ops import masked_mean, masked_whiten
from tidal.common.types import Experience, RolloutBatch, ScoredBatch
from tidal.learner.advantages import gae, group_advantages, token_rewards
from tidal.learner.kl import kl_estimate

CRITIC_FREE = ("grpo", "rloo", "reinforce")


def pad_prompt_response(prompt_ids: list[list[int]], response_ids: list[list[int]],
                        pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids (B, P+R) long, attention_mask (B, P+R) long,
    response_mask (B, R) float): prompts left-padded to the longest prompt P, responses
    right-padded to the longest response R, so every response starts at column P."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses; they must pair up row by row")
    if not prompt_ids:
        raise ValueError("empty batch: nothing to pad")
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if len(p) == 0:
            raise ValueError(f"row {i}: empty prompt; every sample needs at least one prompt token")
        if len(r) == 0:
            raise ValueError(f"row {i}: empty response; drop it (or keep its EOS token) before training")
    P = max(len(p) for p in prompt_ids)
    R = max(len(r) for r in response_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        input_ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
        response_mask[i, :len(r)] = 1.0
    return input_ids, attention_mask, response_mask


def truncate_after_eos(response_ids: list[list[int]], eos_id: int) -> list[list[int]]:
    """Drop every token after the first EOS of each response (ANCHORS detail 4)."""
    out = []
    for r in response_ids:
        out.append(r[:r.index(eos_id) + 1] if eos_id in r else list(r))
    return out


def pad_rollout(rollout: RolloutBatch, pad_id: int, eos_id: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, P+R), attention_mask (B, P+R), response_mask (B, R)) of a rollout; with
    `eos_id`, tokens after a response's first EOS are cut first."""
    responses = rollout.response_ids if eos_id is None else truncate_after_eos(rollout.response_ids, eos_id)
    return pad_prompt_response(rollout.prompt_ids, responses, pad_id)


def pad_response_floats(values: list[list[float]], response_len: int) -> torch.Tensor:
    """Per-token floats of unequal lengths (e.g. engine logprobs) -> (B, R) float32, zero-padded."""
    out = torch.zeros((len(values), response_len), dtype=torch.float32)
    for i, v in enumerate(values):
        n = min(len(v), response_len)
        out[i, :n] = torch.tensor(v[:n], dtype=torch.float32)
    return out


def select_rollout(rollout: RolloutBatch, rows: list[int]) -> RolloutBatch:
    """The rollout restricted to `rows` (in that order)."""
    def pick(values: list) -> list:
        return [values[i] for i in rows] if values else []

    return RolloutBatch(pick(rollout.prompt_index), pick(rollout.prompt_text), pick(rollout.prompt_ids),
                        pick(rollout.response_text), pick(rollout.response_ids), pick(rollout.response_logprobs),
                        pick(rollout.finish_reason), pick(rollout.weight_version), pick(rollout.reference))


def valid_rows(scored: ScoredBatch, group_size: int, whole_groups: bool) -> torch.Tensor:
    """Indices (long) of rows to keep: all rows, minus those marked invalid (NaN/inf reward).
    With `whole_groups` (group baselines) a group with any invalid row is dropped entirely,
    since its baseline would be computed over a partial group."""
    B = len(scored.rollout)
    if scored.valid is None:
        return torch.arange(B)
    valid = scored.valid.bool().clone()
    if whole_groups:
        if B % group_size:
            raise ValueError(f"batch of {B} samples is not a multiple of the group size {group_size}")
        valid = valid.view(-1, group_size).all(-1, keepdim=True).expand(-1, group_size).reshape(-1)
    return valid.nonzero().flatten()


def kl_penalty_to_go(kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Critic-free KL shaping: -kl_coef * sum_{t' >= t} kl_t' over real tokens (gamma = 1). (B, R)."""
    per_token = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    return per_token.flip(-1).cumsum(-1).flip(-1) * mask


def assemble_experience(
    input_ids: torch.Tensor,  # (B, P+R)
    attention_mask: torch.Tensor,  # (B, P+R)
    response_mask: torch.Tensor,  # (B, R)
    old_logprobs: torch.Tensor,  # (B, R) policy logprobs, trainer-recomputed
    ref_logprobs: torch.Tensor,  # (B, R)
    values: torch.Tensor | None,  # (B, R) critic values; None for critic-free algorithms
    scores: torch.Tensor,  # (B,) sequence rewards
    algorithm: str,  # "ppo" | "grpo" | "rloo" | "reinforce"
    group_size: int,  # samples per prompt (rows [i*g, (i+1)*g) share a prompt)
    kl_coef: float,
    kl_estimator: str,
    gamma: float,
    lam: float,
    whiten: bool,
    rollout_logprobs: torch.Tensor | None = None,  # (B, R) engine logprobs
    weight_version: torch.Tensor | None = None,  # (B,) long
) -> Experience:
    """Per-token rewards and advantages of one batch.

    ppo: r_t = -kl_coef * KL_t, plus the score at the last real token (ANCHORS 5); GAE over the
    critic's values gives advantages and returns (ANCHORS 8).
    grpo / rloo / reinforce: the sequence advantage from the group baseline, broadcast to every
    response token, plus the KL penalty summed from t to the end. GRPO's advantages are already
    normalized per group, so they are never whitened again.
    `whiten`: advantages to zero mean / unit variance over real tokens only (ANCHORS 7)."""
    mask = response_mask.float()
    real = mask.bool()
    # logprobs and values at padded positions are meaningless: zero them (ANCHORS 10)
    old_logprobs = torch.where(real, old_logprobs.float(), 0.0)
    ref_logprobs = torch.where(real, ref_logprobs.float(), 0.0)
    kl = torch.where(real, kl_estimate(old_logprobs, ref_logprobs, kl_estimator), 0.0)  # (B, R)
    if algorithm == "ppo":
        if values is None:
            raise ValueError("algorithm 'ppo' needs critic values; build the LearnerGroup with a critic_path")
        rewards = token_rewards(scores, kl, mask, kl_coef)  # (B, R)
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        values = torch.where(real, values, 0.0)
    elif algorithm in CRITIC_FREE:
        seq_adv = group_advantages(scores, group_size, algorithm)  # (B,)
        advantages = seq_adv[:, None] * mask + kl_penalty_to_go(kl, mask, kl_coef)
        returns = torch.zeros_like(mask)
        values = torch.zeros_like(mask)
        whiten = whiten and algorithm != "grpo"
    else:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose ppo, grpo, rloo or reinforce")
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return Experience(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=mask,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        advantages=advantages.detach().float(), returns=returns.detach().float(),
        values=values.detach().float(), scores=scores.float(),
        rollout_logprobs=rollout_logprobs, weight_version=weight_version,
    )


def experience_metrics(exp: Experience, kl_estimator: str) -> dict[str, float]:
    """Batch statistics for logs and the adaptive KL controller (KL in nats per sequence)."""
    mask = exp.response_mask
    kl = torch.where(mask.bool(), kl_estimate(exp.old_logprobs, exp.ref_logprobs, kl_estimator), 0.0)
    return {
        "experience/score_mean": exp.scores.mean().item(),
        "experience/score_std": exp.scores.std().item() if len(exp) > 1 else 0.0,
        "experience/kl_per_seq": kl.sum(-1).mean().item(),
        "experience/response_len": mask.sum(-1).mean().item(),
        "experience/advantage_mean": masked_mean(exp.advantages, mask).item(),
        "experience/return_mean": masked_mean(exp.returns, mask).item(),
    }
