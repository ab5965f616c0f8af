"""Bad input of every kind through the real CLI (a subprocess, as a user runs it): each fails in
seconds, before Ray starts, with exit code 2 and ONE stderr line naming the file/row/field or
key, no traceback, and nothing in the folders it was pointed at changed or added."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tidal.driver import checkpoint as ck
from tidal.common.config import load_config, to_yaml

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_grpo.yaml")


def _tree_hash(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "tmp" not in p.relative_to(root).parts[:1]}


def run_cli(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    tmp = cwd / "tmp"  # the embedded Ray would make its tidal-ray-* folder here
    tmp.mkdir(exist_ok=True)
    path = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH", "")) if p)  # the tidal under test
    env = {**os.environ, "TMPDIR": str(tmp), "WANDB_MODE": "disabled", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "tidal.commands.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_user_error(cwd: Path, args: list[str], *names: str) -> str:
    """Exit 2, one stderr line containing every name, no traceback, no Ray, in seconds (under 30 s even on a
    loaded machine; the CLI imports torch), no file touched."""
    before = _tree_hash(cwd)
    t0 = time.monotonic()
    res = run_cli(cwd, *args)
    took = time.monotonic() - t0
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert took < 30, f"took {took:.1f} s"
    assert not list((cwd / "tmp").glob("tidal-ray-*")), "Ray was started"
    assert _tree_hash(cwd) == before, "a file was changed or added"
    return lines[0]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def scratch(tmp_path):
    """A user's folder: data and runs that must come out of every failed command unchanged."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    _jsonl(tmp_path / "data" / "ok.jsonl", [{"prompt": f"hi {i}"} for i in range(16)])  # 2 steps of tiny_grpo
    return tmp_path


def test_prompt_row_without_prompt(scratch):
    _jsonl(scratch / "data" / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    line = assert_user_error(scratch, ["train", TINY, "data.task=null", "data.prompts=data/p.jsonl"],
                             "p.jsonl:3", "field 'prompt'", "data.prompts")
    assert "missing" in line


def test_heldout_file_too_small_for_reporting_and_selection(scratch):
    _jsonl(scratch / "data" / "held.jsonl", [{"prompt": f"p{i}"} for i in range(20)])
    args = ["train", TINY, "data.task=null", "data.prompts=data/ok.jsonl", "data.eval_prompts=data/held.jsonl",
            "logging.gold_every=2", "logging.eval_samples=8"]
    line = assert_user_error(scratch, [*args, "logging.gold_samples=16"], "held.jsonl", "has 20 prompts", "24",
                             "logging.eval_samples=8", "logging.gold_samples=16")
    assert "disjoint" in line


def test_reward_function_module_missing(scratch):
    assert_user_error(scratch, ["train", TINY, "reward.terms.0.kind=function", "reward.terms[0].target=nosuchmodule:f"],
                      "reward.terms[0].target", "nosuchmodule")


def test_reward_function_without_meta(scratch):
    (scratch / "myrew.py").write_text("def score(prompts, completions):\n    return [0.0] * len(prompts)\n")
    assert_user_error(scratch, ["train", TINY, "reward.terms.0.kind=function", "reward.terms.0.target=myrew:score"],
                      "myrew:score", "**meta")


def test_policy_folder_missing(scratch):
    assert_user_error(scratch, ["train", TINY, "model.policy=/nonexistent"], "model.policy=/nonexistent")


def test_partial_rollouts_in_sync_mode(scratch):
    assert_user_error(scratch, ["train", TINY, "rollout.partial=continue"], "rollout.partial=continue",
                      "algorithm.mode=async")


def test_policy_folder_without_tokenizer(scratch):
    (scratch / "m").mkdir()
    (scratch / "m" / "config.json").write_text("{}")
    assert_user_error(scratch, ["train", TINY, "model.policy=m"], "model.policy=m", "tokenizer")


def _fake_run(scratch: Path, stages_done: dict, *overrides: str) -> Path:
    run = scratch / "runs" / "r"
    run.mkdir(parents=True)
    cfg = load_config(TINY, ["logging.output_dir=runs", "logging.run_name=r", "logging.wandb_mode=disabled", *overrides])
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "run_state.json").write_text(json.dumps({"stages": stages_done}))
    _jsonl(run / "metrics.jsonl", [{"stage": "rl", "step": 1, "rl/reward_mean": 0.5}, {"stage": "eval", "x": 1}])
    (run / "summary.json").write_text(json.dumps({"wall_time_s": 136.2}))
    return run


