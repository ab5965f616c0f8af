"""The labeling app's HTTP edge cases on a real `tidal label serve` (and, for the full disk, a
real uvicorn server in this process): the shared corpus of bodies (tests/http_corpus.py), bad
fields, paths and methods, all JSON 4xx; labels for tasks never shown or leased to someone else
refused (409); a full disk answers 507."""

import json
import sqlite3

import pytest
import requests

from feedback_support import CappedStore, Labeler, label_server
from http_corpus import BODIES, BODY_IDS, check_json_error
from tidal.common.web import WebServer
from tidal.feedback.app import build_app
from tidal.feedback.store import FeedbackStore, NewTask, Settings, TaskResponse


def _task(i: int) -> NewTask:
    return NewTask(f"prompt {i}", [TaskResponse(f"response {i}.{j}") for j in range(3)])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http") / "fb"
    store = FeedbackStore(folder, create=True, settings=Settings(overlap_fraction=0.0))
    store.add_tasks([_task(i) for i in range(21)])
    tokens = {"ann": store.add_labeler("ann"), "bob": store.add_labeler("bob"), "boss": store.add_labeler("boss", admin=True)}
    with label_server(folder) as (url, _):
        yield url, tokens, store


def _post(lab: Labeler, body: bytes) -> requests.Response:
    return lab.http.post(lab.url + "/api/submit", data=body, timeout=30,
                         headers={"X-CSRF-Token": lab.csrf, "Content-Type": "application/json"})


@pytest.mark.parametrize("body,status,message", [case[1:] for case in BODIES], ids=BODY_IDS)
def test_corpus_bodies_are_json_400s(served, body, status, message):
    url, tokens, store = served
    check_json_error(_post(Labeler(url, tokens["bob"]), body), status, message)


@pytest.mark.parametrize("method,path,status,message", [
    ("GET", "/api/submit", 405, "GET is not allowed on /api/submit"),
    ("POST", "/api/next", 405, "POST is not allowed"),
    ("GET", "/api/nope", 404, "no such endpoint /api/nope"),
    ("GET", "/static/nope.js", 404, "no such endpoint"),
    ("GET", "/api/labels/abc", 400, "'abc' is not an id"),
    ("GET", "/api/labels/99999", 404, "no such label of yours"),
    ("GET", "/api/tasks?offset=-1", 400, "offset='-1'"),
    ("GET", "/api/tasks?limit=0", 400, "from 1 to 500"),
    ("GET", "/api/tasks/x1", 400, "not an id"),
    ("GET", "/api/tasks/99999", 404, "no task 99999"),
])
def test_paths_methods_and_parameters_are_json(served, method, path, status, message):
    url, tokens, _ = served
    boss = Labeler(url, tokens["boss"])
    r = boss.http.request(method, url + path, headers={"X-CSRF-Token": boss.csrf}, timeout=10)
    check_json_error(r, status, message)


def test_bad_fields_are_400_and_the_stores_state_409(served):
    url, tokens, store = served
    ann = Labeler(url, tokens["ann"])
    task = ann.next()
    other = next(t for t in store.tasks() if t != task["id"])
    good = {"submission_id": "ann-good-0001", "task_id": task["id"], "order": [0, 1, 2], "likert": [4, 5, 6],
            "flags": [[], [], []], "seconds": 4.5}
    for change, status, message in [
        ({"task_id": True}, 400, "'task_id' must be a whole number"),
        ({"order": [True, False, 2]}, 400, "'order'"),
        ({"tie": [True, False, False]}, 400, "'tie'"),
        ({"likert": [4, float("nan"), 4]}, 400, "'likert'"),
        ({"flags": [[1], [], []]}, 400, "'flags'"),
        ({"seconds": -1}, 400, "'seconds'"),
        ({"replaces": "abc"}, 400, "'replaces'"),
        ({"replaces": 424242}, 400, "not your label"),
        ({"submission_id": "bad\x00id-0001"}, 400, "'submission_id'"),
        ({"task_id": 99999}, 400, "no task 99999"),
        ({"task_id": other}, 409, f"task {other} is not leased to you"),
    ]:
        check_json_error(_post(ann, json.dumps({**good, **change}).encode()), status, message)  # NaN too
    ok = ann.submit({**good, "comment": "fine \udcff"})  # a lone surrogate is cleaned, not a 500
    assert ok.status_code == 200, ok.text
    assert store.label(ok.json()["label_id"]).comment == "fine ?"
    again = ann.submit({**good, "submission_id": "ann-again-001"})
    check_json_error(again, 409, "already labeled by you")


def test_blind_and_stolen_labels_are_refused(served):
    url, tokens, store = served
    before = len(store.labels())
    bob = Labeler(url, tokens["bob"])
    held = bob.next()["id"]  # bob's lease
    intruder = Labeler(url, tokens["ann"])
    statuses = [intruder.submit({"submission_id": f"blind-label-{t:04d}", "task_id": t, "order": [0, 1, 2],
                                 "likert": [4, 4, 4]}).status_code for t in store.tasks()]
    assert statuses == [409] * 21  # none of them leased to ann: never shown to her, bob's, or labeled by her already
    r = bob.submit({"submission_id": "bob-label-0001", "task_id": held, "order": [2, 1, 0], "likert": [1, 2, 3]})
    assert r.status_code == 200 and len([lab for lab in store.labels() if lab.task_id == held]) == 1
    assert len(store.labels()) == before + 1


def test_a_full_disk_answers_507(tmp_path):
    store = CappedStore(tmp_path / "fb", create=True)
    (task,) = store.add_tasks([_task(0)])
    token = store.add_labeler("ann")
    server = WebServer(build_app(store)).start()
    try:
        ann = Labeler(server.url, token)
        assert ann.next()["id"] == task
        store.pages = sqlite3.connect(store.path).execute("PRAGMA page_count").fetchone()[0]
        r = ann.submit({"submission_id": "full-disk-001", "task_id": task, "order": [0, 1, 2], "likert": [4, 4, 4],
                        "comment": "x" * 4900})  # more than a page: the file must grow
        check_json_error(r, 507, "the disk is full")
        store.pages = 0  # space again: the same submission goes through
        assert ann.submit({"submission_id": "full-disk-001", "task_id": task, "order": [0, 1, 2],
                           "likert": [4, 4, 4]}).status_code == 200
    finally:
        server.close()


def test_an_uncaught_error_is_a_json_500_without_traceback(tmp_path):
    class Broken(FeedbackStore):  # a fault where no handler expects one
        def progress(self, *args, **kwargs):
            raise RuntimeError("a bug, with a secret path /srv/x in its message")

    store = Broken(tmp_path / "fb", create=True)
    token = store.add_labeler("ann")
    server = WebServer(build_app(store)).start()
    try:
        r = Labeler(server.url, token).http.get(server.url + "/api/next", timeout=10)
        check_json_error(r, 500, "internal error (RuntimeError)")
        assert "/srv/x" not in r.text
    finally:
        server.close()
