"""The feedback store: one SQLite file (`DIR/feedback.sqlite`) per feedback folder.

Guarantees: WAL journal with synchronous=FULL, so a label the server acknowledged survives a
`kill -9` of the server; every submission is one `BEGIN IMMEDIATE` transaction; a submission
carries a client-made id that is UNIQUE, so a retry or a double click never counts twice; a
labeler has at most one current label per task; a label is accepted only for a task leased to
its labeler (shown to it by `next_task`); an edit never overwrites a label but supersedes it,
so the history stays; tokens and session ids are stored as SHA-256 hashes only (they are
192-bit random strings, so a plain hash is enough). SQLite's disk-full, locked and I/O errors
come out as StorageError (tidal.feedback.schema). Tables and migrations: tidal.feedback.schema.
Labels hold the ranking, Likert scores and flags in the task's stored response order (the page
shuffles for display).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import secrets
import statistics
import time
from pathlib import Path

from tidal.feedback.model import (
    DEFAULT_FLAGS, LIKERT_MODES, MAX_K, MIN_K, Conflict, FeedbackError, Label, NewTask, Settings, StorageError, Task,
    TaskResponse, check_label, check_settings, check_task, distinct,
)
from tidal.feedback.schema import DB_NAME, SCHEMA_VERSION, create_or_migrate, reading, transaction

__all__ = ["DB_NAME", "DEFAULT_FLAGS", "LIKERT_MODES", "MAX_K", "MIN_K", "SCHEMA_VERSION", "Conflict", "FeedbackError",
           "FeedbackStore", "Label", "NewTask", "Settings", "StorageError", "Task", "TaskResponse", "check_task"]

# A task still handed out to labeler :me at time :now: a gold task (every labeler gets each one),
# or one whose current labels plus other labelers' live leases are fewer than it wants.
_STILL_WANTED = ("(t.gold_ranking IS NOT NULL OR "
                 "(SELECT count(*) FROM labels l WHERE l.task_id=t.id AND l.skip_reason IS NULL AND l.superseded_at IS NULL)"
                 " + (SELECT count(*) FROM assignments a WHERE a.task_id=t.id AND a.expires_at > :now AND a.labeler_id != :me)"
                 " < t.want_labels)")
_LABEL_SQL = ("SELECT b.id, b.submission_id, b.task_id, l.name, b.skip_reason, b.ranking, b.likert, b.flags, b.comment, "
              "b.created_at, b.first_at, b.replaces, b.superseded_at, b.seconds FROM labels b "
              "JOIN labelers l ON l.id = b.labeler_id")
_TASK_SQL = "SELECT id, prompt, responses, want_labels, gold_ranking, meta, created_at FROM tasks"
MAX_SECONDS = 7 * 86400.0  # a page's time on one task beyond this is a clock gone wrong


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)


def _load(value: str | None):
    return None if value is None else json.loads(value)


def _task(r) -> Task:
    return Task(r[0], json.loads(r[1]), [TaskResponse(**x) for x in json.loads(r[2])], r[3], _load(r[4]), _load(r[5]), r[6])


def _label(r) -> Label:
    return Label(r[0], r[1], r[2], r[3], r[4], _load(r[5]), _load(r[6]), _load(r[7]), r[8], r[9], r[10], r[11], r[12], r[13])


def _settings_json(s: Settings) -> str:
    return json.dumps(dataclasses.asdict(s))


def _settings_of(db) -> Settings:
    raw = json.loads(db.execute("SELECT value FROM meta WHERE key='settings'").fetchone()[0])
    raw["flags"] = tuple(raw["flags"])
    return Settings(**raw)


class FeedbackStore:
    """A feedback folder's store. Every method opens its own connection, so one store object is
    safe to share between the web server's threads."""

    def __init__(self, folder: str | Path, create: bool = False, settings: Settings | None = None):
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        if not self.path.exists():
            if not create:
                raise FeedbackError(f"{self.folder}: no feedback store ({DB_NAME}); create one with "
                                    f"`tidal label add-labeler {self.folder} NAME` or `tidal label add-tasks`")
            self.folder.mkdir(parents=True, exist_ok=True)
        if settings is not None:
            check_settings(settings)
        create_or_migrate(self.path, None if settings is None else _settings_json(settings), _settings_json(Settings()))

    def _tx(self):
        return transaction(self.path)

    def _read(self):
        return reading(self.path)

    @property
    def settings(self) -> Settings:
        with self._read() as db:
            return _settings_of(db)

    def set_flags(self, flags: list[str]) -> None:
        """Replaces the flag names the page offers; refused once labels exist (their flags
        would no longer match the list the stats count)."""
        flags = [f.strip() for f in flags if f.strip()]
        if not flags or len(set(flags)) != len(flags):
            raise FeedbackError(f"flags {flags} must be a non-empty list of distinct names")
        with self._tx() as db:
            s = _settings_of(db)
            if db.execute("SELECT 1 FROM labels LIMIT 1").fetchone() and tuple(flags) != s.flags:
                raise FeedbackError(f"{self.path} already holds labels; flags can only be set before labeling starts")
            db.execute("UPDATE meta SET value=? WHERE key='settings'", (_settings_json(dataclasses.replace(s, flags=tuple(flags))),))

    def configure(self, likert: str | None = None, edit_s: float | None = None, guidelines: str | None = None,
                  min_reliability: float | None = None) -> Settings:
        """Changes what the page asks (the Likert mode), the edit window, the guidelines and the
        reliability below which a labeler is left out of reward fitting; any time, since stored
        labels keep what they were sent with. Returns the new settings."""
        changes = {k: v for k, v in (("likert", likert), ("edit_s", edit_s), ("guidelines", guidelines),
                                     ("min_reliability", min_reliability)) if v is not None}
        with self._tx() as db:
            new = dataclasses.replace(_settings_of(db), **changes)
            check_settings(new)
            db.execute("UPDATE meta SET value=? WHERE key='settings'", (_settings_json(new),))
        return new

    # ------------------------------------------------------------------ labelers and sessions

    def add_labeler(self, name: str, admin: bool = False) -> str:
        """Registers `name`; returns its token (shown once, only its hash is kept)."""
        if not name.strip():
            raise FeedbackError("a labeler needs a non-empty name")
        token = secrets.token_urlsafe(24)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM labelers WHERE name=?", (name,)).fetchone():
                raise FeedbackError(f"labeler {name!r} already exists in {self.path}; pick another name")
            db.execute("INSERT INTO labelers (name, token_hash, is_admin, created_at) VALUES (?,?,?,?)",
                       (name, _hash(token), int(admin), time.time()))
        return token

    def labeler_id(self, name: str) -> int | None:
        """The id of the labeler called `name`, or None."""
        with self._read() as db:
            row = db.execute("SELECT id FROM labelers WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def labeler_count(self) -> int:
        with self._read() as db:
            return db.execute("SELECT count(*) FROM labelers").fetchone()[0]

    def login(self, token: str) -> tuple[str, str] | None:
        """(session id, csrf token) for a valid labeler token, else None."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM labelers WHERE token_hash=?", (_hash(token),)).fetchone()
            if row is None:
                return None
            sid, csrf = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (time.time(),))
            db.execute("INSERT INTO sessions VALUES (?,?,?,?)", (_hash(sid), row[0], csrf, time.time() + _settings_of(db).session_s))
        return sid, csrf

    def session(self, sid: str) -> dict | None:
        """{labeler_id, name, is_admin, csrf, session (the id's hash: labels name their session by
        it)} of a live session, else None."""
        with self._read() as db:
            row = db.execute("SELECT l.id, l.name, l.is_admin, s.csrf FROM sessions s JOIN labelers l ON l.id = s.labeler_id "
                             "WHERE s.id_hash=? AND s.expires_at > ?", (_hash(sid), time.time())).fetchone()
        return None if row is None else {"labeler_id": row[0], "name": row[1], "is_admin": bool(row[2]), "csrf": row[3],
                                         "session": _hash(sid)}

    def logout(self, sid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE id_hash=?", (_hash(sid),))

    # ------------------------------------------------------------------ tasks

    def add_tasks(self, tasks: list[NewTask], overlap_fraction: float | None = None, seed: int | None = None,
                  duplicates: str = "refuse") -> list[int]:
        """Adds tasks in one transaction; returns their ids. A share `overlap_fraction` (default:
        the store's setting) is marked for `overlap_labels` labelers, the rest for one. A task
        whose responses repeat one another is refused (its labels could not be trained on), or
        with duplicates="drop" (sampled tasks) loses the repeats, and the task too if fewer
        than two responses are left."""
        s = self.settings
        frac = s.overlap_fraction if overlap_fraction is None else overlap_fraction
        if not 0.0 <= frac <= 1.0:
            raise FeedbackError(f"overlap fraction {frac} must be between 0 and 1")
        if duplicates == "drop":
            tasks = [t for t in map(distinct, tasks) if len(t.responses) >= MIN_K]
        for i, t in enumerate(tasks):
            check_task(t, f"task {i}")
        rng = random.Random(seed)
        ids = []
        with self._tx() as db:
            for t in tasks:
                want = s.overlap_labels if rng.random() < frac else 1
                cur = db.execute("INSERT INTO tasks (prompt, responses, want_labels, gold_ranking, created_at, meta) "
                                 "VALUES (?,?,?,?,?,?)", (json.dumps(t.prompt), json.dumps([r.__dict__ for r in t.responses]),
                                                          want, _dump(t.gold_ranking), time.time(), _dump(t.meta)))
                ids.append(cur.lastrowid)
        return ids

    def tasks(self) -> dict[int, Task]:
        return self.tasks_by_id(None)

    def tasks_by_id(self, ids: list[int] | None) -> dict[int, Task]:
        """{id: Task} of the given ids (all tasks for None)."""
        sql = _TASK_SQL if ids is None else _TASK_SQL + f" WHERE id IN ({','.join('?' * len(ids))})"
        with self._read() as db:
            rows = db.execute(sql + " ORDER BY id", list(ids or [])).fetchall()
        return {r[0]: _task(r) for r in rows}

    def next_task(self, labeler_id: int) -> Task | None:
        """The task this labeler holds a live lease on, or a new one leased now: gold tasks first
        (onboarding), then tasks still short of their wanted labels counting others' live leases.
        Never a task this labeler already labeled or skipped."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT task_id FROM assignments WHERE labeler_id=? AND expires_at > ? AND task_id NOT IN "
                             "(SELECT task_id FROM labels WHERE labeler_id=?) ORDER BY task_id LIMIT 1",
                             (labeler_id, now, labeler_id)).fetchone()
            if row is None:
                row = db.execute("SELECT t.id FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.task_id=t.id "
                                 f"AND l.labeler_id=:me) AND {_STILL_WANTED} ORDER BY (t.gold_ranking IS NULL), t.id LIMIT 1",
                                 {"me": labeler_id, "now": now}).fetchone()
                if row is None:
                    return None
                db.execute("INSERT OR REPLACE INTO assignments VALUES (?,?,?)", (row[0], labeler_id, now + _settings_of(db).lease_s))
            return _task(db.execute(_TASK_SQL + " WHERE id=?", (row[0],)).fetchone())

    # ------------------------------------------------------------------ labels

    def submit(self, labeler_id: int, submission_id: str, task_id: int, ranking: list[int] | None = None,
               likert: list[int | None] | None = None, flags: list[list[str]] | None = None,
               comment: str | None = None, skip_reason: str | None = None, replaces: int | None = None,
               session: str | None = None, seconds: float | None = None) -> tuple[int, bool]:
        """Stores one label (or a skip) in one transaction; (label id, True if it was new). The
        same submission id again returns the first label and stores nothing. A new label needs
        the task's lease (`_check_lease`); `replaces` = the id of this labeler's current label
        of the task makes it an edit, allowed for `edit_s` after the first version was sent."""
        if not (isinstance(submission_id, str) and 8 <= len(submission_id) <= 100 and submission_id.isprintable()):
            raise FeedbackError("'submission_id' must be a string of 8 to 100 printable characters made by the client")
        if seconds is not None and not (type(seconds) in (int, float) and 0 <= seconds <= MAX_SECONDS):
            raise FeedbackError(f"'seconds' must be the time spent on the task, 0 to {MAX_SECONDS:.0f}")
        now = time.time()
        with self._tx() as db:
            old = db.execute("SELECT id, labeler_id, task_id FROM labels WHERE submission_id=?", (submission_id,)).fetchone()
            if old is not None:
                if (old[1], old[2]) != (labeler_id, task_id):
                    raise Conflict(f"submission id {submission_id!r} was already used for another task")
                return old[0], False
            row = db.execute("SELECT responses FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None:
                raise FeedbackError(f"no task {task_id}")
            settings = _settings_of(db)
            if skip_reason is not None:
                if not skip_reason.strip():
                    raise FeedbackError("'skip_reason' must say why the task is skipped")
                ranking = likert = flags = None
            else:
                check_label(len(json.loads(row[0])), ranking, likert, flags, settings)
            if replaces is None:
                _check_lease(db, labeler_id, task_id, now)
                first_at = now
            else:
                first_at = _supersede(db, labeler_id, task_id, replaces, now, settings.edit_s)
            cur = db.execute(
                "INSERT INTO labels (submission_id, task_id, labeler_id, skip_reason, ranking, likert, flags, comment, "
                "created_at, first_at, replaces, session, seconds) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (submission_id, task_id, labeler_id, skip_reason, _dump(ranking), _dump(likert), _dump(flags),
                 (comment or None), now, first_at, replaces, session, seconds))
            db.execute("DELETE FROM assignments WHERE task_id=? AND labeler_id=?", (task_id, labeler_id))
        return cur.lastrowid, True

    def labels(self, task_id: int | None = None, history: bool = False) -> list[Label]:
        """The current labels (all tasks, or one), oldest first; with `history` also the versions
        that edits superseded."""
        where = [] if history else ["b.superseded_at IS NULL"]
        where += [] if task_id is None else ["b.task_id = :task"]
        sql = _LABEL_SQL + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY b.id"
        with self._read() as db:
            return [_label(r) for r in db.execute(sql, {"task": task_id}).fetchall()]

    def label(self, label_id: int) -> Label | None:
        with self._read() as db:
            row = db.execute(_LABEL_SQL + " WHERE b.id=?", (label_id,)).fetchone()
        return None if row is None else _label(row)

    def progress(self, labeler_id: int, session: str | None = None) -> dict:
        """{done: this labeler's labels and skips, open: tasks still short of labels}, and with a
        session {labels: sent in it (not skips, edits not counted), seconds_per_label: their median time}."""
        with self._read() as db:
            done = db.execute("SELECT count(*) FROM labels WHERE labeler_id=? AND superseded_at IS NULL", (labeler_id,)).fetchone()[0]
            open_ = db.execute("SELECT count(*) FROM tasks t WHERE (SELECT count(*) FROM labels l WHERE l.task_id=t.id "
                               "AND l.skip_reason IS NULL AND l.superseded_at IS NULL) < t.want_labels").fetchone()[0]
            times = [] if session is None else db.execute(
                "SELECT seconds FROM labels WHERE session=? AND labeler_id=? AND replaces IS NULL AND skip_reason IS NULL",
                (session, labeler_id)).fetchall()
        out = {"done": done, "open": open_}
        if session is not None:
            known = [t for (t,) in times if t is not None]
            out["session"] = {"labels": len(times), "seconds_per_label": statistics.median(known) if known else None}
        return out

    def counts(self) -> dict:
        """Queue and per-labeler numbers for `tidal label status` and the researcher page."""
        with self._read() as db:
            tasks = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
            gold = db.execute("SELECT count(*) FROM tasks WHERE gold_ranking IS NOT NULL").fetchone()[0]
            done = db.execute("SELECT count(*) FROM tasks t WHERE (SELECT count(*) FROM labels l WHERE l.task_id=t.id "
                              "AND l.skip_reason IS NULL AND l.superseded_at IS NULL) >= t.want_labels").fetchone()[0]
            leased = db.execute("SELECT count(*) FROM assignments WHERE expires_at > ?", (time.time(),)).fetchone()[0]
            per = db.execute("SELECT l.name, l.is_admin, count(b.id), sum(b.skip_reason IS NOT NULL) FROM labelers l "
                             "LEFT JOIN labels b ON b.labeler_id = l.id AND b.superseded_at IS NULL "
                             "GROUP BY l.id ORDER BY l.name").fetchall()
        return {"tasks": tasks, "gold_tasks": gold, "complete": done, "open": tasks - done, "leased": leased,
                "labelers": [{"name": n, "admin": bool(a), "labels": c, "skips": int(s or 0)} for n, a, c, s in per]}

    def task_page(self, offset: int, limit: int) -> dict:
        """One page of the task list for the researcher: {total, tasks: [{id, prompt, k, want, gold,
        labels, skips, edits, leased}]} in id order, with the current labels' and skips' counts."""
        with self._read() as db:
            total = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
            rows = db.execute(
                "SELECT t.id, t.prompt, json_array_length(t.responses), t.want_labels, t.gold_ranking IS NOT NULL, "
                "sum(b.skip_reason IS NULL AND b.superseded_at IS NULL), sum(b.skip_reason IS NOT NULL AND b.superseded_at "
                "IS NULL), sum(b.superseded_at IS NOT NULL), (SELECT count(*) FROM assignments a WHERE a.task_id=t.id "
                "AND a.expires_at > ?) FROM tasks t LEFT JOIN labels b ON b.task_id = t.id GROUP BY t.id ORDER BY t.id "
                "LIMIT ? OFFSET ?", (time.time(), limit, offset)).fetchall()
        keys = ("id", "prompt", "k", "want", "gold", "labels", "skips", "edits", "leased")
        return {"total": total, "tasks": [dict(zip(keys, (r[0], json.loads(r[1]), r[2], r[3], bool(r[4]),
                                                          *(int(x or 0) for x in r[5:])))) for r in rows]}

    def integrity_check(self) -> str:
        with self._read() as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]


