"""An ensemble of reward heads on one trunk, for choosing the queries that teach the most.

Christiano et al. 2017 ("Deep reinforcement learning from human preferences") train an ensemble
of reward predictors, each on a bootstrap resample of the comparisons, and ask people about the
pairs whose predicted preference varies most across the ensemble. Training several language
reward models is what a CPU (or a GPU beside a policy) cannot afford every refit, so here the
members share the reward model's trunk: member e is a linear head w_e on the trunk's last-token
feature f (the feature the reward model's own head reads), fit by weighted Bradley-Terry

    P_e(a over b) = sigmoid(w_e . (f_a - f_b))

on a bootstrap resample of the version's training pairs, with an L2 pull toward the head fit on
all of them (the prior every member starts at), so members differ where the data is thin.
A task's disagreement is the variance across members of P_e, averaged over its C(K,2) pairs.
(The head's bias cancels in a difference, so a member is its weight vector alone.)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

FIT_STEPS = 100  # L-BFGS iterations of one member: a convex problem in H unknowns


@dataclass(frozen=True)
class Ensemble:
    """The members' weights of one reward-model version."""

    heads: torch.Tensor  # (E, H) float32
    version: int = 0

    def preferences(self, features: torch.Tensor) -> torch.Tensor:
        """features (T, K, H) of T tasks' K responses -> (E, T, C(K,2)) P_e(i over j) for i < j."""
        K = features.shape[1]
        i, j = zip(*combinations(range(K), 2))
        diff = features[:, list(i)] - features[:, list(j)]  # (T, C, H)
        return torch.sigmoid(torch.einsum("tch,eh->etc", diff.float(), self.heads))

    def disagreement(self, features: torch.Tensor) -> torch.Tensor:
        """(T, K, H) -> (T,) variance across members of the predicted preferences, mean over pairs."""
        return self.preferences(features).var(dim=0, unbiased=False).mean(dim=-1)


def fit_ensemble(chosen: torch.Tensor, rejected: torch.Tensor, weight: torch.Tensor, members: int, seed: int,
                 l2: float = 1.0, version: int = 0) -> Ensemble:
    """chosen, rejected (N, H) features of N comparisons, weight (N,) their loss weights: `members`
    heads, each fit on its own bootstrap resample of the N, pulled toward the head of all N."""
    gen = torch.Generator().manual_seed(seed)
    diff = (chosen - rejected).float()  # (N, H)
    prior = _fit_head(diff, weight.float(), torch.zeros(diff.shape[1]), l2)
    heads = []
    for _ in range(members):
        idx = torch.randint(len(diff), (len(diff),), generator=gen)  # a bootstrap resample
        heads.append(_fit_head(diff[idx], weight[idx].float(), prior.float(), l2))
    return Ensemble(torch.stack(heads), version)


def _fit_head(diff: torch.Tensor, weight: torch.Tensor, prior: torch.Tensor, l2: float) -> torch.Tensor:
    """argmin_w  sum_n weight_n softplus(-w . diff_n) / sum weight + l2/2 |w - prior|^2 / H."""
    w = prior.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=FIT_STEPS, line_search_fn="strong_wolfe")
    total = weight.sum().clamp_min(1e-12)

    def closure():
        opt.zero_grad()
        loss = (weight * torch.nn.functional.softplus(-(diff @ w))).sum() / total
        loss = loss + 0.5 * l2 * ((w - prior) ** 2).sum() / len(prior)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()
