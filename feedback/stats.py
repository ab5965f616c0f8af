"""Label statistics for the researcher page and `tidal label status`.

Rankings here are lists with ranking[i] = rank of response i (0 = best); tied responses share a
rank. Agreement between two rankings of the same K responses, over the pairs neither ties:
  pairwise agreement = share of those pairs both put in the same order (0..1);
  Kendall's tau      = (concordant - discordant) / (concordant + discordant) (-1..1; without ties
                       Kendall's tau-a, with ties Goodman and Kruskal's gamma; = 2 * agreement - 1).
Agreement is computed on overlap tasks (two or more labelers ranked the same task) and against
the known ranking of gold tasks; skips are left out of every figure except the counts.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from itertools import combinations

from tidal.feedback.store import Label, Task


def _pairs(a: list[int], b: list[int]) -> tuple[int, int]:
    if len(a) != len(b):
        raise ValueError(f"rankings of different lengths ({len(a)} vs {len(b)})")
    concordant = discordant = 0
    for i, j in combinations(range(len(a)), 2):
        s = (a[i] - a[j]) * (b[i] - b[j])
        concordant += s > 0
        discordant += s < 0
    return concordant, discordant


def pairwise_agreement(a: list[int], b: list[int]) -> float:
    c, d = _pairs(a, b)
    return c / (c + d) if c + d else 1.0


def kendall_tau(a: list[int], b: list[int]) -> float:
    c, d = _pairs(a, b)
    return (c - d) / (c + d) if c + d else 1.0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def agreement(labels: list[Label], tasks: dict[int, Task]) -> dict:
    """Inter-labeler agreement on non-gold tasks ranked by 2+ labelers: overall (over all pairs
    of labels of a task) and per labeler (over the pairs it takes part in)."""
    by_task: dict[int, list[Label]] = defaultdict(list)
    for lab in labels:
        if lab.ranking is not None and tasks[lab.task_id].gold_ranking is None:
            by_task[lab.task_id].append(lab)
    overall_a, overall_t = [], []
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"agreement": [], "tau": []})
    for labs in by_task.values():
        for x, y in combinations(labs, 2):
            a, t = pairwise_agreement(x.ranking, y.ranking), kendall_tau(x.ranking, y.ranking)
            overall_a.append(a)
            overall_t.append(t)
            for who in (x.labeler, y.labeler):
                per[who]["agreement"].append(a)
                per[who]["tau"].append(t)
    return {"pairs": len(overall_a), "tasks": sum(len(v) >= 2 for v in by_task.values()),
            "agreement": _mean(overall_a), "tau": _mean(overall_t),
            "per_labeler": {k: {"pairs": len(v["agreement"]), "agreement": _mean(v["agreement"]), "tau": _mean(v["tau"])}
                            for k, v in sorted(per.items())}}


def gold_agreement(labels: list[Label], tasks: dict[int, Task]) -> dict:
    """Agreement of each labeler's rankings with the known ranking of gold tasks."""
    per: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for lab in labels:
        gold = tasks[lab.task_id].gold_ranking
        if gold is not None and lab.ranking is not None:
            per[lab.labeler].append((pairwise_agreement(lab.ranking, gold), kendall_tau(lab.ranking, gold)))
    every = [x for v in per.values() for x in v]
    return {"labels": len(every), "agreement": _mean([a for a, _ in every]), "tau": _mean([t for _, t in every]),
            "per_labeler": {k: {"labels": len(v), "agreement": _mean([a for a, _ in v]), "tau": _mean([t for _, t in v])}
                            for k, v in sorted(per.items())}}


def reliability(labels: list[Label], tasks: dict[int, Task], min_reliability: float = 0.0) -> dict[str, dict]:
    """Each labeler's weight in reward fitting, from its gold tasks: the pairwise agreement a over
    all the pairs of its gold labels gives weight = 2a - 1 clipped to [0, 1] (a coin-flipping
    labeler weighs 0, a perfect one 1; under a labeler who orders each pair right with chance a,
    2a - 1 is the expected agreement of its vote with the truth, -1..1). A labeler without gold
    labels is not graded and weighs 1. A weight below `min_reliability` drops the labeler
    (weight 0, dropped True). {labeler: {gold_pairs, agreement, weight, dropped}}"""
    pairs: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for lab in labels:
        gold = tasks[lab.task_id].gold_ranking
        if gold is not None and lab.ranking is not None:
            c, d = _pairs(lab.ranking, gold)
            pairs[lab.labeler][0] += c
            pairs[lab.labeler][1] += d
    out = {}
    for who in sorted({lab.labeler for lab in labels}):
        c, d = pairs[who] if who in pairs else (0, 0)
        agreement = c / (c + d) if c + d else None
        weight = 1.0 if agreement is None else min(1.0, max(0.0, 2.0 * agreement - 1.0))
        dropped = weight < min_reliability
        out[who] = {"gold_pairs": c + d, "agreement": agreement, "weight": 0.0 if dropped else weight, "dropped": dropped}
    return out


def rates(labels: list[Label], now: float | None = None) -> dict:
    """Labels in the last hour, overall and per labeler, each labeler's mean rate over the span
    between its first and last label (at least 1 minute, so one label is not infinite), and the
    median time the page measured per label (seconds; None when no page sent one)."""
    now = time.time() if now is None else now
    times: dict[str, list[float]] = defaultdict(list)
    spent: dict[str, list[float]] = defaultdict(list)
    for lab in labels:
        times[lab.labeler].append(lab.first_at if lab.first_at is not None else lab.created_at)
        if lab.seconds is not None:
            spent[lab.labeler].append(lab.seconds)
    per = {}
    for who, ts in sorted(times.items()):
        span_h = max(max(ts) - min(ts), 60.0) / 3600.0
        per[who] = {"last_hour": sum(t > now - 3600 for t in ts), "per_hour": round(len(ts) / span_h, 2),
                    "median_s": statistics.median(spent[who]) if spent[who] else None}
    return {"last_hour": sum(v["last_hour"] for v in per.values()), "per_labeler": per}


def distributions(labels: list[Label], flag_names: tuple[str, ...]) -> dict:
    """Likert histogram (1..7) and how often each flag was set, over labeled responses."""
    likert: Counter = Counter()
    flags: Counter = Counter({f: 0 for f in flag_names})
    responses = 0
    for lab in labels:
        if lab.ranking is None:
            continue
        responses += len(lab.ranking)
        likert.update(v for v in (lab.likert or []) if v is not None)
        flags.update(f for fs in (lab.flags or []) for f in fs)
    return {"responses": responses, "likert": {str(k): likert[k] for k in range(1, 8)}, "flags": dict(flags),
            "skips": Counter(lab.skip_reason for lab in labels if lab.skip_reason is not None)}


def summary(labels: list[Label], tasks: dict[int, Task], flag_names: tuple[str, ...], counts: dict,
            min_reliability: float = 0.0) -> dict:
    return {"counts": counts, "rates": rates(labels), "agreement": agreement(labels, tasks),
            "gold": gold_agreement(labels, tasks), "reliability": reliability(labels, tasks, min_reliability),
            "distributions": distributions(labels, flag_names)}
