"""The one table of RL algorithms: everything that differs between them, in one place.

`ALGORITHMS[name]` (name = algorithm.name in the config) is an `Algorithm`. Code elsewhere asks
the entry (`algorithm_for(cfg).uses_critic`), never compares algorithm names; a new algorithm is
one new entry. Every entry's `advantages` has the same signature:

    advantages(scores (B,), kl (B, R), mask (B, R), values (B, R) | None, kl_coef, group_size,
               gamma, lam) -> (advantages (B, R), returns (B, R))

and so has every entry's `update` (tidal.learner.updates):

    update(group: LearnerGroup, batch: StepBatch, timer: Timer) -> StepUpdate

and every policy-gradient entry's per-token `loss` (tidal.learner.losses: policy_loss, gspo_loss,
cispo_loss), aggregated as algorithm.loss_agg says (`auto`: the entry's `loss_agg`):

    loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, *, is_weights, agg)
        -> (loss, metrics)

`check_config` refuses the configs an entry cannot run (preflight calls it before Ray starts).

Rows [i*g, (i+1)*g) of a batch are the g = group_size samples of prompt i (RolloutBatch order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from tidal.common.config import ConfigError
from tidal.learner.advantages import (dr_grpo_advantages, gae, grpo_advantages, kl_penalty_to_go, outcome_advantages,
                                      reinforce_advantages, rloo_advantages, token_rewards)
from tidal.learner.losses import cispo_loss, gspo_loss, policy_loss
from tidal.learner.updates import expert_iteration_update, policy_gradient_update

if TYPE_CHECKING:
    from tidal.common.config import TidalConfig
    from tidal.common.metrics import Timer
    from tidal.learner.group import LearnerGroup
    from tidal.learner.updates import StepBatch, StepUpdate

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
UpdateFn = Callable[["LearnerGroup", "StepBatch", "Timer"], "StepUpdate"]
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _gae_advantages(scores, kl, mask, values, kl_coef, group_size, gamma, lam):
    """PPO: r_t = -kl_coef * KL_t, plus the score at the last real token; GAE over the critic."""
    if values is None:
        raise ValueError("this algorithm needs critic values; build the LearnerGroup with a critic_path")
    rewards = token_rewards(scores, kl, mask, kl_coef)  # (B, R)
    return gae(rewards, values, mask, gamma, lam)


def _group_baseline(baseline: Callable[[torch.Tensor, int], torch.Tensor]) -> AdvantageFn:
    """Critic-free: the sequence advantage from a group baseline, broadcast to every response
    token, plus the KL penalty summed from t to the end. No value targets."""
    def advantages(scores, kl, mask, values, kl_coef, group_size, gamma, lam):
        seq_adv = baseline(scores.detach(), group_size)  # (B,)
        return seq_adv[:, None] * mask + kl_penalty_to_go(kl, mask, kl_coef), torch.zeros_like(mask)

    return advantages


@dataclass(frozen=True)
class Algorithm:
    name: str
    uses_critic: bool  # a learned value function (GAE); the critic forward and update run
    whole_groups: bool  # a group baseline: an invalid row drops its whole prompt group
    min_samples: int  # rollout.n_samples needed (a group baseline needs >= 2); the config checks it at load
    # advantages z-scored over the batch's real tokens: "option" where algorithm.whiten_advantages
    # says so, "never" (GRPO's are normalised per group already), "always" (REINFORCE++'s method)
    whiten: str
    advantages: AdvantageFn | None  # None: the update needs no advantages (expert iteration's SFT)
    doc: str  # what it is, with the paper it comes from
    # the step's update: policy_gradient_update (advantages -> clipped policy-gradient epochs,
    # learner/rl.py) or expert_iteration_update (select each prompt's best samples, SFT on them)
    update: UpdateFn = policy_gradient_update
    ratio: bool = True  # the update takes a ratio to pi_old, so pi_old may come from inside it (tidal.learner.pi_old)
    selects: bool = False  # trains on a selection of each prompt's samples (algorithm.ei_top_k / ei_threshold)
    loss: LossFn = policy_loss  # the per-token policy-gradient loss of policy_gradient_update
    loss_agg: str = "token_mean"  # its aggregation under algorithm.loss_agg=auto (tidal.learner.losses.Aggregation)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("ppo", uses_critic=True, whole_groups=False, min_samples=1, whiten="option",
              advantages=_gae_advantages,
              doc="PPO with a GAE critic and the per-token KL penalty in the reward (Ziegler et al. 2019)."),
    Algorithm("grpo", uses_critic=False, whole_groups=True, min_samples=2, whiten="never",
              advantages=_group_baseline(grpo_advantages),
              doc="GRPO: group-normalised sequence advantages (Shao et al. 2024)."),
    Algorithm("rloo", uses_critic=False, whole_groups=True, min_samples=2, whiten="option",
              advantages=_group_baseline(rloo_advantages),
              doc="RLOO: leave-one-out group baseline (Ahmadian et al. 2024)."),
    Algorithm("reinforce", uses_critic=False, whole_groups=True, min_samples=1, whiten="option",
              advantages=_group_baseline(reinforce_advantages),
              doc="REINFORCE with a batch-mean baseline (Williams 1992)."),
    Algorithm("reinforce_pp", uses_critic=False, whole_groups=False, min_samples=1, whiten="always",
              advantages=_group_baseline(outcome_advantages),
              doc="REINFORCE++: the score plus the KL penalty to go, normalised over the whole batch, whatever "
                  "whiten_advantages says; no critic, no group (Hu 2025)."),
    Algorithm("dr_grpo", uses_critic=False, whole_groups=True, min_samples=2, whiten="never",
              advantages=_group_baseline(dr_grpo_advantages), loss_agg="seq_mean_token_sum",
              doc="Dr. GRPO: GRPO without the std and the length normalisation - advantages r - mean(group), "
                  "token sums over a constant (Liu et al. 2025)."),
    Algorithm("gspo", uses_critic=False, whole_groups=True, min_samples=2, whiten="never",
              advantages=_group_baseline(grpo_advantages), loss=gspo_loss, loss_agg="seq_mean_token_mean",
              doc="GSPO: GRPO's advantages with one length-normalised importance ratio per response, clipped as "
                  "a whole (Zheng et al. 2025; the paper clips to [1 - 3e-4, 1 + 4e-4])."),
    Algorithm("cispo", uses_critic=False, whole_groups=True, min_samples=2, whiten="never",
              advantages=_group_baseline(grpo_advantages), loss=cispo_loss,
              doc="CISPO: GRPO's advantages on a REINFORCE loss weighted by the clipped, stop-gradient importance "
                  "ratio (MiniMax 2025, MiniMax-M1)."),
    Algorithm("expert_iteration", uses_critic=False, whole_groups=True, min_samples=1, whiten="never",
              advantages=None, update=expert_iteration_update, ratio=False, selects=True,
              doc="Expert iteration: each step keeps the best samples per prompt (algorithm.ei_top_k / ei_threshold) "
                  "and runs SFT updates on them (Anthony et al. 2017; best-of-n distillation)."),
)}


def algorithm_for(cfg_or_name: "TidalConfig | str") -> Algorithm:
    """The table entry of a config (algorithm.name) or of a name."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.algorithm.name
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def loss_aggregation(cfg: "TidalConfig") -> str:
    """The run's loss aggregation: algorithm.loss_agg, where `auto` is the entry's own."""
    agg = cfg.algorithm.loss_agg
    return algorithm_for(cfg).loss_agg if agg == "auto" else agg


