"""Faults around a run that need no Ray (issue 21): parallel sweeps into one folder, a second
process in a run folder, Ctrl-C that must end a stuck run, leftovers of a driver that dies,
durability of the files a resume reads. The ones that need real runs are in test_e2e_robust.py."""

import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tidal.common.config import load_config
from tidal.driver import checkpoint as ck

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_grpo.yaml")


# ----------------------------------------------------------------------------- one process per run folder


def _sweep_member(out: str, run_name: str, barrier, results) -> None:
    """One `tidal train` of a sweep (a forked process): the real train_from_cli up to the job,
    whose work is replaced by writing the run's files for two seconds."""
    import tidal.commands.train as train

    def fake_run_pipeline(cfg, run_dir, resume=False, data=None, verbose=False):
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "metrics.jsonl", "a") as f:
            for step in (1, 2):
                f.write(json.dumps({"step": step, "pid": os.getpid()}) + "\n")
                f.flush()
                time.sleep(1)
        return {}

    train.run_pipeline = fake_run_pipeline
    train.time.strftime = lambda fmt: "20260101-000000"  # every run starts in the same second
    overrides = ["data.task=null", f"data.prompts={out}/ok.jsonl", f"logging.output_dir={out}",
                 "logging.wandb_mode=disabled"] + ([f"logging.run_name={run_name}"] if run_name else [])
    barrier.wait()
    try:
        results.put((os.getpid(), train.train_from_cli(TINY, overrides), ""))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((os.getpid(), None, f"{type(e).__name__}: {e}"))


