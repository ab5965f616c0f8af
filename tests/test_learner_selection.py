"""Best-of-n and expert-iteration selection on constructed scores."""

from __future__ import annotations

import pytest
import torch

from tidal.learner.selection import best_of_n, select_for_expert_iteration

# 3 prompts x 4 samples; rows [4i, 4i + 4) are prompt i's.
SCORES = torch.tensor([
    0.1, 0.9, -0.3, 0.5,   # prompt 0: best row 1
    -1.0, -2.0, -0.5, -3.0,  # prompt 1: best row 6 (all negative)
    2.0, 1.0, 2.0, 0.0,    # prompt 2: tie between rows 8 and 10 -> first (8)
])


def test_best_of_n_picks_the_argmax_per_prompt():
    assert best_of_n(SCORES, 4).tolist() == [1, 6, 8]
    # Against a plain per-group argmax on random scores (no ties with probability 1).
    rand = torch.randn(50 * 8, generator=torch.Generator().manual_seed(0))
    want = [8 * i + int(rand[8 * i:8 * i + 8].argmax()) for i in range(50)]
    assert best_of_n(rand, 8).tolist() == want
    assert best_of_n(SCORES, 1).tolist() == list(range(12))  # n = 1: every sample is its own best


def test_best_of_n_skips_invalid_and_nan_samples():
    valid = torch.ones(12, dtype=torch.bool)
    valid[1] = False  # prompt 0's best is invalid -> next best is row 3 (0.5)
    scores = SCORES.clone()
    scores[6] = float("nan")  # prompt 1's best is NaN -> row 4 (-1.0)
    assert best_of_n(scores, 4, valid).tolist() == [3, 4, 8]
    with pytest.raises(ValueError, match=r"prompts \[0\]"):
        best_of_n(SCORES, 4, torch.tensor([False] * 4 + [True] * 8))
    with pytest.raises(ValueError, match="groups of n=5"):
        best_of_n(SCORES, 5)


def test_expert_iteration_keeps_exactly_the_top_k():
    assert select_for_expert_iteration(SCORES, 4, top_k=2).tolist() == [1, 3, 4, 6, 8, 10]
    assert select_for_expert_iteration(SCORES, 4, top_k=1).tolist() == best_of_n(SCORES, 4).tolist()
    assert select_for_expert_iteration(SCORES, 4, top_k=4).tolist() == list(range(12))


def test_expert_iteration_threshold_and_both():
    # >= 0.5: rows 1 (0.9), 3 (0.5), 8, 9, 10; prompt 1 contributes nothing.
    assert select_for_expert_iteration(SCORES, 4, threshold=0.5).tolist() == [1, 3, 8, 9, 10]
    # top 2 per prompt AND >= 0.5: prompt 0 -> 1, 3; prompt 1 -> none; prompt 2 -> 8, 10 (not 9).
    assert select_for_expert_iteration(SCORES, 4, top_k=2, threshold=0.5).tolist() == [1, 3, 8, 10]
    assert select_for_expert_iteration(SCORES, 4, threshold=10.0).tolist() == []


def test_expert_iteration_never_keeps_invalid_samples_and_needs_a_rule():
    valid = torch.ones(12, dtype=torch.bool)
    valid[[1, 8]] = False
    assert select_for_expert_iteration(SCORES, 4, top_k=1, valid=valid).tolist() == [3, 6, 10]
    assert 8 not in select_for_expert_iteration(SCORES, 4, threshold=0.0, valid=valid).tolist()
    with pytest.raises(ValueError, match="top_k and/or threshold"):
        select_for_expert_iteration(SCORES, 4)
    with pytest.raises(ValueError, match="top_k=5"):
        select_for_expert_iteration(SCORES, 4, top_k=5)
