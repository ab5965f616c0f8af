"""What an online refit of the reward model trains and measures on, from a feedback store.

Every current label of a non-gold task (skips left out) gives its task's C(K,2) response pairs.
The labels of one task are pooled pair by pair into a *soft label*: with labeler weights w (their
reliability, tidal.feedback.stats.reliability),

    p(a over b) = sum of w over the labels ranking a above b / sum of w over the labels ordering the pair

so two labelers who disagree on an overlap task make p = 1/2 (both kept), not a dropped task.
The pair's mass is that weight sum / C(K,2): one labeler of weight 1 gives the same 1/C(K,2) the
comparisons export gives each pair of a ranking. A soft pair trains as two weighted comparisons,
(a over b, p x mass) and (b over a, (1 - p) x mass): the Bradley-Terry loss of a soft target is
exactly that sum. A labeler of weight 0 (dropped, or graded no better than a coin) adds nothing.

`split_newest` leaves the tasks whose labels are newest out of a fit: the online accuracy is the
new version's accuracy on them before any fit has seen them (they join the next fit).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations

from tidal.common.data import ComparisonRecord, Prompt
from tidal.feedback.stats import reliability
from tidal.feedback.store import FeedbackStore, Label, Task


@dataclass(frozen=True)
class SoftPair:
    task_id: int
    prompt: Prompt
    a: str  # response text
    b: str
    p: float  # weighted share of the labels that rank a above b, 0..1
    mass: float  # the pair's weight in the loss: labelers' weight sum / C(K, 2)
    label_ids: tuple[int, ...]  # the labels of the task it was pooled from
    newest: int  # the newest of those label ids (what split_newest orders by)


@dataclass(frozen=True)
class LabelSet:
    """A store's labels as reward-fitting data."""

    pairs: list[SoftPair]
    weights: dict[str, dict]  # tidal.feedback.stats.reliability of every labeler

    @property
    def label_ids(self) -> set[int]:
        return {i for p in self.pairs for i in p.label_ids}


def label_set(store: FeedbackStore, min_reliability: float | None = None) -> LabelSet:
    """Soft pairs of every labeled non-gold task, labels weighted by their labeler's reliability
    (min_reliability None: the store's setting)."""
    labels, tasks = store.labels(), store.tasks()
    threshold = store.settings.min_reliability if min_reliability is None else min_reliability
    weights = reliability(labels, tasks, threshold)
    by_task: dict[int, list[Label]] = defaultdict(list)
    for lab in labels:
        if lab.ranking is not None and tasks[lab.task_id].gold_ranking is None:
            by_task[lab.task_id].append(lab)
    pairs = [p for tid, labs in sorted(by_task.items()) for p in soft_pairs(tasks[tid], labs, weights)]
    return LabelSet(pairs, weights)


def soft_pairs(task: Task, labels: list[Label], weights: dict[str, dict]) -> list[SoftPair]:
    """The task's response pairs that some weighted label orders, each with its soft label."""
    k = len(task.responses)
    ids, newest, out = tuple(lab.id for lab in labels), max(lab.id for lab in labels), []
    for i, j in combinations(range(k), 2):
        above = ordered = 0.0
        for lab in labels:
            w = weights.get(lab.labeler, {"weight": 1.0})["weight"]
            if lab.ranking[i] != lab.ranking[j] and w > 0:  # a tie orders nothing
                ordered += w
                above += w * (lab.ranking[i] < lab.ranking[j])
        if ordered > 0 and task.responses[i].text.strip() != task.responses[j].text.strip():
            out.append(SoftPair(task.id, task.prompt, task.responses[i].text, task.responses[j].text,
                                above / ordered, ordered / math.comb(k, 2), ids, newest))
    return out


def split_newest(pairs: list[SoftPair], share: float) -> tuple[list[SoftPair], list[SoftPair]]:
    """(fit on, held out): the ceil(share x tasks) tasks with the newest labels are held out,
    whole (an overlap task's labels never straddle the split). share 0: nothing held out."""
    order = sorted({p.task_id: p.newest for p in pairs}.items(), key=lambda kv: kv[1])
    held = {tid for tid, _ in order[len(order) - math.ceil(share * len(order)):]} if share > 0 and order else set()
    return [p for p in pairs if p.task_id not in held], [p for p in pairs if p.task_id in held]


def comparison_records(pairs: list[SoftPair]) -> list[ComparisonRecord]:
    """Each soft pair as its weighted comparisons (see the module doc); zero-weight sides left out."""
    out = []
    for p in pairs:
        if p.p > 0:
            out.append(ComparisonRecord(p.prompt, p.a, p.b, p.p * p.mass))
        if p.p < 1:
            out.append(ComparisonRecord(p.prompt, p.b, p.a, (1.0 - p.p) * p.mass))
    return out
