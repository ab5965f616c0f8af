"""Best-of-n: a policy wrapper that samples n completions per prompt from a rollout pool and
answers each prompt with the one the reward scores highest. `tidal generate --best-of N` and
the best-of-n row of `tidal eval` both go through `BestOfN`.

Scores are the reward's raw weighted sum (`CombinedReward.score(raw=True)`): normalisation,
clipping and the missing-EOS penalty shape an RL training signal, they are not a judgement of
one text, and a score a user reads should not depend on which other samples were in the batch.
The choice itself is `tidal.learner.selection.best_of_n` (ties go to the earlier sample; a
sample the reward marked invalid, `reward.on_invalid: drop`, is never chosen).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from tidal.common.types import PromptBatch, RolloutBatch, ScoredBatch


class NoValidSample(ValueError):
    """Every one of a prompt's n samples got an invalid (NaN/inf, dropped) reward."""


@dataclass
class BestOf:
    """What a best-of-n call returns; rows follow ascending prompt index (the pool's order)."""

    n: int
    chosen: RolloutBatch  # (N,) each prompt's best sample
    scores: list[float]  # (N,) raw reward of each chosen sample
    candidates: RolloutBatch  # (N*n,) every sample, rows [i*n, (i+1)*n) are prompt i's
    candidate_scores: list[Optional[float]]  # (N*n,) raw reward; None where the reward was invalid

    def candidates_of(self, i: int) -> list[tuple[str, Optional[float]]]:
        """(completion, score) of the i-th prompt's n samples, in sampling order."""
        rows = range(i * self.n, (i + 1) * self.n)
        return [(self.candidates.response_text[r], self.candidate_scores[r]) for r in rows]


def pick_best(candidates: RolloutBatch, scored: ScoredBatch, n: int) -> BestOf:
    """Each prompt's highest-scoring sample among its n (pure selection; no engine, no reward)."""
    from tidal.learner.experience import select_rollout
    from tidal.learner.selection import best_of_n

    if n < 1 or len(candidates) % n:
        raise ValueError(f"{len(candidates)} samples do not split into groups of n={n}")
    if len(scored.scores) != len(candidates):
        raise ValueError(f"{len(scored.scores)} scores for {len(candidates)} samples")
    index = candidates.prompt_index
    mixed = [g for g in range(len(index) // n) if len(set(index[g * n:(g + 1) * n])) != 1]
    if mixed:  # the pool's layout is n consecutive rows per prompt; anything else is a bug upstream
        raise ValueError(f"sample groups {mixed[:5]} mix prompts; expected n={n} consecutive rows per prompt")
    valid = [True] * len(candidates) if scored.valid is None else scored.valid.bool().tolist()
    every = [float(s) if ok and s == s else None for s, ok in zip(scored.scores.tolist(), valid)]
    empty = [index[g * n] for g in range(len(index) // n) if all(s is None for s in every[g * n:(g + 1) * n])]
    if empty:
        raise NoValidSample(f"prompts {empty[:10]} got no valid reward for any of their {n} samples; fix the "
                            f"reward (reward.on_invalid) or sample more per prompt")
    rows = best_of_n(scored.scores, n, scored.valid).tolist()
    return BestOf(n, select_rollout(candidates, rows), [float(every[r]) for r in rows], candidates, every)


class BestOfN:
    """A policy that answers with the best of n samples by a reward.

    pool: anything with `generate(PromptBatch, Sampling) -> RolloutBatch` in the pool's layout
        (tidal.rollout.pool.RolloutPool); its weights are the policy. None when the caller draws
        the samples itself (tidal.driver.heldout.sample with `self.sampling`) and calls `choose`.
    reward: a CombinedReward (tidal.reward_service.combine.build_reward).
    sampling: temperature, max_new_tokens, seed ...; its n is replaced by `n`."""

    def __init__(self, pool, reward, sampling, n: int):
        if n < 1:
            raise ValueError(f"best-of-n needs n >= 1, got {n}")
        self.pool, self.reward, self.n = pool, reward, n
        self.sampling = dataclasses.replace(sampling, n=n)

    def sample(self, prompts: PromptBatch) -> RolloutBatch:
        """n samples per prompt, grouped by prompt."""
        return self.pool.generate(prompts, self.sampling)

    def choose(self, candidates: RolloutBatch) -> BestOf:
        """Score every sample (raw) and keep each prompt's best."""
        return pick_best(candidates, self.reward.score(candidates, raw=True), self.n)

    def generate(self, prompts: PromptBatch) -> BestOf:
        return self.choose(self.sample(prompts))
