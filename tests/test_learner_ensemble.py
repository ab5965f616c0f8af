"""The reward heads' ensemble of online RLHF's active queries (Christiano et al. 2017): members
fit on bootstrap resamples agree where the comparisons say something and disagree where they
do not, so the tasks the selector asks about are the ones the data has not settled."""

from __future__ import annotations

import torch

from tidal.learner.ensemble import fit_ensemble


def _pairs(n: int, h: int, seed: int):
    """Comparisons whose preference follows feature 0; the other features are noise."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, h, generator=g), torch.randn(n, h, generator=g)
    a_wins = a[:, 0] > b[:, 0]
    chosen = torch.where(a_wins[:, None], a, b)
    rejected = torch.where(a_wins[:, None], b, a)
    return chosen, rejected


def test_members_agree_on_what_the_labels_settled_and_disagree_elsewhere():
    chosen, rejected = _pairs(40, 6, seed=0)
    ens = fit_ensemble(chosen, rejected, torch.ones(40), members=8, seed=1)
    assert ens.heads.shape == (8, 6)
    settled = torch.zeros(1, 2, 6)
    settled[0, 0, 0], settled[0, 1, 0] = 2.0, -2.0  # differ along the labeled direction
    open_ = torch.zeros(1, 2, 6)
    open_[0, 0, 3], open_[0, 1, 3] = 2.0, -2.0  # differ along a direction no label decides
    p = ens.preferences(settled)  # (E, 1, 1)
    assert bool((p > 0.9).all())  # every member: response 0 wins on feature 0
    assert float(ens.disagreement(open_)) > 3 * float(ens.disagreement(settled))


def test_weights_steer_the_fit_and_bootstrap_seeds_differ():
    chosen, rejected = _pairs(40, 6, seed=2)
    flipped = fit_ensemble(rejected, chosen, torch.ones(40), members=2, seed=0)  # labels reversed
    assert bool((flipped.heads[:, 0] < 0).all())
    ignored = fit_ensemble(torch.cat([chosen, rejected]), torch.cat([rejected, chosen]),
                           torch.cat([torch.ones(40), torch.zeros(40)]), members=2, seed=0)  # reversed copies weigh 0
    assert bool((ignored.heads[:, 0] > 0).all())
    a, b = fit_ensemble(chosen, rejected, torch.ones(40), 2, seed=0), fit_ensemble(chosen, rejected, torch.ones(40), 2, seed=9)
    assert not torch.allclose(a.heads, b.heads)


def test_disagreement_averages_over_the_pairs_of_a_k_wise_task():
    ens = fit_ensemble(*_pairs(30, 4, seed=3), torch.ones(30), members=4, seed=0)
    feats = torch.randn(5, 3, 4)  # 5 tasks of K = 3
    assert ens.preferences(feats).shape == (4, 5, 3) and ens.disagreement(feats).shape == (5,)
    same = feats[:, :1].expand(5, 3, 4)  # three equal responses: every member says 1/2
    assert torch.allclose(ens.disagreement(same), torch.zeros(5))
