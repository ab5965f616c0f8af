"""Online RLHF's lineage in the feedback store: every reward-model version the run published,
the ids of the labels it was fit on and of the newest ones it was measured on before any fit had
seen them (its online accuracy), in the store's `reward_versions` table (tidal.feedback.schema).

A label knows its task (labels.task_id), the task knows its samples and the policy version that
wrote each one (TaskResponse.source / .version) and why it was asked (Task.meta); a version knows
its labels here; an RL step knows the version that scored it (RUN/rollouts.jsonl)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from tidal.feedback.store import FeedbackStore


@dataclass(frozen=True)
class RewardVersion:
    version: int  # 0: the reward model the rl stage started with (fit on no label of this store)
    path: str  # its reward-model folder
    created_at: float
    labels: list[int]  # ids of the labels it was fit on
    heldout: list[int]  # ids of the newest labels left out of its fit and measured on
    meta: dict  # online_accuracy, pairs, fit_s, policy_step, ...


def record_version(store: FeedbackStore, version: int, path: str, labels: list[int], heldout: list[int],
                   meta: dict) -> None:
    """Adds (or, for a version refit after a crash, replaces) one version's lineage row."""
    with store._tx() as db:
        db.execute("INSERT OR REPLACE INTO reward_versions VALUES (?,?,?,?,?,?)",
                   (version, str(path), time.time(), json.dumps(sorted(labels)), json.dumps(sorted(heldout)),
                    json.dumps(meta)))


def versions(store: FeedbackStore) -> list[RewardVersion]:
    """Every recorded version, oldest first."""
    with store._read() as db:
        rows = db.execute("SELECT version, path, created_at, labels, heldout, meta FROM reward_versions "
                          "ORDER BY version").fetchall()
    return [RewardVersion(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), json.loads(r[5])) for r in rows]


def per_version(store: FeedbackStore) -> list[dict]:
    """One row per version for `tidal label status` and the researcher page: labels fit on, how
    many were new to it, the online accuracy, and the label arrival rate since the version before."""
    rows, seen, before = [], set(), None
    for v in versions(store):
        span = None if before is None else max(v.created_at - before, 1e-9)
        fresh = set(v.labels) | set(v.heldout)
        rows.append({"version": v.version, "labels": len(v.labels), "heldout": len(v.heldout),
                     "new_labels": len(fresh - seen), "online_accuracy": v.meta.get("online_accuracy"),
                     "policy_step": v.meta.get("policy_step"),
                     "labels_per_min": None if span is None else 60.0 * len(fresh - seen) / span})
        seen |= fresh
        before = v.created_at
    return rows