def _checkpoint(run: Path, step: int, corrupt: bool) -> Path:
    """A checkpoint as the RL loop publishes it (driver state, RNG, a learner file; COMPLETE manifest)."""
    def write(d: Path) -> None:
        ck.DriverState(step=step, weight_version=step, kl_controller={}, reward_state={}, data_state={}).save(d)
        (d / "learner").mkdir()
        torch.save({"w": torch.zeros(16)}, d / "learner" / "model_states.pt")

    d = ck.write_checkpoint(run, step, write)
    if corrupt:  # what a disk-full or killed copy leaves: the zip's end cut off
        data = (d / "rng.pt").read_bytes()
        (d / "rng.pt").write_bytes(data[: len(data) // 2])
    return d


def test_resume_with_no_readable_checkpoint_names_every_bad_file(scratch):
    run = _fake_run(scratch, {})
    _checkpoint(run, 1, corrupt=True)
    _checkpoint(run, 2, corrupt=True)
    assert_user_error(scratch, ["train", "--resume", "runs/r"], "step-000002/rng.pt", "step-000001/rng.pt")


def test_resume_with_a_corrupt_newest_checkpoint_warns_once_before_ray(scratch):
    """The fallback is decided at preflight: one warning naming the file and the checkpoint used.
    (A bad prompts row stops this resume right after, so no Ray starts; the e2e fault test
    resumes such a run for real.)"""
    _jsonl(scratch / "data" / "p.jsonl", [{"prompt": "a"}, {"text": "b"}])
    run = _fake_run(scratch, {}, "data.task=null", "data.prompts=data/p.jsonl")
    _checkpoint(run, 1, corrupt=False)
    _checkpoint(run, 2, corrupt=True)
    before = _tree_hash(scratch)
    res = run_cli(scratch, "train", "--resume", "runs/r")
    warning, error = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "warning" in warning and "step-000002/rng.pt" in warning and "step-000001" in warning, warning
    assert "p.jsonl:2" in error
    assert not list((scratch / "tmp").glob("tidal-ray-*")) and _tree_hash(scratch) == before


def test_resume_refuses_changing_a_key_that_breaks_exactness(scratch):
    _fake_run(scratch, {})
    assert_user_error(scratch, ["train", "--resume", "runs/r", "learner.lr=1"], "learner.lr", "algorithm.steps")


def test_comparison_with_chosen_equal_rejected(scratch):
    _jsonl(scratch / "data" / "c.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad"},
                                          {"prompt": "p", "chosen": "same", "rejected": "same"}])
    assert_user_error(scratch, ["train", TINY, "data.task=null", "stages.run=[rm]", "data.comparisons=data/c.jsonl"],
                      "c.jsonl:2", "field 'rejected'", "chosen")


def test_ranking_with_duplicate_responses(scratch):
    _jsonl(scratch / "data" / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}])
    assert_user_error(scratch, ["train", TINY, "data.task=null", "stages.run=[rm]", "stages.rm.loss=ranking",
                                "data.rankings=data/r.jsonl"], "r.jsonl:1", "responses[2]", "responses[0]")


def test_empty_yaml(scratch):
    (scratch / "empty.yaml").write_text("# nothing yet\n")
    assert_user_error(scratch, ["train", "empty.yaml"], "empty.yaml", "empty")


def test_duplicate_yaml_key(scratch):
    (scratch / "dup.yaml").write_text("algorithm:\n  steps: 5\n  name: grpo\n  steps: 8\n")
    assert_user_error(scratch, ["train", "dup.yaml"], "dup.yaml", "line 4", "'steps'", "line 2")


def test_unknown_key(scratch):
    assert_user_error(scratch, ["train", TINY, "learner.lrr=1e-6"], "learner.lrr", "learner.lr")


def test_config_show_check_and_submit_run_the_same_preflight(scratch):
    assert_user_error(scratch, ["config", "show", TINY, "--check", "model.policy=/nonexistent"], "model.policy")
    # overrides after --address; the cluster address is never contacted
    (scratch / "c.yaml").write_text((REPO / "configs" / "tiny_grpo.yaml").read_text())
    assert_user_error(scratch, ["submit", "c.yaml", "--address", "http://127.0.0.1:9", "model.policy=/nonexistent"],
                      "model.policy")


def test_resume_of_a_finished_run_says_so_and_changes_nothing(scratch):
    run = _fake_run(scratch, {"rl": {"output": "runs/r/policy", "summary": {}}})
    _checkpoint(run, 2, corrupt=False)
    before = _tree_hash(scratch)
    t0 = time.monotonic()
    res = run_cli(scratch, "train", "--resume", "runs/r")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already finished" in res.stdout and time.monotonic() - t0 < 15
    assert not list((scratch / "tmp").glob("tidal-ray-*"))
    assert _tree_hash(scratch) == before
    # extending a finished run goes on from its final checkpoint: this run's newest is step 2 of
    # 20, so there is nothing to go on from; refused, nothing changed (tests/test_first_hour.py
    # extends a real one)
    assert_user_error(scratch, ["train", "--resume", "runs/r", "algorithm.steps=80"], "final step 20", "model.policy=")
    assert_user_error(scratch, ["train", "--resume", "runs/r", "algorithm.steps=10"], "finished 20 steps")