def _sweep(tmp_path: Path, n: int, run_name: str = "") -> list[tuple]:
    (tmp_path / "ok.jsonl").write_text("".join(f'{{"prompt": "hi {i}"}}\n' for i in range(8)))  # a step's 8 prompts
    mp = multiprocessing.get_context("fork")
    barrier, results = mp.Barrier(n), mp.Queue()
    procs = [mp.Process(target=_sweep_member, args=(str(tmp_path), run_name, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def test_a_sweep_started_in_one_second_gets_a_folder_per_run(tmp_path):
    results = _sweep(tmp_path, 20)
    assert all(code == 0 for _, code, _ in results), results
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 20, [f.name for f in folders]
    assert folders[0].name == "tiny_grpo-20260101-000000"
    for folder in folders:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and len({r["pid"] for r in rows}) == 1, folder


def test_one_run_name_twice_at_once_runs_once_and_refuses_the_other(tmp_path):
    results = _sweep(tmp_path, 5, run_name="same")
    ok = [pid for pid, code, _ in results if code == 0]
    refused = [err for _, code, err in results if code is None]
    assert len(ok) == 1 and len(refused) == 4, results
    assert all("ConfigError" in e and ("in use by another tidal process" in e or "already holds a run" in e)
               for e in refused), refused
    rows = [json.loads(line) for line in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()]
    assert {r["pid"] for r in rows} == set(ok) and [r["step"] for r in rows] == [1, 2]


def test_pruning_leaves_the_unfinished_write_of_a_live_process(tmp_path):
    """A checkpoint writer's temporary folder belongs to its process: only a dead writer's is
    removed (before: every .tmp-* folder, another live process's included)."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        root = tmp_path / ck.CHECKPOINTS
        live, dead = root / f".tmp-step-000009-{other.pid}", root / ".tmp-step-000007-999999999"
        for d in (live, dead):
            d.mkdir(parents=True)
            (d / "rng.pt").write_bytes(b"partial")
        ck.write_checkpoint(tmp_path, 1, lambda d: (d / "driver_state.json").write_text("{}"))
        assert live.is_dir() and not dead.exists()
    finally:
        other.kill()
        other.wait()


def test_the_logs_a_resume_keeps_are_on_disk_before_the_checkpoint_is(tmp_path, monkeypatch):
    """metrics.jsonl and rollouts.jsonl are fsynced before the checkpoint is published: after a
    power cut, a checkpoint never points past records that were lost."""
    logs = (tmp_path / "metrics.jsonl", tmp_path / "rollouts.jsonl")
    for log in logs:
        log.write_text('{"step": 1}\n')
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("publish", str(b))), real_replace(a, b))[1])
    ck.write_checkpoint(tmp_path, 1, lambda d: (d / "driver_state.json").write_text("{}"), logs=logs)
    published = events.index(("publish", str(tmp_path / ck.CHECKPOINTS / "step-000001")))
    for log in logs:
        assert events.index(("fsync", str(log))) < published


def _with_file_size_limit(limit: int):
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_files


def test_a_small_file_written_on_a_full_disk_is_all_or_nothing(tmp_path):
    code = textwrap.dedent(f"""
        from tidal.driver.checkpoint import atomic_write_text
        try:
            atomic_write_text({str(tmp_path / 'config.yaml')!r}, "x" * 10000)
        except OSError as e:
            print(e.filename)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=_with_file_size_limit(4096))
    assert res.stdout.strip() == str(tmp_path / "config.yaml"), res.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # neither a half-written config.yaml nor the temporary file


def test_eval_before_is_evaluated_again_when_a_crash_left_only_the_samples(tmp_path, monkeypatch):
    """samples_before.jsonl written, the driver died before eval_before.json: the resume
    evaluates the initial policy again (before: it crashed reading eval_before.json)."""
    from tidal.driver import rl_stage

    (tmp_path / "samples_before.jsonl").write_text('{"completion": "half"}\n')
    monkeypatch.setattr(rl_stage, "evaluate", lambda cfg, parts, prompts, out: (
        Path(out).write_text('{"completion": "again"}\n'), {"reward": 0.5})[1])
    before = rl_stage.evaluate_before(None, None, None, tmp_path)
    assert before == {"reward": 0.5} and json.loads((tmp_path / "eval_before.json").read_text()) == before
    monkeypatch.setattr(rl_stage, "evaluate", lambda *a: pytest.fail("evaluated twice"))
    assert rl_stage.evaluate_before(None, None, None, tmp_path) == before  # a later resume reads it back


def _labeled_store(folder: Path, tasks: int = 40):
    from tidal.feedback.store import FeedbackStore, NewTask, TaskResponse

    store = FeedbackStore(folder, create=True)
    store.add_tasks([NewTask(f"prompt {i} " + "x" * 200, [TaskResponse("a" * 1000), TaskResponse("b" * 1000)])
                     for i in range(tasks)], overlap_fraction=0.0)
    ann = store.session(store.login(store.add_labeler("ann"))[0])["labeler_id"]
    while (task := store.next_task(ann)) is not None:
        store.submit(ann, f"sub-{task.id:06d}", task.id, [0, 1])
    return store


def _label_export(cwd: Path, *args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "tidal.commands.cli", "label", "export", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=_with_file_size_limit(limit) if limit else None)


def test_label_export_never_touches_a_file_named_like_its_temporary_one(tmp_path):
    _labeled_store(tmp_path / "fb")
    (tmp_path / "out.jsonl.tmp").write_text("the user's own file\n")
    res = _label_export(tmp_path, "fb", "out.jsonl")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.jsonl.tmp").read_text() == "the user's own file\n"
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fb", "out.jsonl", "out.jsonl.tmp"]


def test_label_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    _labeled_store(tmp_path / "fb")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _label_export(tmp_path, "fb", "out.jsonl", limit=64 * 1024)  # the store reads; the ~90 KB export fails
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-3000:]
    assert "out.jsonl" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------- Ctrl-C ends a stuck run


def test_one_signal_ends_a_step_that_never_reaches_its_safe_point():
    """The first Ctrl-C asks for a stop at the next safe point; a step stuck in a call that never
    returns must not hold it: after grace_s the main thread gets KeyboardInterrupt."""
    from tidal.driver.interrupt import StopRequests

    stuck = threading.Event()
    t0 = time.monotonic()
    with StopRequests(grace_s=1.0) as stops, stops.safe_points():
        threading.Timer(0.2, os.kill, args=(os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            stuck.wait(30)  # a step waiting on a rollout that never comes
    assert stops.requested == "SIGINT" and 1.0 <= time.monotonic() - t0 < 5


def test_a_rollout_job_stuck_forever_does_not_keep_the_driver_alive(tmp_path):
    """An interrupted run abandons the rollout thread (shutdown(wait=False)); the process then
    exits although the job never returns (before: a ThreadPoolExecutor thread, joined at exit)."""
    code = textwrap.dedent("""
        import threading
        from tidal.driver.pipeline import RolloutPipeline
        p = RolloutPipeline(lambda step: threading.Event().wait(), lambda h, v: None, 0, 4, 0, 0)
        p.launch()
        p.shutdown(wait=False)
        print("left", flush=True)
    """)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "left", res.stderr[-2000:]
    assert time.monotonic() - t0 < 60


# ----------------------------------------------------------------------------- leftovers


def _fake_session_process(temp_dir: Path) -> subprocess.Popen:
    """A process that names the cluster's temp folder on its command line, as Ray's do."""
    return subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(600)", f"--temp-dir={temp_dir}"],
                            start_new_session=True)


def _gone(pid: int, within_s: float) -> bool:
    from tidal.driver.reaper import _alive

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_driver_killed_with_sigkill_leaves_no_cluster_process_or_temp_folder(tmp_path):
    """The watchdog started next to an embedded cluster ends its processes, keeps their logs and
    removes its temp folder once the driver is gone, kill -9 included."""
    temp_dir, logs_to = tmp_path / "tidal-ray-x", tmp_path / "run" / "logs" / "ray"
    (temp_dir / "session_latest" / "logs").mkdir(parents=True)
    (temp_dir / "session_latest" / "logs" / "raylet.out").write_text("the raylet's log\n")
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tidal.driver.runtime import _start_watchdog
        _start_watchdog({str(temp_dir)!r}, Path({str(logs_to)!r}))
        print("up", flush=True)
        time.sleep(600)
    """)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    session = _fake_session_process(temp_dir)
    try:
        assert driver.stdout.readline().strip() == "up"
        driver.kill()
        driver.wait()
        assert _gone(session.pid, 15), "a process of the cluster outlived its driver"
        session.wait(timeout=5)
        deadline = time.monotonic() + 10
        while temp_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not temp_dir.exists() and (logs_to / "raylet.out").read_text() == "the raylet's log\n"
    finally:
        for p in (driver, session):
            if p.poll() is None:
                p.kill()


def test_ctrl_c_while_ray_starts_undoes_the_half_started_cluster(tmp_path, monkeypatch):
    """KeyboardInterrupt inside ray.init: what it started is ended and the temp folder removed
    (before: processes orphaned, the tidal-ray-* folder left forever)."""
    import ray

    from tidal.common.config import ClusterConfig
    from tidal.driver import runtime

    monkeypatch.setattr(runtime.tempfile, "gettempdir", lambda: str(tmp_path))
    started = []

    def init(**kwargs):
        started.append(_fake_session_process(Path(kwargs["_temp_dir"])))
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # another test of the session may have started Ray
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(KeyboardInterrupt):
        runtime.connect(ClusterConfig(), verbose=False)
    pid = started[0].pid
    assert _gone(pid, 10), (started[0].args, Path(f"/proc/{pid}/cmdline").read_bytes(),
                            Path(f"/proc/{pid}/stat").read_text())
    started[0].wait(timeout=5)
    assert not list(tmp_path.glob("tidal-ray-*"))


# ----------------------------------------------------------------------------- what the console says


def _train_with(monkeypatch, tmp_path, failure: BaseException, capsys) -> tuple[int | None, str]:
    import tidal.commands.train as train

    def fake_run_pipeline(cfg, run_dir, **kwargs):
        raise failure

    (tmp_path / "ok.jsonl").write_text("".join(f'{{"prompt": "hi {i}"}}\n' for i in range(8)))  # a step's 8 prompts
    monkeypatch.setattr(train, "run_pipeline", fake_run_pipeline)
    code = train.train_from_cli(TINY, ["data.task=null", f"data.prompts={tmp_path}/ok.jsonl",
                                       f"logging.output_dir={tmp_path}", "logging.run_name=r"])
    return code, capsys.readouterr().err


def test_ctrl_c_before_any_checkpoint_promises_none(monkeypatch, tmp_path, capsys):
    code, err = _train_with(monkeypatch, tmp_path, KeyboardInterrupt("SIGINT"), capsys)
    assert code == 130 and "no stage finished and no checkpoint was written" in err, err
    assert f"Resume with: tidal train --resume {tmp_path / 'r'}" in err


def test_a_worker_killed_mid_run_is_one_line_that_says_how_to_resume(monkeypatch, tmp_path, capsys):
    from tidal.actors.actor_group import ActorCallTimeout, CallResult, call_error

    class LearnerError(RuntimeError):
        pass

    died = ActorCallTimeout("learner rank 0/1 did not answer")
    failure = call_error("update", [CallResult(0, "learner rank 0/1", False, None, died)], LearnerError, 300)
    code, err = _train_with(monkeypatch, tmp_path, failure, capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "learner rank 0/1" in lines[0] and f"Resume with: tidal train --resume {tmp_path / 'r'}" in lines[0]


def test_data_sentiment_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path):
    res = subprocess.run([sys.executable, "-m", "tidal.commands.cli", "data", "sentiment", "out"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, preexec_fn=_with_file_size_limit(4096))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-3000:]
    assert "tidal: file error: out/" in res.stderr and "Traceback" not in res.stderr
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]
