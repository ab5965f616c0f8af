"""What the feedback store holds (tasks, labels, settings) and the rules a task and a label must
meet before it is stored. The rules for rankings and their responses are tidal.common.data's,
the ones the rm stage reads its files with, so the store never accepts what training refuses."""

from __future__ import annotations

from dataclasses import dataclass

from tidal.common.data import DataError, Prompt, ranking_problem, validate_row
from tidal.common.errors import UserError

DEFAULT_FLAGS = ("fails to follow the instruction", "made-up facts", "inappropriate for an assistant",
                 "harmful or toxic", "sexual or violent content")
MIN_K, MAX_K = 2, 9
LIKERT_MODES = ("required", "optional", "off")
MAX_GUIDELINES_CHARS = 100_000
TASK_HINT = ("Each task needs 'prompt' (a string or a list of {role, content} messages) and 'responses' (2 to 9 "
             "different strings or {text, source, version}); 'gold_ranking' is optional.")


class FeedbackError(UserError):
    """A request the store refuses; the message says what to fix. `status` is the web app's answer."""

    kind = "label error"
    status = 400


class Conflict(FeedbackError):
    """Refused because of the store's state (already labeled, lease lost, edit window over): 409."""

    status = 409


class StorageError(FeedbackError):
    """SQLite could not read or write the store (disk full: 507; locked, I/O, read-only: 503)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


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
    meta: dict | None = None  # why the task was made (online queries: selector, score, steps), never shown to labelers


@dataclass(frozen=True)
class Settings:
    flags: tuple[str, ...] = DEFAULT_FLAGS
    overlap_fraction: float = 0.1   # share of new tasks that go to `overlap_labels` labelers
    overlap_labels: int = 2
    lease_s: float = 1800.0          # how long a shown task stays reserved for its labeler
    session_s: float = 7 * 86400.0
    likert: str = "required"         # the 1-7 scores: required, optional or off (LIKERT_MODES)
    edit_s: float = 600.0            # a label can be edited this long after it was first sent (0: never)
    guidelines: str = ""             # the researcher's instructions, a small Markdown subset, shown on the page
    min_reliability: float = 0.0     # labelers whose gold-graded weight is below this are left out of reward fitting


@dataclass(frozen=True)
class Label:
    id: int
    submission_id: str
    task_id: int
    labeler: str
    skip_reason: str | None
    ranking: list[int] | None       # rank of stored response i, 0 = best, ties share a rank (None for a skip)
    likert: list[int | None] | None
    flags: list[list[str]] | None
    comment: str | None
    created_at: float
    first_at: float | None = None          # when the first version of this label was sent (edit window)
    replaces: int | None = None            # the label id this one is an edit of
    superseded_at: float | None = None     # set when an edit replaced this version (kept as history)
    seconds: float | None = None           # time the labeler spent on the task, measured by the page


@dataclass(frozen=True)
class Task:
    id: int
    prompt: Prompt
    responses: list[TaskResponse]
    want_labels: int
    gold_ranking: list[int] | None = None
    meta: dict | None = None
    created_at: float = 0.0


def check_task(task: NewTask, where: str) -> None:
    """FeedbackError naming `where` (e.g. FILE:ROW) when a task cannot be shown, or when a label
    of it could not be trained on: any ranking of its responses must make a valid rankings row."""
    k = len(task.responses)
    if not MIN_K <= k <= MAX_K:
        raise FeedbackError(f"{where}: field 'responses': {k} responses; a task needs {MIN_K} to {MAX_K}")
    row = {"prompt": task.prompt, "responses": [r.text for r in task.responses], "ranking": list(range(k))}
    try:
        validate_row(row, "rankings", where, hint=TASK_HINT)
    except DataError as e:
        raise FeedbackError(str(e)) from None
    if task.gold_ranking is not None:
        problem = ranking_problem(task.gold_ranking, k)
        if problem is not None:
            raise FeedbackError(f"{where}: field 'gold_ranking': {problem}. {TASK_HINT}")


def distinct(task: NewTask) -> NewTask:
    """The task with every response whose text (stripped) repeats an earlier one left out: what
    sampled tasks go through, since a model may well say the same thing twice."""
    seen, kept = set(), []
    for r in task.responses:
        if r.text.strip() not in seen:
            seen.add(r.text.strip())
            kept.append(r)
    return NewTask(task.prompt, kept, None if task.gold_ranking is None or len(kept) < len(task.responses)
                   else task.gold_ranking, task.meta)


def check_label(k: int, ranking, likert, flags, settings: Settings) -> None:
    """A label of a task with k responses, in stored order; FeedbackError says what is wrong.
    (Whether people must give every score, likert: required, is the page's rule: tidal.feedback.page;
    a simulated labeler stores rankings alone.)"""
    problem = ranking_problem(ranking, k)
    if problem is not None:
        raise FeedbackError(f"'ranking': {problem} (0 = best)")
    if likert is not None:
        if settings.likert == "off":
            raise FeedbackError("'likert': this feedback folder collects no scores (likert: off); send none")
        if not isinstance(likert, list) or len(likert) != k or \
                not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 7) for v in likert):
            raise FeedbackError(f"'likert' must be a list of {k} scores 1..7 (or nulls)")
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != k or \
                not all(isinstance(f, list) and all(isinstance(x, str) for x in f) for f in flags):
            raise FeedbackError(f"'flags' must be a list of {k} lists of flag names")
        unknown = {x for f in flags for x in f} - set(settings.flags)
        if unknown:
            raise FeedbackError(f"unknown flags {sorted(unknown)}; this store's flags are {list(settings.flags)}")


def check_settings(s: Settings) -> None:
    if s.likert not in LIKERT_MODES:
        raise FeedbackError(f"likert {s.likert!r}: choose one of {', '.join(LIKERT_MODES)}")
    if not s.edit_s >= 0:
        raise FeedbackError(f"edit window of {s.edit_s / 60:g} minutes: use 0 (no edits) or more")
    if not 0.0 <= s.min_reliability <= 1.0:
        raise FeedbackError(f"min_reliability {s.min_reliability} must be between 0 and 1")
    if len(s.guidelines) > MAX_GUIDELINES_CHARS:
        raise FeedbackError(f"guidelines of {len(s.guidelines)} characters: keep them under {MAX_GUIDELINES_CHARS}")
