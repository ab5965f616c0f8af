"""`tidal label ...`: the labeling app's commands (commands/cli.py wires them lazily).

A user error (no store, a bad task row, an existing export file) is a FeedbackError: the
`tidal` command prints it as one line, exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tidal.feedback.store import FeedbackError, FeedbackStore, NewTask, TaskResponse, check_task


def read_tasks(path: str | Path) -> list[NewTask]:
    """Tasks from a JSON-lines file, one per row: {"prompt": str | messages, "responses": [str |
    {"text", "source"?, "version"?}, ...] (2..9), "gold_ranking"?: [rank of each response]}."""
    path = Path(path)
    tasks = []
    with path.open("rb") as f:
        for n, raw_line in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FeedbackError(f"{where}: not UTF-8 ({e.reason} at byte {e.start} of the line); save the file "
                                    f"as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FeedbackError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise FeedbackError(f"{where}: expected an object with 'prompt' and 'responses'")
            prompt = row.get("prompt", row.get("messages"))
            raw = row.get("responses")
            if not isinstance(raw, list):
                raise FeedbackError(f"{where}: field 'responses': expected a list of 2 to 9 strings or {{text, source, version}}")
            responses = []
            for i, r in enumerate(raw):
                if isinstance(r, str):
                    responses.append(TaskResponse(r))
                elif isinstance(r, dict) and isinstance(r.get("text"), str):
                    responses.append(TaskResponse(r["text"], str(r.get("source", "unknown")), str(r.get("version", ""))))
                else:
                    raise FeedbackError(f"{where}: field 'responses[{i}]': expected a string or {{text, source, version}}")
            task = NewTask(prompt, responses, row.get("gold_ranking"))
            check_task(task, where)
            tasks.append(task)
    return tasks


def add_tasks(folder: str, file: str, overlap: float | None, flags: str | None = None) -> int:
    try:
        tasks = read_tasks(file)
    except OSError as e:
        raise FeedbackError(f"{file}: cannot read it ({e.strerror}); give a JSON-lines file of tasks") from None
    store = FeedbackStore(folder, create=True)
    if flags is not None:
        store.set_flags(flags.split(";"))
    ids = store.add_tasks(tasks, overlap_fraction=overlap)
    print(f"added {len(ids)} tasks to {folder}" + (f" (ids {ids[0]}..{ids[-1]})" if ids else ""))
    return 0


def configure(folder: str, guidelines: str | None, likert: str | None, edit_minutes: float | None) -> int:
    """`tidal label set`: the page's guidelines, Likert mode and edit window."""
    text = None
    if guidelines is not None:
        try:
            text = Path(guidelines).read_text(encoding="utf-8")
        except OSError as e:
            raise FeedbackError(f"{guidelines}: cannot read it ({e.strerror}); give a Markdown or text file") from None
        except UnicodeDecodeError as e:
            raise FeedbackError(f"{guidelines}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    s = FeedbackStore(folder).configure(likert=likert, edit_s=None if edit_minutes is None else edit_minutes * 60.0,
                                        guidelines=text)
    print(f"{folder}: Likert scores {s.likert}; edits for {s.edit_s / 60:g} minutes after sending; "
          f"guidelines: {f'{len(s.guidelines)} characters' if s.guidelines else 'none'}")
    return 0


def add_labeler(folder: str, name: str, admin: bool) -> int:
    token = FeedbackStore(folder, create=True).add_labeler(name, admin=admin)
    print(f"{'admin' if admin else 'labeler'} {name}: token {token}")
    print("(shown once; only its hash is stored)", file=sys.stderr)
    return 0


def status(folder: str) -> int:
    from tidal.feedback import lineage, stats

    store = FeedbackStore(folder)
    s = stats.summary(store.labels(), store.tasks(), store.settings.flags, store.counts(), store.settings.min_reliability)
    c = s["counts"]
    print(f"{folder}: {c['tasks']} tasks ({c['gold_tasks']} gold), {c['complete']} complete, {c['open']} open, "
          f"{c['leased']} leased; {s['rates']['last_hour']} labels in the last hour")
    for lab in c["labelers"]:
        print(f"  {lab['name']}{' (admin)' if lab['admin'] else ''}: {lab['labels']} labels, {lab['skips']} skips")
    a, g = s["agreement"], s["gold"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"agreement on overlap tasks: {a['pairs']} pairs, pairwise {fmt(a['agreement'])}, tau {fmt(a['tau'])}")
    print(f"gold agreement: {g['labels']} labels, pairwise {fmt(g['agreement'])}, tau {fmt(g['tau'])}")
    for who, r in s["reliability"].items():
        graded = f"{r['gold_pairs']} gold pairs, agreement {fmt(r['agreement'])}" if r["gold_pairs"] else "no gold labels"
        print(f"reliability {who}: weight {r['weight']:.2f} ({graded}){' - left out of reward fitting' if r['dropped'] else ''}")
    for v in lineage.per_version(store):  # online RLHF: the reward-model versions the run published
        rate = "" if v["labels_per_min"] is None else f", {v['labels_per_min']:.1f} labels/min since the last"
        print(f"reward model v{v['version']}: fit on {v['labels']} labels ({v['new_labels']} new{rate}), "
              f"online accuracy {fmt(v['online_accuracy'])} on {v['heldout']} held-out labels"
              + ("" if v["policy_step"] is None else f", published at rl step {v['policy_step']}"))
    print("likert: " + " ".join(f"{k}:{v}" for k, v in s["distributions"]["likert"].items()))
    print("flags: " + ", ".join(f"{k}: {v}" for k, v in s["distributions"]["flags"].items()))
    return 0


def export(folder: str, out: str, fmt: str, include_gold: bool) -> int:
    from tidal.feedback.export import write_export

    try:
        n = write_export(FeedbackStore(folder), out, fmt, include_gold)
    except OSError as e:  # an existing file, a folder that cannot be written
        raise FeedbackError(str(e) if e.strerror is None else f"{out}: {e.strerror}; pass a new file in a writable "
                            "folder") from None
    print(f"{out}: {n} {fmt} rows")
    return 0


def serve(folder: str, host: str = "127.0.0.1", port: int = 8080) -> int:
    from tidal.common.web import WebServer, is_loopback
    from tidal.feedback.app import build_app

    store = FeedbackStore(folder)
    if store.labeler_count() == 0 and not is_loopback(host):
        raise FeedbackError(f"--host {host} is not a loopback address and {folder} has no labeler tokens: add one with "
                     f"`tidal label add-labeler {folder} NAME`, or bind 127.0.0.1")
    try:
        server = WebServer(build_app(store), host, port, name="label-server")
    except OSError as e:
        raise FeedbackError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    hint = "" if store.labeler_count() else f" (no labelers yet: `tidal label add-labeler {folder} NAME`)"
    print(f"tidal label server on {server.url} for {folder}{hint}", flush=True)
    server.run()
    return 0