def clip_range(cfg: "TidalConfig") -> tuple[float, float]:
    """(clip_eps, clip_eps_high): the ratio's range is [1 - clip_eps, 1 + clip_eps_high]."""
    a = cfg.algorithm
    return a.clip_eps, a.clip_eps if a.clip_eps_high is None else a.clip_eps_high


def check_config(cfg: "TidalConfig") -> None:
    """ConfigError naming the keys for what the config's entry cannot run: fewer samples per
    prompt than it needs, a selection that keeps every sample, or DAPO-style options it cannot
    apply (preflight calls it)."""
    a, n = cfg.algorithm, cfg.rollout.n_samples
    algo = algorithm_for(cfg)
    if n < algo.min_samples:
        raise ConfigError(f"algorithm.name={a.name} needs a group: rollout.n_samples must be >= {algo.min_samples} "
                          f"(got {n}).")
    _check_toolkit(cfg)
    if not algo.selects:
        return
    if a.ei_top_k is None and a.ei_threshold is None:
        raise ConfigError(f"algorithm.ei_top_k and algorithm.ei_threshold are both null: algorithm.name={a.name} "
                          "would keep every sample; set at least one.")
    if a.ei_top_k is not None and a.ei_top_k > n:
        raise ConfigError(f"algorithm.ei_top_k={a.ei_top_k} keeps more samples per prompt than rollout.n_samples={n} "
                          "gives; lower ei_top_k or raise n_samples.")
    if a.ei_threshold is None and a.ei_top_k == n:
        raise ConfigError(f"algorithm.name={a.name} with algorithm.ei_top_k={n} of rollout.n_samples={n} and no "
                          "algorithm.ei_threshold keeps every sample: nothing is selected; raise rollout.n_samples "
                          "(e.g. 4) or set algorithm.ei_threshold.")


def _check_toolkit(cfg: "TidalConfig") -> None:
    """Dynamic sampling, overlong shaping and mismatch corrections that cannot work as set."""
    a, r = cfg.algorithm, cfg.rollout
    if a.dynamic_sampling and r.n_samples < 2:
        raise ConfigError(f"algorithm.dynamic_sampling=true drops prompt groups whose scores are all equal, which needs "
                          f"groups: set rollout.n_samples >= 2 (got {r.n_samples}).")
    if a.overlong_buffer > r.max_new_tokens:
        raise ConfigError(f"algorithm.overlong_buffer={a.overlong_buffer} is longer than rollout.max_new_tokens="
                          f"{r.max_new_tokens}; set it below (DAPO: a fifth of the budget).")
    if a.mismatch_correction != "none" and a.mismatch_threshold <= 1.0:
        raise ConfigError(f"algorithm.mismatch_threshold={a.mismatch_threshold} must be > 1 (the tis cap, the band "
                          "[1/threshold, threshold]); e.g. 2.")
