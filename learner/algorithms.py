"""The one table of RL algorithms: everything that differs between them, in one place.

`ALGORITHMS[name]` (name = algorithm.name in the config) is an `Algorithm`. Code elsewhere asks
the entry (`algorithm_for(cfg).uses_critic`), never compares algorithm names; a new algorithm is
one new entry. Every entry's `advantages` has the same signature:

    advantages(scores (B,), kl (B, R), mask (B, R), values (B, R) | None, kl_coef, group_size,
               gamma, lam) -> (advantages (B, R), returns (B, R))

and so has every entry's `update` (tidal.learner.updates):

    update(group: LearnerGroup, batch: StepBatch, timer: Timer) -> StepUpdate

`check_config` refuses the configs an entry cannot run (preflight calls it before Ray starts).

Rows [i*g, (i+1)*g) of a batch are the g = group_size samples of prompt i (RolloutBatch order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from tidal.common.config import ConfigError
from tidal.learner.advantages import (gae, grpo_advantages, kl_penalty_to_go, reinforce_advantages, rloo_advantages,
                                      token_rewards)
from tidal.learner.updates import expert_iteration_update, policy_gradient_update

if TYPE_CHECKING:
    from tidal.common.config import TidalConfig
    from tidal.common.metrics import Timer
    from tidal.learner.group import LearnerGroup
    from tidal.learner.updates import StepBatch, StepUpdate

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
UpdateFn = Callable[["LearnerGroup", "StepBatch", "Timer"], "StepUpdate"]


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
    whitens: bool  # algorithm.whiten_advantages applies (GRPO's advantages are already normalised)
    advantages: AdvantageFn | None  # None: the update needs no advantages (expert iteration's SFT)
    doc: str
    # the step's update: policy_gradient_update (advantages -> clipped policy-gradient epochs,
    # learner/rl.py) or expert_iteration_update (select each prompt's best samples, SFT on them)
    update: UpdateFn = policy_gradient_update
    ratio: bool = True  # the update takes a ratio to pi_old, so pi_old may come from inside it (tidal.learner.pi_old)
    selects: bool = False  # trains on a selection of each prompt's samples (algorithm.ei_top_k / ei_threshold)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("ppo", uses_critic=True, whole_groups=False, min_samples=1, whitens=True,
              advantages=_gae_advantages,
              doc="PPO with a GAE critic and the per-token KL penalty in the reward (Ziegler et al. 2019)."),
    Algorithm("grpo", uses_critic=False, whole_groups=True, min_samples=2, whitens=False,
              advantages=_group_baseline(grpo_advantages),
              doc="GRPO: group-normalised sequence advantages (Shao et al. 2024)."),
    Algorithm("rloo", uses_critic=False, whole_groups=True, min_samples=2, whitens=True,
              advantages=_group_baseline(rloo_advantages),
              doc="RLOO: leave-one-out group baseline (Ahmadian et al. 2024)."),
    Algorithm("reinforce", uses_critic=False, whole_groups=True, min_samples=1, whitens=True,
              advantages=_group_baseline(reinforce_advantages),
              doc="REINFORCE with a batch-mean baseline."),
    Algorithm("expert_iteration", uses_critic=False, whole_groups=True, min_samples=1, whitens=False,
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


def check_config(cfg: "TidalConfig") -> None:
    """ConfigError naming the keys for what the config's entry cannot run: fewer samples per
    prompt than it needs, or a selection that keeps every sample (preflight calls it)."""
    a, n = cfg.algorithm, cfg.rollout.n_samples
    algo = algorithm_for(cfg)
    if n < algo.min_samples:
        raise ConfigError(f"algorithm.name={a.name} needs a group: rollout.n_samples must be >= {algo.min_samples} "
                          f"(got {n}).")
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
