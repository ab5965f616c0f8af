"""The feedback store's SQLite file: its tables, the migration of older files, connections and
transactions, and SQLite's operational errors (disk full, locked, I/O) turned into StorageError.

Tables: meta (schema_version, settings), labelers, sessions, tasks (with `meta`: why a task was
made, e.g. an online query's selector and score), assignments (leases), labels, reward_versions
(online RLHF: each reward-model version and the label ids it was fit on and measured on). A
label is never overwritten: an edit adds a new row that `replaces` the old one and
stamps the old one `superseded_at`; at most one version per (task, labeler) is current.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tidal.feedback.model import FeedbackError, StorageError

SCHEMA_VERSION = 3
DB_NAME = "feedback.sqlite"

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labelers (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY, labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    csrf TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, responses TEXT NOT NULL,
    want_labels INTEGER NOT NULL, gold_ranking TEXT, created_at REAL NOT NULL, meta TEXT);
CREATE TABLE IF NOT EXISTS assignments (
    task_id INTEGER NOT NULL REFERENCES tasks(id), labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    expires_at REAL NOT NULL, PRIMARY KEY (task_id, labeler_id));
CREATE TABLE IF NOT EXISTS reward_versions (
    version INTEGER PRIMARY KEY, path TEXT NOT NULL, created_at REAL NOT NULL,
    labels TEXT NOT NULL, heldout TEXT NOT NULL, meta TEXT NOT NULL);
"""
_LABELS = """
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, submission_id TEXT NOT NULL UNIQUE,
    task_id INTEGER NOT NULL REFERENCES tasks(id), labeler_id INTEGER NOT NULL REFERENCES labelers(id),
    skip_reason TEXT, ranking TEXT, likert TEXT, flags TEXT, comment TEXT, created_at REAL NOT NULL,
    first_at REAL NOT NULL, replaces INTEGER REFERENCES labels(id), superseded_at REAL,
    session TEXT, seconds REAL)
"""
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS labels_current ON labels(task_id, labeler_id) WHERE superseded_at IS NULL;
CREATE INDEX IF NOT EXISTS labels_task ON labels(task_id);
CREATE INDEX IF NOT EXISTS labels_session ON labels(session);
CREATE INDEX IF NOT EXISTS assignments_labeler ON assignments(labeler_id)
"""
# version 1 -> 2: labels gain first_at, replaces, superseded_at, session and seconds, and
# UNIQUE(task_id, labeler_id) becomes a unique index over current versions only. SQLite cannot
# drop a table constraint, so the table is rebuilt (in the caller's transaction).
_FROM_V1 = ["ALTER TABLE labels RENAME TO labels_v1", _LABELS,
            "INSERT INTO labels (id, submission_id, task_id, labeler_id, skip_reason, ranking, likert, flags, comment, "
            "created_at, first_at) SELECT id, submission_id, task_id, labeler_id, skip_reason, ranking, likert, flags, "
            "comment, created_at, created_at FROM labels_v1",
            "DROP TABLE labels_v1"]
# version 2 -> 3: tasks gain `meta` (reward_versions is created by _TABLES like any missing table).
_FROM_V2 = ["ALTER TABLE tasks ADD COLUMN meta TEXT"]


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """SQLite's operational errors as StorageError with the web app's status: a full disk is 507
    (Insufficient Storage), anything else that keeps the file from being used 503."""
    try:
        yield
    except sqlite3.OperationalError as e:
        if "full" in str(e):
            raise StorageError(f"{path}: the disk is full ({e}); nothing was stored. Free space on the server, "
                               "then send it again", 507) from e
        raise StorageError(f"{path}: the label store cannot be used right now ({e}); nothing was stored. "
                           "Try again; if it lasts, check the server's disk and the file's permissions", 503) from e


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=30000")
    return db


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for reads, closed afterwards."""
    with storage_errors(path):
        db = connect(path)
        try:
            yield db
        finally:
            db.close()


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an error, then close."""
    with storage_errors(path):
        db = connect(path)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()


def create_or_migrate(path: Path, settings_json: str | None, default_settings_json: str) -> None:
    """Creates the tables of a new store, or brings an older store to SCHEMA_VERSION; writes
    `settings_json` when given (a new store without it gets `default_settings_json`)."""
    with storage_errors(path):
        db = connect(path)
        try:
            db.execute("PRAGMA journal_mode=WAL")
        finally:
            db.close()
    with transaction(path) as db:
        for statement in _statements(_TABLES):
            db.execute(statement)
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            for statement in _statements(_LABELS + ";" + _INDEXES):
                db.execute(statement)
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT INTO meta VALUES ('settings', ?)", (settings_json or default_settings_json,))
            return
        version = int(row[0])
        if version not in (1, 2, SCHEMA_VERSION):
            raise FeedbackError(f"{path}: schema version {row[0]}, this tidal reads {SCHEMA_VERSION} (and 1, 2); "
                                "use the tidal that wrote it")
        if version < SCHEMA_VERSION:
            steps = (_FROM_V1 + _statements(_INDEXES) if version == 1 else []) + _FROM_V2
            for statement in steps:
                db.execute(statement)
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
        if settings_json is not None:
            db.execute("UPDATE meta SET value=? WHERE key='settings'", (settings_json,))
