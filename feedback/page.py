"""The labeling page's view of tasks and labels, and its submissions mapped onto the store.

The page shows a task's K responses in a random order fixed per (task, labeler): slot s shows
stored response perm[s]. It sends a ranking as `order` (the slots, best first) and `tie`
(tie[p] true: the response at position p is as good as the one above it), Likert scores and
flags per slot. The store keeps everything in stored order, with tied responses sharing a rank
(standard competition ranking: order [a, b, c] with b tied to a gives ranks 0, 0, 2).
"""

from __future__ import annotations

import random

from tidal.feedback.model import FeedbackError, Label, Settings, Task

MAX_COMMENT, MAX_SKIP_REASON = 5000, 500


def display_order(task_id: int, labeler_id: int, k: int) -> list[int]:
    """perm[slot] = stored index of the response shown at `slot`: random per (task, labeler), so
    neither the source nor the order the tasks were written in shows, and a reload keeps it."""
    return random.Random(f"{task_id}:{labeler_id}").sample(range(k), k)


def task_view(task: Task, labeler_id: int) -> dict:
    """The task as the page gets it: prompt and responses in display order, no sources."""
    perm = display_order(task.id, labeler_id, len(task.responses))
    return {"id": task.id, "prompt": task.prompt,
            "responses": [{"slot": s, "text": task.responses[i].text} for s, i in enumerate(perm)]}


def label_view(label: Label, labeler_id: int, k: int) -> dict:
    """A stored label as the page sent it (order, tie, likert and flags by slot), to edit it."""
    perm = display_order(label.task_id, labeler_id, k)
    view = {"id": label.id, "skip_reason": label.skip_reason, "comment": label.comment or ""}
    if label.ranking is not None:
        order = sorted(range(k), key=lambda slot: label.ranking[perm[slot]])
        view["order"] = order
        view["tie"] = [p > 0 and label.ranking[perm[s]] == label.ranking[perm[order[p - 1]]] for p, s in enumerate(order)]
        view["likert"] = None if label.likert is None else [label.likert[perm[s]] for s in range(k)]
        view["flags"] = None if label.flags is None else [label.flags[perm[s]] for s in range(k)]
    return view


def _text(value: str, limit: int) -> str:
    """At most `limit` characters that SQLite can store: JSON may carry lone surrogates (\\ud800)
    that no UTF-8 encoder takes; they become '?'."""
    return value[:limit].encode("utf-8", "replace").decode("utf-8")


def _int(value, field: str) -> int:
    if type(value) is not int:
        raise FeedbackError(f"'{field}' must be a whole number, got {type(value).__name__}")
    return value


def ranking_of(order, tie, k: int) -> list[int]:
    """Ranks in display-slot terms: rank[slot] (0 = best) from `order` and `tie` (see module doc)."""
    if not isinstance(order, list) or not all(type(x) is int for x in order) or sorted(order) != list(range(k)):
        raise FeedbackError(f"'order' must list the {k} display slots best to worst")
    tie = [False] * k if tie is None else tie
    if not isinstance(tie, list) or len(tie) != k or not all(type(t) is bool for t in tie) or tie[0]:
        raise FeedbackError(f"'tie' must be {k} true/false values, one per position, the first false "
                            "(true: as good as the response above)")
    rank, ranks = 0, [0] * k
    for p, slot in enumerate(order):
        rank = rank if tie[p] else p
        ranks[slot] = rank
    return ranks


def _per_slot(value, field: str, k: int, perm: list[int]) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != k:
        raise FeedbackError(f"'{field}' must hold one entry per display slot ({k})")
    return [value[perm.index(i)] for i in range(k)]  # stored index i is shown at slot perm.index(i)


def to_stored(req, labeler_id: int, task: Task | None, settings: Settings) -> dict:
    """A page submission (by display slot) as FeedbackStore.submit's keyword arguments (stored
    order). FeedbackError names the field that is wrong. `task` is the one req names, or None."""
    if not isinstance(req, dict):
        raise FeedbackError("the body must be a JSON object")
    task_id = _int(req.get("task_id"), "task_id")
    common = {"submission_id": req.get("submission_id"), "task_id": task_id,
              "replaces": None if req.get("replaces") is None else _int(req["replaces"], "replaces"),
              "seconds": req.get("seconds")}
    if req.get("skip_reason") is not None:
        if not isinstance(req["skip_reason"], str):
            raise FeedbackError("'skip_reason' must be a string")
        return {**common, "skip_reason": _text(req["skip_reason"], MAX_SKIP_REASON)}
    if task is None:
        raise FeedbackError(f"no task {task_id}")
    k = len(task.responses)
    perm = display_order(task_id, labeler_id, k)
    by_slot = ranking_of(req.get("order"), req.get("tie"), k)
    likert = _per_slot(req.get("likert"), "likert", k, perm)
    if settings.likert == "required" and (likert is None or None in likert):
        raise FeedbackError(f"'likert': this feedback folder needs a score 1..7 for each of the {k} responses")
    comment = req.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise FeedbackError("'comment' must be a string")
    return {**common, "ranking": [by_slot[perm.index(i)] for i in range(k)], "likert": likert,
            "flags": _per_slot(req.get("flags"), "flags", k, perm), "comment": _text(comment or "", MAX_COMMENT) or None}
