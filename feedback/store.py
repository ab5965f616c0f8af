"""The feedback store: one SQLite file (`DIR/feedback.sqlite`) per feedback folder.

Guarantees: WAL journal with synchronous=FULL, so a label the server acknowledged survives a
`kill -9` of the server; every submission is one `BEGIN IMMEDIATE` transaction; a submission
carries a client-made id that is UNIQUE, so a retry or a double click never counts twice; a
labeler labels a task at most once (UNIQUE(task_id, labeler_id)); tokens and session ids are
stored as SHA-256 hashes only (they are 192-bit random strings, so a plain hash is enough).

Tables: meta (schema_version, settings), labelers, sessions, tasks, assignments (leases),
labels. Tasks hold their responses as JSON [{text, source, version}]; labels hold the ranking,
Likert scores and flags in the task's stored response order (the page shuffles for display).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tidal.common.data import Prompt
from tidal.common.errors import UserError

SCHEMA_VERSION = 1
DB_NAME = "feedback.sqlite"
DEFAULT_FLAGS = ("fails to follow the instruction", "made-up facts", "inappropriate for an assistant",
                 "harmful or toxic", "sexual or violent content")
MIN_K, MAX_K = 2, 9

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labelers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY, labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    csrf TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, responses TEXT NOT NULL,
    want_labels INTEGER NOT NULL, gold_ranking TEXT, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    task_id INTEGER NOT NULL REFERENCES tasks(id), labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    expires_at REAL NOT NULL, PRIMARY KEY (task_id, labeler_id));
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, submission_id TEXT NOT NULL UNIQUE,
    task_id INTEGER NOT NULL REFERENCES tasks(id), labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    skip_reason TEXT, ranking TEXT, likert TEXT, flags TEXT, comment TEXT, created_at REAL NOT NULL,
    UNIQUE (task_id, labeler_id));
CREATE INDEX IF NOT EXISTS labels_task ON labels(task_id);
CREATE INDEX IF NOT EXISTS assignments_labeler ON assignments(labeler_id);
"""


class FeedbackError(UserError):
    """A request the store refuses; the message says what to fix (the web app answers 400/409)."""

    kind = "label error"


@dataclass(frozen=True)
class TaskResponse:
    text: str
    source: str = "unknown"     # which model (or "reference", "human") wrote it
    version: str = ""           # weight version / checkpoint of that model


@dataclass(frozen=True)
class NewTask:
    prompt: Prompt
    responses: list[TaskResponse]
    gold_ranking: list[int] | None = None  # a known answer: rank of responses[i], 0 = best


@dataclass(frozen=True)
class Settings:
    flags: tuple[str, ...] = DEFAULT_FLAGS
    overlap_fraction: float = 0.1   # share of new tasks that go to `overlap_labels` labelers
    overlap_labels: int = 2
    lease_s: float = 1800.0          # how long a shown task stays reserved for its labeler
    session_s: float = 7 * 86400.0


@dataclass(frozen=True)
class Label:
    id: int
    submission_id: str
    task_id: int
    labeler: str
    skip_reason: str | None
    ranking: list[int] | None       # rank of stored response i, 0 = best (None for a skip)
    likert: list[int | None] | None
    flags: list[list[str]] | None
    comment: str | None
    created_at: float