# ----------------------------------------------------------------------------- the corpus (issue 21)
# Each case: id, a setup that writes the user's files into the scratch folder (hashed after it, so
# the command may change none of them), the CLI arguments, and what its one line must name.
D = ["data.task=null", "data.prompts=data/ok.jsonl"]


def _tiny_copy(scratch: Path, name: str = "m") -> Path:
    """A copy of the tiny model's folder: a user's model folder to break."""
    from tidal.common.models import resolve_model

    import shutil
    shutil.copytree(resolve_model("tiny-random"), scratch / name)
    return scratch / name


def _no_weights(s):
    for f in _tiny_copy(s).glob("*.safetensors"):
        f.unlink()


def _truncated_weights(s):
    w = _tiny_copy(s) / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _bad_config_json(s):
    (_tiny_copy(s) / "config.json").write_text('{"model_type": "llama",')


def _small_vocab(s):
    cfg = _tiny_copy(s) / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "vocab_size": 100}))


def _user_project(s):
    (s / "proj").mkdir()
    (s / "proj" / "config.yaml").write_text("# my project's settings, with comments\nseed: 1\n")


def _edited_run(s):
    from tidal.driver.run_folder import start_run_state

    run = _fake_run(s, {})
    start_run_state(run, load_config(run / "config.yaml"))  # what a run records when it starts
    _checkpoint(run, 1, corrupt=False)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("lr: 0.001", "lr: 0.01"))


def _edited_since_its_checkpoint(s):
    """A run whose run_state.json has no config record (as before records existed): the
    checkpoint's own record still catches the edit."""
    from tidal.driver.run_folder import config_record

    run = _fake_run(s, {})
    record = config_record(load_config(run / "config.yaml"))

    def write(d: Path) -> None:
        ck.DriverState(step=1, weight_version=1, kl_controller={}, reward_state={}, data_state={},
                       extra={"config": record}).save(d)
        (d / "learner").mkdir()
        torch.save({"w": torch.zeros(16)}, d / "learner" / "model_states.pt")

    ck.write_checkpoint(run, 1, write)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("kl_coef: 0.01", "kl_coef: 0.2"))


def _run_folder_with_checkpoint(s):
    run = s / "runs" / "r"
    run.mkdir(parents=True)
    _checkpoint(run, 3, corrupt=False)


def _busy_port(s):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _busy_port.sock = sock  # held until the test ends
    (s / "port").write_text(str(sock.getsockname()[1]))


def _feedback_store(s):
    assert run_cli(s, "label", "add-labeler", "fb", "ann").returncode == 0


