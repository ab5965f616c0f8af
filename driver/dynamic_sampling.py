"""The rollout side of one RL step: sampling rounds until the step's batch is full (DAPO's dynamic
sampling), and DAPO's soft overlong punishment of the scores. Runs on the pipeline's rollout
thread (tidal.driver.rl_loop.RLLoop._produce); nothing here touches the learners.

Dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
Scale"; algorithm.dynamic_sampling): a prompt group whose scores are all equal has zero
group-relative advantage and teaches nothing but the KL and entropy terms; one with an invalid
reward would be dropped whole by the update (tidal.learner.experience.usable_rows). Both are
dropped here, and more prompts are sampled, in data order, until the step holds
algorithm.prompts_per_step groups. Round r > 0 samples the missing groups divided by the share
kept so far (at most prompts_per_step prompts; the whole step's budget while nothing was kept),
with its own seed (`step_sampling(cfg, step, r)`); surplus groups of the last round are
discarded. After algorithm.dynamic_sampling_max_rounds extra rounds a step still short is filled
up with dropped groups, earliest first, so every step trains on a full batch. The kept groups
keep their sampling order. Every round runs inside one `produce(step)` on the one rollout thread,
so in async mode they all see the same weight version, and the prompts they consume are part of
the dataset state a checkpoint stores: a resumed run samples the same rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from tidal.common.types import RolloutBatch, ScoredBatch
from tidal.learner.advantages import overlong_penalty
from tidal.learner.experience import select_rollout

# reward metrics that count rows (summed over rounds) and the one that is a running total (last);
# the others are means over rows (averaged over rounds, weighted by their rows)
COUNTED = ("reward/dropped", "reward/missing_eos")
TOTALS = ("reward/dropped_total",)


def select_scored(scored: ScoredBatch, rows: list[int]) -> ScoredBatch:
    """The scored batch restricted to `rows`, in that order."""
    idx = torch.tensor(rows, dtype=torch.long)
    return ScoredBatch(select_rollout(scored.rollout, rows), scored.scores[idx],
                       {k: v[idx] for k, v in scored.terms.items()},
                       None if scored.valid is None else scored.valid[idx],
                       None if scored.raw_scores is None else scored.raw_scores[idx])


def concat_scored(batches: list[ScoredBatch]) -> ScoredBatch:
    """Scored batches one after another (rows of the first, then of the second, ...)."""
    if len(batches) == 1:
        return batches[0]
    valid = None
    if any(b.valid is not None for b in batches):
        valid = torch.cat([torch.ones(len(b.scores), dtype=torch.bool) if b.valid is None else b.valid.bool()
                           for b in batches])
    raw = None if any(b.raw_scores is None for b in batches) else torch.cat([b.raw_scores for b in batches])
    terms = {k: torch.cat([b.terms[k] for b in batches]) for k in batches[0].terms}
    return ScoredBatch(RolloutBatch.concat([b.rollout for b in batches]), torch.cat([b.scores for b in batches]),
                       terms, valid, raw)


def informative_groups(scored: ScoredBatch, group_size: int) -> torch.Tensor:
    """(G,) bool: groups whose rows are all valid and whose scores are not all equal."""
    scores = scored.scores.reshape(-1, group_size)
    valid = torch.ones_like(scores, dtype=torch.bool) if scored.valid is None else scored.valid.bool().reshape(-1, group_size)
    return valid.all(-1) & (scores.max(-1).values > scores.min(-1).values)


def shape_overlong(scored: ScoredBatch, max_len: int, buffer: int, factor: float) -> tuple[ScoredBatch, float]:
    """The batch with DAPO's soft overlong punishment added to its scores
    (tidal.learner.advantages.overlong_penalty; lengths in response tokens, up to the first EOS),
    and the mean penalty. buffer 0: unchanged."""
    if buffer <= 0:
        return scored, 0.0
    lengths = torch.tensor([len(r) for r in scored.rollout.response_ids])
    penalty = overlong_penalty(lengths, max_len, buffer, factor).to(scored.scores.dtype)  # (B,)
    shaped = ScoredBatch(scored.rollout, scored.scores + penalty, scored.terms, scored.valid, scored.raw_scores)
    return shaped, penalty.mean().item()


@dataclass
class Round:
    """One sampling round's result."""

    scored: ScoredBatch
    reward_metrics: dict[str, float]  # the reward's last_metrics of the round
    rollout_metrics: dict[str, float] = field(default_factory=dict)  # counts: requeued chunks, restarted workers


def merge_round_metrics(rounds: list[Round]) -> dict[str, float]:
    """The reward metrics of all rounds (means weighted by rows; counts summed; running totals
    the last round's) and the rollout counts summed."""
    out: dict[str, float] = {}
    rows = [len(r.scored.scores) for r in rounds]
    for key in rounds[0].reward_metrics:
        values = [r.reward_metrics.get(key, float("nan")) for r in rounds]
        if key in COUNTED:
            out[key] = float(sum(values))
        elif key in TOTALS:
            out[key] = values[-1]
        else:
            finite = [(v, n) for v, n in zip(values, rows) if not math.isnan(v)]
            out[key] = sum(v * n for v, n in finite) / sum(n for _, n in finite) if finite else float("nan")
    for r in rounds:
        for key, v in r.rollout_metrics.items():
            out[key] = out.get(key, 0.0) + v
    return out


def fill_step(sample: Callable[[int, int], Round], prompts: int, group_size: int, dynamic: bool,
              max_extra_rounds: int) -> tuple[ScoredBatch, dict[str, float]]:
    """The step's scored batch of `prompts` groups and its rollout-side metrics.
    `sample(n, r)`: round r's n prompts, sampled group_size times each and scored. Without
    `dynamic`, one round of `prompts`, kept as it is (module doc for the rounds)."""
    rounds = [sample(prompts, 0)]
    if not dynamic:
        return rounds[0].scored, merge_round_metrics(rounds)
    kept: list[tuple[int, int]] = []  # (round, group) of the informative groups, in sampling order
    dropped: list[tuple[int, int]] = []
    seen = 0
    while True:
        r = len(rounds) - 1
        flags = informative_groups(rounds[r].scored, group_size).tolist()
        kept += [(r, g) for g, ok in enumerate(flags) if ok]
        dropped += [(r, g) for g, ok in enumerate(flags) if not ok]
        seen += len(flags)
        missing = prompts - len(kept)
        if missing <= 0 or r >= max_extra_rounds:
            break
        share = len(kept) / seen
        ask = prompts if share == 0 else min(prompts, math.ceil(missing / share))
        rounds.append(sample(ask, r + 1))
    surplus = max(0, len(kept) - prompts)
    refill = dropped[:max(0, prompts - len(kept))]
    offsets = [0]
    for rnd in rounds:
        offsets.append(offsets[-1] + len(rnd.scored.scores))
    rows = [offsets[r] + g * group_size + j for r, g in sorted(kept[:prompts] + refill) for j in range(group_size)]
    batch = select_scored(concat_scored([rnd.scored for rnd in rounds]), rows)  # groups in sampling order
    metrics = merge_round_metrics(rounds)
    metrics.update({"sampling/rounds": float(len(rounds)), "sampling/prompts": float(seen),
                    "sampling/groups_dropped": float(len(dropped)), "sampling/dropped_share": len(dropped) / seen,
                    "sampling/groups_refilled": float(len(refill)), "sampling/groups_surplus": float(surplus)})
    return batch, metrics