@dataclass(frozen=True)
class Task:
    id: int
    prompt: Prompt
    responses: list[TaskResponse]
    want_labels: int
    gold_ranking: list[int] | None = None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_task(task: NewTask, where: str) -> None:
    """FeedbackError naming `where` (e.g. FILE:ROW) when a task cannot be shown."""
    p = task.prompt
    if not (isinstance(p, str) and p.strip()) and not (isinstance(p, list) and p):
        raise FeedbackError(f"{where}: field 'prompt': expected a non-empty string or a list of messages")
    k = len(task.responses)
    if not MIN_K <= k <= MAX_K:
        raise FeedbackError(f"{where}: field 'responses': {k} responses; a task needs {MIN_K} to {MAX_K}")
    for i, r in enumerate(task.responses):
        if not isinstance(r.text, str):
            raise FeedbackError(f"{where}: field 'responses[{i}]': expected a string")
    if task.gold_ranking is not None and sorted(task.gold_ranking) != list(range(k)):
        raise FeedbackError(f"{where}: field 'gold_ranking': must be a permutation of 0..{k - 1} (rank of each response, 0 = best)")


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
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                s = settings or Settings()
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT INTO meta VALUES ('settings', ?)", (json.dumps(s.__dict__),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise FeedbackError(f"{self.path}: schema version {row[0]}, this tidal reads {SCHEMA_VERSION}")
            elif settings is not None:
                db.execute("UPDATE meta SET value=? WHERE key='settings'", (json.dumps(settings.__dict__),))

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _tx(self):
        return _Transaction(self._connect())

    @property
    def settings(self) -> Settings:
        with closing(self._connect()) as db:
            raw = json.loads(db.execute("SELECT value FROM meta WHERE key='settings'").fetchone()[0])
        raw["flags"] = tuple(raw["flags"])
        return Settings(**raw)

    def set_flags(self, flags: list[str]) -> None:
        """Replaces the flag names the page offers; refused once labels exist (their flags
        would no longer match the list the stats count)."""
        flags = [f.strip() for f in flags if f.strip()]
        if not flags or len(set(flags)) != len(flags):
            raise FeedbackError(f"flags {flags} must be a non-empty list of distinct names")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM labels LIMIT 1").fetchone() and tuple(flags) != self.settings.flags:
                raise FeedbackError(f"{self.path} already holds labels; flags can only be set before labeling starts")
            raw = json.loads(db.execute("SELECT value FROM meta WHERE key='settings'").fetchone()[0])
            db.execute("UPDATE meta SET value=? WHERE key='settings'", (json.dumps({**raw, "flags": flags}),))

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
        with closing(self._connect()) as db:
            row = db.execute("SELECT id FROM labelers WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def labeler_count(self) -> int:
        with closing(self._connect()) as db:
            return db.execute("SELECT count(*) FROM labelers").fetchone()[0]

    def login(self, token: str) -> tuple[str, str] | None:
        """(session id, csrf token) for a valid labeler token, else None."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM labelers WHERE token_hash=?", (_hash(token),)).fetchone()
            if row is None:
                return None
            sid, csrf = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (time.time(),))
            db.execute("INSERT INTO sessions VALUES (?,?,?,?)", (_hash(sid), row[0], csrf, time.time() + self.settings.session_s))
        return sid, csrf

    def session(self, sid: str) -> dict | None:
        """{labeler_id, name, is_admin, csrf} of a live session, else None."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT l.id, l.name, l.is_admin, s.csrf FROM sessions s JOIN labelers l ON l.id = s.labeler_id "
                             "WHERE s.id_hash=? AND s.expires_at > ?", (_hash(sid), time.time())).fetchone()
        return None if row is None else {"labeler_id": row[0], "name": row[1], "is_admin": bool(row[2]), "csrf": row[3]}

    def logout(self, sid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE id_hash=?", (_hash(sid),))

    # ------------------------------------------------------------------ tasks

    def add_tasks(self, tasks: list[NewTask], overlap_fraction: float | None = None, seed: int | None = None) -> list[int]:
        """Adds tasks in one transaction; returns their ids. A share `overlap_fraction` (default:
        the store's setting) is marked for `overlap_labels` labelers, the rest for one."""
        s = self.settings
        frac = s.overlap_fraction if overlap_fraction is None else overlap_fraction
        if not 0.0 <= frac <= 1.0:
            raise FeedbackError(f"overlap fraction {frac} must be between 0 and 1")
        for i, t in enumerate(tasks):
            check_task(t, f"task {i}")
        rng = random.Random(seed)
        ids = []
        with self._tx() as db:
            for t in tasks:
                want = s.overlap_labels if rng.random() < frac else 1
                cur = db.execute("INSERT INTO tasks (prompt, responses, want_labels, gold_ranking, created_at) VALUES (?,?,?,?,?)",
                                 (json.dumps(t.prompt), json.dumps([r.__dict__ for r in t.responses]), want,
                                  None if t.gold_ranking is None else json.dumps(list(t.gold_ranking)), time.time()))
                ids.append(cur.lastrowid)
        return ids

    def tasks(self) -> dict[int, Task]:
        return self.tasks_by_id(None)

    def tasks_by_id(self, ids: list[int] | None) -> dict[int, Task]:
        """{id: Task} of the given ids (all tasks for None)."""
        sql = "SELECT id, prompt, responses, want_labels, gold_ranking FROM tasks"
        if ids is not None:
            sql += f" WHERE id IN ({','.join('?' * len(ids))})"
        with closing(self._connect()) as db:
            rows = db.execute(sql + " ORDER BY id", list(ids or [])).fetchall()
        return {r[0]: Task(r[0], json.loads(r[1]), [TaskResponse(**x) for x in json.loads(r[2])], r[3],
                           None if r[4] is None else json.loads(r[4])) for r in rows}

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
                row = db.execute(
                    "SELECT t.id FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.task_id=t.id AND l.labeler_id=?) "
                    "AND (t.gold_ranking IS NOT NULL OR "
                    "  (SELECT count(*) FROM labels l WHERE l.task_id=t.id AND l.skip_reason IS NULL) + "
                    "  (SELECT count(*) FROM assignments a WHERE a.task_id=t.id AND a.expires_at > ? AND a.labeler_id != ?) "
                    "  < t.want_labels) "
                    "ORDER BY (t.gold_ranking IS NULL), t.id LIMIT 1", (labeler_id, now, labeler_id)).fetchone()
                if row is None:
                    return None
                db.execute("INSERT OR REPLACE INTO assignments VALUES (?,?,?)", (row[0], labeler_id, now + self.settings.lease_s))
            t = db.execute("SELECT id, prompt, responses, want_labels, gold_ranking FROM tasks WHERE id=?", (row[0],)).fetchone()
        return Task(t[0], json.loads(t[1]), [TaskResponse(**x) for x in json.loads(t[2])], t[3],
                    None if t[4] is None else json.loads(t[4]))

    # ------------------------------------------------------------------ labels

    def submit(self, labeler_id: int, submission_id: str, task_id: int, ranking: list[int] | None = None,
               likert: list[int | None] | None = None, flags: list[list[str]] | None = None,
               comment: str | None = None, skip_reason: str | None = None) -> tuple[int, bool]:
        """Stores one label (or a skip) in one transaction; (label id, True if it was new). The
        same submission id again returns the first label and stores nothing."""
        if not (isinstance(submission_id, str) and 8 <= len(submission_id) <= 100):
            raise FeedbackError("'submission_id' must be a string of 8 to 100 characters made by the client")
        with self._tx() as db:
            old = db.execute("SELECT id, labeler_id, task_id FROM labels WHERE submission_id=?", (submission_id,)).fetchone()
            if old is not None:
                if (old[1], old[2]) != (labeler_id, task_id):
                    raise FeedbackError(f"submission id {submission_id!r} was already used for another task")
                return old[0], False
            row = db.execute("SELECT responses FROM tasks WHERE id=?", (task_id,)).fetchone()
            if row is None:
                raise FeedbackError(f"no task {task_id}")
            k = len(json.loads(row[0]))
            if db.execute("SELECT 1 FROM labels WHERE task_id=? AND labeler_id=?", (task_id, labeler_id)).fetchone():
                raise FeedbackError(f"task {task_id} is already labeled by you (with another submission id)")
            if skip_reason is not None:
                if not skip_reason.strip():
                    raise FeedbackError("'skip_reason' must say why the task is skipped")
                ranking = likert = flags = None
            else:
                _check_label(k, ranking, likert, flags, self.settings.flags)
            cur = db.execute(
                "INSERT INTO labels (submission_id, task_id, labeler_id, skip_reason, ranking, likert, flags, comment, created_at) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (submission_id, task_id, labeler_id, skip_reason, _dump(ranking), _dump(likert), _dump(flags),
                 (comment or None), time.time()))
            db.execute("DELETE FROM assignments WHERE task_id=? AND labeler_id=?", (task_id, labeler_id))
        return cur.lastrowid, True

    def labels(self) -> list[Label]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT b.id, b.submission_id, b.task_id, l.name, b.skip_reason, b.ranking, b.likert, b.flags, "
                              "b.comment, b.created_at FROM labels b JOIN labelers l ON l.id = b.labeler_id ORDER BY b.id").fetchall()
        return [Label(r[0], r[1], r[2], r[3], r[4], _load(r[5]), _load(r[6]), _load(r[7]), r[8], r[9]) for r in rows]

    def progress(self, labeler_id: int) -> dict:
        """{done: labels by this labeler, open: tasks still short of labels}."""
        with closing(self._connect()) as db:
            done = db.execute("SELECT count(*) FROM labels WHERE labeler_id=?", (labeler_id,)).fetchone()[0]
            open_ = db.execute("SELECT count(*) FROM tasks t WHERE (SELECT count(*) FROM labels l WHERE l.task_id=t.id "
                               "AND l.skip_reason IS NULL) < t.want_labels").fetchone()[0]
        return {"done": done, "open": open_}

    def counts(self) -> dict:
        """Queue and per-labeler numbers for `tidal label status` and the researcher page."""
        with closing(self._connect()) as db:
            tasks = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
            gold = db.execute("SELECT count(*) FROM tasks WHERE gold_ranking IS NOT NULL").fetchone()[0]
            done = db.execute("SELECT count(*) FROM tasks t WHERE (SELECT count(*) FROM labels l WHERE l.task_id=t.id "
                              "AND l.skip_reason IS NULL) >= t.want_labels").fetchone()[0]
            leased = db.execute("SELECT count(*) FROM assignments WHERE expires_at > ?", (time.time(),)).fetchone()[0]
            per = db.execute("SELECT l.name, l.is_admin, count(b.id), sum(b.skip_reason IS NOT NULL) FROM labelers l "
                             "LEFT JOIN labels b ON b.labeler_id = l.id GROUP BY l.id ORDER BY l.name").fetchall()
        return {"tasks": tasks, "gold_tasks": gold, "complete": done, "open": tasks - done, "leased": leased,
                "labelers": [{"name": n, "admin": bool(a), "labels": c, "skips": int(s or 0)} for n, a, c, s in per]}

    def integrity_check(self) -> str:
        with closing(self._connect()) as db:
            return db.execute("PRAGMA integrity_check").fetchone()[0]


def _check_label(k: int, ranking, likert, flags, allowed_flags: tuple[str, ...]) -> None:
    if not isinstance(ranking, list) or sorted(r for r in ranking if isinstance(r, int)) != list(range(k)):
        raise FeedbackError(f"'ranking' must give each of the {k} responses a distinct rank 0..{k - 1} (0 = best)")
    if likert is not None:
        if not isinstance(likert, list) or len(likert) != k or \
                not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 7) for v in likert):
            raise FeedbackError(f"'likert' must be a list of {k} scores 1..7 (or nulls)")
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != k or not all(isinstance(f, list) for f in flags):
            raise FeedbackError(f"'flags' must be a list of {k} lists of flag names")
        unknown = {x for f in flags for x in f} - set(allowed_flags)
        if unknown:
            raise FeedbackError(f"unknown flags {sorted(unknown)}; this store's flags are {list(allowed_flags)}")


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value)


def _load(value: str | None):
    return None if value is None else json.loads(value)


class _Transaction:
    """`with store._tx() as db:` = BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error), then close."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.db.close()
