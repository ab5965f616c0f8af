"""The feedback store's rules without a server: a label only for a task leased to its labeler;
tasks checked by the rm stage's own rules (duplicate responses); edits that keep the history
within the folder's window; ties; the page's settings (`tidal label set`); a version-1 store
migrated in place; a full disk as StorageError 507."""

import json
import re
import sqlite3
import time

import pytest

from feedback_support import CappedStore

from tidal.commands.cli import main
from tidal.common.data import read_records
from tidal.feedback import export, stats
from tidal.feedback.page import label_view, ranking_of, to_stored
from tidal.feedback.store import (
    Conflict, FeedbackError, FeedbackStore, NewTask, Settings, StorageError, TaskResponse,
)


def _task(i: int, k: int = 3) -> NewTask:
    return NewTask(f"prompt {i}", [TaskResponse(f"response {i}.{j}", f"model{j}", "v1") for j in range(k)])


def _labelers(store, *names) -> list[int]:
    return [store.session(store.login(store.add_labeler(n))[0])["labeler_id"] for n in names]


def test_a_label_needs_the_tasks_lease(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    a, b = store.add_tasks([_task(0), _task(1)], overlap_fraction=0.0)
    ann, bob, cy = _labelers(store, "ann", "bob", "cy")
    with pytest.raises(Conflict, match=f"task {a} is not leased to you"):  # never shown to ann
        store.submit(ann, "blind-label-1", a, [0, 1, 2])
    with pytest.raises(Conflict, match="not leased to you"):
        store.submit(ann, "blind-skip-1", a, skip_reason="never saw it")
    assert store.next_task(bob).id == a
    with pytest.raises(Conflict, match=f"task {a} is not leased to you"):  # bob's task
        store.submit(cy, "cy-steals-01", a, [0, 1, 2])
    assert store.submit(bob, "bob-label-01", a, [0, 1, 2])[1]
    assert store.next_task(cy).id == b and store.next_task(ann) is None  # b is cy's; a wants one label
    with pytest.raises(Conflict):
        store.submit(ann, "ann-second-1", a, [2, 1, 0])
    assert [(lab.task_id, lab.labeler) for lab in store.labels()] == [(a, "bob")]  # one label, as wanted


def test_tasks_are_checked_by_the_rm_stages_rules(tmp_path, capsys):
    rows = tmp_path / "tasks.jsonl"
    rows.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "q", "responses": ["same", "other", "same "]}\n')
    assert main(["label", "add-tasks", str(tmp_path / "fb"), str(rows)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tidal: label error: {rows}:2: field 'responses[2]': the same text as responses[0]"), err
    assert len(err.splitlines()) == 1 and "Each task needs" in err
    store = FeedbackStore(tmp_path / "fb", create=True)
    assert store.tasks() == {}  # nothing of the file was added
    for bad, field in ((NewTask([{"role": "user"}], [TaskResponse("a"), TaskResponse("b")]), "prompt[0]"),
                       (NewTask("p", [TaskResponse("a"), TaskResponse("b")], [0, 0]), "gold_ranking"),
                       (NewTask("p", [TaskResponse("a"), TaskResponse("b"), TaskResponse("c")], [0, 0, 1]), "gold_ranking")):
        with pytest.raises(FeedbackError, match=re.escape(f"field '{field}'")):
            store.add_tasks([bad])
    # sampled tasks lose their repeats instead (a task left with one response is dropped)
    ids = store.add_tasks([NewTask("p", [TaskResponse("x"), TaskResponse("y"), TaskResponse("x")]),
                           NewTask("q", [TaskResponse("z"), TaskResponse(" z")])], duplicates="drop")
    assert [[r.text for r in t.responses] for t in store.tasks_by_id(ids).values()] == [["x", "y"]]
    assert store.add_tasks([NewTask("p", [TaskResponse("a"), TaskResponse("b"), TaskResponse("c")], [0, 0, 2])])


def test_an_edit_supersedes_and_keeps_the_history(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True, settings=Settings(edit_s=0.5, overlap_fraction=0.0))
    (task, other) = store.add_tasks([_task(0), _task(1)])
    ann, bob = _labelers(store, "ann", "bob")
    store.next_task(ann)
    first, _ = store.submit(ann, "ann-first-01", task, [0, 1, 2], [7, 4, 1], session="s1", seconds=12.5)
    with pytest.raises(FeedbackError, match="not your label"):
        store.submit(bob, "bob-edit-001", task, [2, 1, 0], replaces=first)
    second, new = store.submit(ann, "ann-edit-001", task, [2, 0, 0], [3, 7, 7], replaces=first, session="s1", seconds=3.0)
    assert new and store.submit(ann, "ann-edit-001", task, [2, 0, 0], [3, 7, 7], replaces=first) == (second, False)
    with pytest.raises(Conflict, match="edited already"):
        store.submit(ann, "ann-edit-002", task, [0, 1, 2], replaces=first)
    current = store.labels()
    assert [(lab.id, lab.ranking, lab.replaces) for lab in current] == [(second, [2, 0, 0], first)]
    history = store.labels(task, history=True)
    assert [lab.id for lab in history] == [first, second] and history[0].superseded_at is not None
    assert history[0].ranking == [0, 1, 2] and history[1].first_at == history[0].first_at
    assert store.progress(ann, "s1")["session"] == {"labels": 1, "seconds_per_label": 12.5}  # an edit is no new label
    assert [r["ranking"] for r in export.ranking_rows(store)] == [[2, 0, 0]]  # only the current version
    assert len(export.comparison_rows(store)) == 2  # (1, 0) and (2, 0); the tie (1, 2) is no comparison
    assert stats.distributions(store.labels(), store.settings.flags)["likert"]["7"] == 2
    time.sleep(0.6)
    with pytest.raises(Conflict, match="can no longer be edited"):
        store.submit(ann, "ann-edit-003", task, [0, 1, 2], replaces=second)
    store.configure(edit_s=3600.0)  # the window counts from the first version, whatever it is now
    assert store.submit(ann, "ann-edit-003", task, skip_reason="changed my mind", replaces=second)[1]
    assert store.progress(ann)["done"] == 1 and store.counts()["complete"] == 0  # a skip is no label
    assert store.next_task(bob).id == task  # so the task goes to someone else


def test_page_mapping_of_ties_and_edits():
    # display order [a, b, c] with b tied to a: ranks 0, 0, 2
    assert ranking_of([2, 0, 1], [False, True, False], 3) == [0, 2, 0]
    assert ranking_of([1, 0], None, 2) == [1, 0]
    for order, tie in (([0, 1], [True, False]), ([0, 0], None), ([0, 1], [False, 1]), ([0, 1, True], None)):
        with pytest.raises(FeedbackError, match="'order'|'tie'"):
            ranking_of(order, tie, len(order))
    from tidal.feedback.store import Label, Task

    task = Task(4, "p", [TaskResponse("a"), TaskResponse("b"), TaskResponse("c")], 1)
    sent = {"submission_id": "x" * 10, "task_id": 4, "order": [2, 0, 1], "tie": [False, True, False],
            "likert": [5, 6, 7], "flags": [[], ["made-up facts"], []], "comment": "ok"}
    stored = to_stored(sent, 9, task, Settings())
    label = Label(1, "x" * 10, 4, "ann", None, stored["ranking"], stored["likert"], stored["flags"], "ok", 0.0)
    view = label_view(label, 9, 3)  # the page gets back what it sent, slot by slot
    assert (view["order"][0] in (2, 0)) and sorted(view["order"][:2]) == [0, 2] and view["tie"] == [False, True, False]
    assert (view["likert"], view["flags"]) == (sent["likert"], sent["flags"])
    with pytest.raises(FeedbackError, match="needs a score"):
        to_stored({**sent, "likert": [5, None, 7]}, 9, task, Settings())
    assert to_stored({**sent, "likert": None}, 9, task, Settings(likert="optional"))["likert"] is None


def test_label_set_configures_the_page(tmp_path, capsys):
    FeedbackStore(tmp_path / "fb", create=True)
    guide = tmp_path / "guidelines.md"
    guide.write_text("# Rank for helpfulness\n\n- **Facts** first\n", encoding="utf-8")
    assert main(["label", "set", str(tmp_path / "fb"), "--guidelines", str(guide), "--likert", "off",
                 "--edit-minutes", "2.5"]) == 0
    s = FeedbackStore(tmp_path / "fb").settings
    assert (s.guidelines, s.likert, s.edit_s) == (guide.read_text(), "off", 150.0)
    assert main(["label", "set", str(tmp_path / "fb"), "--guidelines", str(tmp_path / "missing.md")]) == 2
    assert "missing.md: cannot read it" in capsys.readouterr().err
    assert main(["label", "set", str(tmp_path / "fb"), "--edit-minutes", "-1"]) == 2
    assert "use 0 (no edits) or more" in capsys.readouterr().err
    store = FeedbackStore(tmp_path / "fb")
    (task,) = store.add_tasks([_task(0, k=2)])
    (ann,) = _labelers(store, "ann")
    store.next_task(ann)
    with pytest.raises(FeedbackError, match="collects no scores"):
        store.submit(ann, "scored-label", task, [0, 1], [4, 4])


V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE labelers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE sessions (id_hash TEXT PRIMARY KEY, labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    csrf TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE tasks (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, responses TEXT NOT NULL,
    want_labels INTEGER NOT NULL, gold_ranking TEXT, created_at REAL NOT NULL);
CREATE TABLE assignments (task_id INTEGER NOT NULL REFERENCES tasks(id), labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    expires_at REAL NOT NULL, PRIMARY KEY (task_id, labeler_id));
CREATE TABLE labels (id INTEGER PRIMARY KEY, submission_id TEXT NOT NULL UNIQUE,
    task_id INTEGER NOT NULL REFERENCES tasks(id), labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    skip_reason TEXT, ranking TEXT, likert TEXT, flags TEXT, comment TEXT, created_at REAL NOT NULL,
    UNIQUE (task_id, labeler_id));
CREATE INDEX labels_task ON labels(task_id);
CREATE INDEX assignments_labeler ON assignments(labeler_id);
"""


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    (tmp_path / "fb").mkdir()
    db = sqlite3.connect(tmp_path / "fb" / "feedback.sqlite")
    db.executescript(V1)
    settings = {"flags": ["f1"], "overlap_fraction": 0.1, "overlap_labels": 2, "lease_s": 1800.0, "session_s": 60.0}
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "1"), ("settings", json.dumps(settings))])
    db.execute("INSERT INTO labelers VALUES (1, 'ann', 'h', 0, 0)")
    db.execute("INSERT INTO tasks VALUES (1, '\"p\"', ?, 1, NULL, 0)", (json.dumps([{"text": t} for t in "ab"]),))
    db.execute("INSERT INTO labels VALUES (1, 'old-label-1', 1, 1, NULL, '[1, 0]', '[3, 6]', '[[], [\"f1\"]]', NULL, ?)",
               (time.time(),))
    db.commit()
    db.close()
    store = FeedbackStore(tmp_path / "fb")
    (old,) = store.labels()
    assert (old.ranking, old.likert, old.flags, old.first_at) == ([1, 0], [3, 6], [[], ["f1"]], old.created_at)
    assert store.settings.flags == ("f1",) and store.settings.likert == "required"  # new settings take defaults
    assert store.integrity_check() == "ok"
    assert store.submit(1, "edit-of-old1", 1, [0, 1], [6, 3], replaces=old.id)[1]  # the new columns work
    assert [lab.id for lab in store.labels(history=True)] == [1, 2] and len(store.labels()) == 1
    assert read_records(_write(store, tmp_path), "rankings")[0].ranking == [0, 1]


def _write(store, tmp_path):
    export.write_export(store, tmp_path / "r.jsonl", "rankings")
    return tmp_path / "r.jsonl"


def test_a_full_disk_is_a_storage_error_507(tmp_path):
    store = CappedStore(tmp_path / "fb", create=True)
    store.pages = sqlite3.connect(store.path).execute("PRAGMA page_count").fetchone()[0]
    with pytest.raises(StorageError, match="the disk is full .*nothing was stored") as err:
        store.add_tasks([NewTask("p" * 20_000, [TaskResponse("a"), TaskResponse("b")])])
    assert err.value.status == 507 and store.tasks() == {}
