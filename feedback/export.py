"""Exports of a feedback store in the formats tidal's stages read (tidal.common.data).

rankings     one row per (task, labeler) ranking: {prompt, responses, ranking} with
             ranking[i] = rank of responses[i], 0 = best; a task ranked by two labelers (overlap)
             gives two rows, so disagreement stays in the data as it was collected.
comparisons  every C(K,2) pair of each ranking but the tied ones: {prompt, chosen, rejected, weight} (chosen ranked
             better), weight = 1 / C(K,2), so each ranking weighs as much as one comparison in the
             rm and dpo losses (InstructGPT's ranking loss; a K=9 ranking would otherwise count 36x).
ratings      one row per labeled response: {prompt, response, likert, flags, ...} (tidal's own
             format; no stage reads it yet).
Ties: a labeler may tie responses (they share a rank, [0, 0, 2]); rankings keep them as they are
(the rm stage's ranking loss and DPO leave tied pairs out), comparisons skip tied pairs (a pair
says one response is better). Only the current version of an edited label is exported.
Skips (with their reason) are never exported as preferences; they show in the stats. Gold tasks are left out unless
`include_gold` (their labels grade labelers, their answers were not collected here).
Every row also carries task_id, labeler, sources and versions (readers ignore unknown fields).
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from itertools import combinations
from pathlib import Path

from tidal.common.data import ComparisonRecord, RankingRecord
from tidal.feedback.store import FeedbackStore, Label, Task

FORMATS = ("rankings", "comparisons", "ratings")


def _labeled(store: FeedbackStore, include_gold: bool) -> list[tuple[Label, Task]]:
    tasks = store.tasks()
    return [(lab, tasks[lab.task_id]) for lab in store.labels()
            if lab.ranking is not None and (include_gold or tasks[lab.task_id].gold_ranking is None)]


def ranking_rows(store: FeedbackStore, include_gold: bool = False) -> list[dict]:
    return [{"prompt": task.prompt, "responses": [r.text for r in task.responses], "ranking": lab.ranking,
             "task_id": task.id, "labeler": lab.labeler, "sources": [r.source for r in task.responses],
             "versions": [r.version for r in task.responses]} for lab, task in _labeled(store, include_gold)]


def comparison_rows(store: FeedbackStore, include_gold: bool = False) -> list[dict]:
    rows = []
    for lab, task in _labeled(store, include_gold):
        weight = 1.0 / math.comb(len(task.responses), 2)  # the ranking's pairs share one comparison's weight
        for i, j in combinations(range(len(task.responses)), 2):
            if lab.ranking[i] == lab.ranking[j]:  # a tie prefers neither
                continue
            win, lose = (i, j) if lab.ranking[i] < lab.ranking[j] else (j, i)
            rows.append({"prompt": task.prompt, "chosen": task.responses[win].text, "rejected": task.responses[lose].text,
                         "weight": weight, "task_id": task.id, "labeler": lab.labeler,
                         "sources": [task.responses[win].source, task.responses[lose].source],
                         "versions": [task.responses[win].version, task.responses[lose].version]})
    return rows


def rating_rows(store: FeedbackStore, include_gold: bool = False) -> list[dict]:
    rows = []
    for lab, task in _labeled(store, include_gold):
        for i, r in enumerate(task.responses):
            rows.append({"prompt": task.prompt, "response": r.text, "rank": lab.ranking[i],
                         "likert": None if lab.likert is None else lab.likert[i],
                         "flags": [] if lab.flags is None else lab.flags[i], "comment": lab.comment,
                         "task_id": task.id, "labeler": lab.labeler, "source": r.source, "version": r.version})
    return rows


def ranking_records(store: FeedbackStore, include_gold: bool = False) -> list[RankingRecord]:
    """The rankings as tidal.common.data records (what the rm stage trains on)."""
    return [RankingRecord(r["prompt"], r["responses"], r["ranking"]) for r in ranking_rows(store, include_gold)]


def comparison_records(store: FeedbackStore, include_gold: bool = False) -> list[ComparisonRecord]:
    return [ComparisonRecord(r["prompt"], r["chosen"], r["rejected"], r["weight"])
            for r in comparison_rows(store, include_gold)]


def export_rows(store: FeedbackStore, fmt: str, include_gold: bool = False) -> list[dict]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {"rankings": ranking_rows, "comparisons": comparison_rows, "ratings": rating_rows}[fmt](store, include_gold)


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _publish(tmp: str, out: Path) -> None:
    try:
        os.link(tmp, out)  # unlike a rename, never replaces a file of that name
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) or out.exists():
            raise
        os.rename(tmp, out)  # a file system without hard links: checked just above


def write_export(store: FeedbackStore, out: str | Path, fmt: str = "rankings", include_gold: bool = False) -> int:
    """Writes a JSON-lines export to `out` (which must not exist: nothing a user wrote is
    overwritten); returns the number of rows. The rows go to a temporary file of a fresh name
    next to `out` (never one a user may own), which becomes `out` by a hard link that fails if
    `out` appeared meanwhile; a failed write (a full disk) leaves neither behind."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; export to a new file name")
    rows = export_rows(store, fmt, include_gold)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_jsonl(rows))
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, out)
    except OSError as e:
        if e.filename is None:  # a write's error names no file: name the export
            raise OSError(e.errno, e.strerror, str(out)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(rows)