def _check_lease(db, labeler_id: int, task_id: int, now: float) -> None:
    """A new label is taken only for a task `next_task` leased to this labeler: a live lease, or
    an expired one while the task would still be handed to it now (nobody else took it over and
    it still wants labels). So nobody labels a task never shown to them, or one leased to
    someone else, and a task never gets more labels than it wants from a lapsed lease."""
    if db.execute("SELECT 1 FROM labels WHERE task_id=? AND labeler_id=? AND superseded_at IS NULL",
                  (task_id, labeler_id)).fetchone():
        raise Conflict(f"task {task_id} is already labeled by you (with another submission id); edit that label instead")
    lease = db.execute("SELECT expires_at FROM assignments WHERE task_id=? AND labeler_id=?", (task_id, labeler_id)).fetchone()
    if lease is None:
        raise Conflict(f"task {task_id} is not leased to you: label the tasks the page gives you (GET /api/next)")
    if lease[0] <= now and not db.execute(f"SELECT 1 FROM tasks t WHERE t.id=:task AND {_STILL_WANTED}",
                                          {"task": task_id, "me": labeler_id, "now": now}).fetchone():
        raise Conflict(f"your lease on task {task_id} ran out and the task went to another labeler; "
                       "this label was not stored (go on with the next task)")


def _supersede(db, labeler_id: int, task_id: int, replaces: int, now: float, edit_s: float) -> float:
    """Marks label `replaces` superseded by an edit; returns when its first version was sent."""
    row = db.execute("SELECT labeler_id, task_id, first_at, superseded_at FROM labels WHERE id=?", (replaces,)).fetchone()
    if row is None or row[0] != labeler_id or row[1] != task_id:
        raise FeedbackError(f"'replaces': label {replaces} is not your label of task {task_id}")
    if row[3] is not None:
        raise Conflict(f"label {replaces} was edited already; edit its latest version")
    if now > row[2] + edit_s:
        raise Conflict(f"label {replaces} can no longer be edited: this folder allows edits for {edit_s / 60:g} minutes "
                       "after a label is sent")
    db.execute("UPDATE labels SET superseded_at=? WHERE id=?", (now, replaces))
    return row[2]
