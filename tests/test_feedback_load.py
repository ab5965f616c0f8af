"""Load and faults on a real `tidal label serve` subprocess over loopback HTTP: 20 concurrent
labelers x 50 submissions with retries of the same submission id leave exactly 1,000 labels;
`kill -9` of the server mid-burst loses no acknowledged label and leaves a sound database."""

import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from feedback_support import Labeler, label_server, start_server
from tidal.feedback.store import FeedbackStore, NewTask, TaskResponse

LABELERS, PER_LABELER = 20, 50


def make_store(folder, n_tasks: int) -> tuple[FeedbackStore, list[str]]:
    store = FeedbackStore(folder, create=True)
    store.add_tasks([NewTask(f"prompt {i}", [TaskResponse(f"r{i}.{j}", "m", "1") for j in range(3)]) for i in range(n_tasks)],
                    overlap_fraction=0.0)
    return store, [store.add_labeler(f"lab{i:02d}") for i in range(LABELERS)]


def label_body(task: dict, rng: random.Random) -> dict:
    order = [r["slot"] for r in task["responses"]]
    rng.shuffle(order)
    return {"submission_id": uuid.uuid4().hex, "task_id": task["id"], "order": order,
            "likert": [rng.randint(1, 7) for _ in order], "flags": [[] for _ in order]}


def test_concurrent_labelers_with_retries_store_exactly_1000(tmp_path):
    store, tokens = make_store(tmp_path / "fb", LABELERS * PER_LABELER)
    with label_server(tmp_path / "fb") as (url, _):
        labelers = [Labeler(url, t) for t in tokens]
        assert all(lab.login_status == 303 for lab in labelers)

        def work(i: int) -> tuple[int, int]:
            lab, rng, new, dup = labelers[i], random.Random(i), 0, 0
            for _ in range(PER_LABELER):
                body = label_body(lab.next(), rng)
                for _attempt in range(1 + (rng.random() < 0.4) + (rng.random() < 0.1)):  # retries, same id
                    r = lab.submit(body)
                    assert r.status_code == 200, r.text
                    new, dup = new + (not r.json()["duplicate"]), dup + r.json()["duplicate"]
            return new, dup

        with ThreadPoolExecutor(LABELERS) as pool:
            results = list(pool.map(work, range(LABELERS)))
    labels = store.labels()
    assert len(labels) == LABELERS * PER_LABELER == sum(n for n, _ in results)
    assert sum(d for _, d in results) > 100  # the retries really happened and were recognised
    assert len({lab.task_id for lab in labels}) == len(labels)  # leases kept labelers apart
    assert len({lab.submission_id for lab in labels}) == len(labels)
    assert store.integrity_check() == "ok"


def test_kill_9_mid_burst_loses_no_acknowledged_label(tmp_path):
    store, tokens = make_store(tmp_path / "fb", LABELERS * PER_LABELER)
    proc = start_server(tmp_path / "fb")
    try:
        labelers = [Labeler(proc.url, t, timeout=5) for t in tokens]
        acked, in_flight, lock = set(), {}, threading.Lock()
        enough = threading.Event()

        def work(i: int) -> None:
            lab, rng = labelers[i], random.Random(i)
            try:
                for _ in range(PER_LABELER):
                    body = label_body(lab.next(), rng)
                    with lock:
                        in_flight[body["submission_id"]] = (i, body)
                    r = lab.submit(body)
                    assert r.status_code == 200, r.text
                    with lock:
                        acked.add(body["submission_id"])
                        del in_flight[body["submission_id"]]
                        if len(acked) >= 300:
                            enough.set()
            except requests.RequestException:
                return  # the server was killed under us

        with ThreadPoolExecutor(LABELERS) as pool:
            futures = [pool.submit(work, i) for i in range(LABELERS)]
            assert enough.wait(120), "the burst did not reach 300 labels"
            proc.kill()  # SIGKILL: no shutdown code runs
            proc.wait()
            for f in futures:
                f.result()
        assert 300 <= len(acked) < LABELERS * PER_LABELER
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert store.integrity_check() == "ok"
    stored = {lab.submission_id for lab in store.labels()}
    assert acked <= stored  # every acknowledged label survived
    assert stored <= acked | set(in_flight)  # and nothing appeared that was never sent

    # after a restart the same sessions go on; resending the unanswered submissions (same ids)
    # stores each exactly once, whether or not the first attempt had reached the disk
    with label_server(tmp_path / "fb") as (url, _):
        for sub_id, (i, body) in in_flight.items():
            labelers[i].url = url
            r = labelers[i].submit(body)
            assert r.status_code == 200, r.text
            assert r.json()["duplicate"] == (sub_id in stored)
    assert {lab.submission_id for lab in store.labels()} == acked | set(in_flight)
    assert store.integrity_check() == "ok"