CORPUS = [
    # settings the engine or the algorithm would refuse after Ray starts
    ("top-p-zero", None, ["train", TINY, "rollout.top_p=0", *D], ["rollout.top_p=0.0", "(0, 1]"]),
    ("greedy-groups", None, ["train", TINY, "rollout.temperature=0", *D], ["rollout.temperature=0", "n_samples=4"]),
    ("lr-nan", None, ["train", TINY, "learner.lr=.nan", *D], ["learner.lr", "not a finite number"]),
    ("lr-inf", None, ["train", TINY, "learner.lr=.inf", *D], ["learner.lr", "not a finite number"]),
    ("seed-negative", None, ["train", TINY, "seed=-1", *D], ["seed", ">= 0"]),
    ("context-beyond-model", None, ["train", TINY, "rollout.max_model_len=100000", *D],
     ["rollout.max_model_len=100000", "max_position_embeddings=512"]),
    ("budget-beyond-context", None, ["train", TINY, "data.max_prompt_tokens=120", *D],
     ["data.max_prompt_tokens=120", "rollout.max_new_tokens=16", "rollout.max_model_len=128"]),
    ("length-target-abc", None, ["train", TINY, "reward.terms[0].kind=length", "reward.terms[0].target=abc", *D],
     ["reward.terms[0].target='abc'"]),
    # before: a ValueError traceback from the rollout pool after Ray started (a row repeated in one step)
    ("fewer-prompts-than-a-step", lambda s: _jsonl(s / "data" / "one.jsonl", [{"prompt": "hi"}]),
     ["train", TINY, "data.task=null", "data.prompts=data/one.jsonl"], ["data.prompts=data/one.jsonl", "1 row,",
                                                          "algorithm.prompts_per_step=8"]),
    ("cluster-too-small", None, ["train", TINY, "cluster.num_cpus=1", *D], ["cluster.num_cpus=1", ">= 3"]),
    ("no-stages", None, ["train", TINY, "stages.run=[]", *D], ["stages.run is empty"]),
    # model folders that would fail to load in the workers
    ("no-weights", _no_weights, ["train", TINY, "model.policy=m", *D], ["model.policy=m", "no weights"]),
    ("truncated-safetensors", _truncated_weights, ["train", TINY, "model.policy=m", *D],
     ["model.policy=m", "model.safetensors", "truncated"]),
    ("config-json-unparsable", _bad_config_json, ["train", TINY, "model.policy=m", *D], ["m/config.json", "JSON"]),
    ("tokenizer-of-another-model", _small_vocab, ["train", TINY, "model.policy=m", *D],
     ["model.policy=m", "512 token ids", "vocab_size=100"]),
    # files and folders
    ("output-dir-is-a-file", lambda s: (s / "afile").write_text("x"),
     ["train", TINY, "logging.output_dir=afile", *D], ["afile"]),
    ("data-dir-is-a-file", lambda s: (s / "afile").write_text("x"), ["train", TINY, "data.data_dir=afile"], ["afile"]),
    ("config-not-utf8", lambda s: (s / "c.yaml").write_bytes("# caf\xe9\nseed: 1\n".encode("latin-1")),
     ["train", "c.yaml"], ["c.yaml", "not UTF-8"]),
    ("fake-parquet", lambda s: (s / "data" / "p.parquet").write_text("not parquet"),
     ["train", TINY, "data.task=null", "data.prompts=data/p.parquet"], ["data.prompts", "p.parquet", "parquet"]),
    ("reward-module-syntax-error", lambda s: (s / "badsyn.py").write_text("def score(p, c, **m)\n  return 1\n"),
     ["train", TINY, "reward.terms.0.kind=function", "reward.terms.0.target=badsyn:score", *D],
     ["badsyn:score", "badsyn.py:1", "syntax error"]),
    ("data-into-a-file", lambda s: (s / "afile").write_text("x"), ["data", "sentiment", "afile"], ["afile"]),
    ("tasks-not-utf8", lambda s: (s / "t.jsonl").write_bytes('{"prompt": "caf\xe9", "responses": ["a", "b"]}\n'
                                                            .encode("latin-1")),
     ["label", "add-tasks", "fb", "t.jsonl"], ["t.jsonl:1", "not UTF-8"]),
    ("tasks-bad-gold", lambda s: (s / "t.jsonl").write_text('{"prompt": "p", "responses": ["a", "b"], '
                                                            '"gold_ranking": [0, 5]}\n'),
     ["label", "add-tasks", "fb", "t.jsonl"], ["t.jsonl:1", "gold_ranking"]),
    ("label-port-out-of-range", _feedback_store, ["label", "serve", "fb", "--port", "70000"], ["--port 70000"]),
    ("reward-port-out-of-range", None, ["reward", "serve", "--port", "70000", "reward.terms=[{kind: sentiment}]"],
     ["--port 70000"]),
    ("reward-port-busy", _busy_port, ["reward", "serve", "--port", "{port}", "reward.terms=[{kind: sentiment}]"],
     ["in use"]),
    # run folders
    ("resume-a-user-folder", _user_project, ["train", "--resume", "proj"], ["--resume proj", "not a run folder"]),
    ("resume-a-hand-edited-config", _edited_run, ["train", "--resume", "runs/r"],
     ["runs/r/config.yaml", "learner.lr: 0.001 -> 0.01", "put those values back"]),
    ("resume-a-config-edited-since-its-checkpoint", _edited_since_its_checkpoint, ["train", "--resume", "runs/r"],
     ["checkpoints/step-000001", "algorithm.kl_coef: 0.01 -> 0.2"]),
    ("new-run-into-a-folder-with-a-checkpoint", _run_folder_with_checkpoint,
     ["train", TINY, "logging.output_dir=runs", "logging.run_name=r", *D], ["runs/r", "already holds a run"]),
]


@pytest.mark.parametrize("case,setup,args,names", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(scratch, case, setup, args, names):
    if setup is not None:
        setup(scratch)
    port = (scratch / "port").read_text() if (scratch / "port").is_file() else ""
    assert_user_error(scratch, [a.replace("{port}", port) for a in args], *names)


def test_a_run_folder_in_use_is_refused_naming_the_process(scratch):
    """A second run with the same run_name while the first runs (it holds RUN/.lock): refused
    before Ray, naming the holder; the lock goes with its process, kill -9 included."""
    (scratch / "runs" / "r").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open('runs/r/.lock', "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid());"
                               " print('held', flush=True); time.sleep(600)"], cwd=scratch, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_user_error(scratch, ["train", TINY, "logging.output_dir=runs", "logging.run_name=r", *D],
                          "runs/r", "in use by another tidal process", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
