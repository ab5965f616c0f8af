"""Sample selection by reward for best-of-n and expert iteration. Pure torch.

Layout (the rollout pool's `n_samples_per_prompt` layout): N prompts x n samples, flat rows
[i*n, (i+1)*n) belong to prompt i. Every function returns indices into those flat rows.

Invalid samples (a reward term that gave NaN/inf and was dropped under `reward.on_invalid:
drop`; `ScoredBatch.valid` is False there) are never selected: pass `valid`. NaN scores are
treated as invalid too, because torch.argmax would otherwise pick a NaN as the maximum.
"""

from __future__ import annotations

import torch


def _grouped(scores: torch.Tensor, n: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, n) float64 scores with invalid entries at -inf, and the (N, n) validity mask."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be flat (N*n,), got shape {tuple(scores.shape)}")
    if n < 1 or scores.numel() % n:
        raise ValueError(f"{scores.numel()} scores do not split into groups of n={n} samples per prompt")
    if scores.numel() == 0:
        raise ValueError("no scores to select from")
    ok = ~torch.isnan(scores)
    if valid is not None:
        if valid.shape != scores.shape:
            raise ValueError(f"valid {tuple(valid.shape)} must match scores {tuple(scores.shape)}")
        ok = ok & valid.to(torch.bool)
    grouped = torch.where(ok, scores.double(), -torch.inf).view(-1, n)
    return grouped, ok.view(-1, n)


def best_of_n(scores: torch.Tensor, n: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(N*n,) scores -> (N,) long flat row index of each prompt's highest-scoring sample.
    Ties go to the first sample of the group (the lowest row). A prompt with no valid sample is
    an error naming it: there is nothing honest to return for it."""
    grouped, ok = _grouped(scores, n, valid)
    empty = (~ok.any(1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"prompts {empty.tolist()[:10]} have no valid score among their {n} samples; "
                         "fix the reward (see reward.on_invalid) or sample more per prompt")
    # Stable descending sort: equal maxima keep their order, so the first one comes first
    # (documented, unlike argmax's tie rule on every backend).
    first = torch.sort(grouped, dim=1, descending=True, stable=True).indices[:, 0]  # (N,)
    return torch.arange(grouped.shape[0], device=scores.device) * n + first


def select_for_expert_iteration(scores: torch.Tensor, n: int, top_k: int | None = None,
                                threshold: float | None = None, valid: torch.Tensor | None = None,
                                rank_by: torch.Tensor | None = None) -> torch.Tensor:
    """Flat row indices (ascending, long) of the samples expert iteration fine-tunes on.

    top_k: keep each prompt's k best samples by `rank_by` (N*n,) (default: `scores`; ties to the
    earlier sample, as in best_of_n);
    threshold: keep samples whose `scores` are >= threshold (an absolute bar: prompts where nothing
    is good enough contribute nothing, rather than their least-bad sample).
    Both: a sample must pass both (each prompt's top k, of which only those >= threshold).
    At least one is required; top_k=1 alone is best-of-n. Samples not `valid` (or NaN in either
    tensor) are never kept. The result may be empty (every sample under the threshold); the
    caller decides whether an empty round is an error."""
    if top_k is None and threshold is None:
        raise ValueError("expert iteration needs top_k and/or threshold; without either every sample would be kept")
    grouped, ok = _grouped(scores, n, valid)
    ranked = grouped
    if rank_by is not None:
        ranked, ok = _grouped(rank_by, n, ok.flatten())
    keep = ok.clone()  # (N, n)
    if top_k is not None:
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k={top_k} must be between 1 and the samples per prompt n={n}")
        order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, :top_k]  # (N, k)
        in_top = torch.zeros_like(keep).scatter_(1, order, True)
        keep &= in_top
    if threshold is not None:
        keep &= grouped >= float(threshold)
    return keep.flatten().nonzero().flatten()
