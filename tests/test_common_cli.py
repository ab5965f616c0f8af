"""The real `tidal` console script: config show (errors, overrides, --doc) and report."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


TIDAL = shutil.which("tidal", path=str(Path(sys.executable).parent)) or shutil.which("tidal")


def tidal(*args, cwd=None):
    assert TIDAL, f"no tidal console script next to {sys.executable}; run `make install`"
    return subprocess.run([TIDAL, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def test_config_show_misspelled_key_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  lr: 1.0e-5\n  mini_bach_size: 8\n")
    res = tidal("config", "show", path)
    assert res.returncode == 2, res
    assert "unknown key 'learner.mini_bach_size'" in res.stderr
    assert "Did you mean 'learner.mini_batch_size'?" in res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_config_show_resolves_file_and_override(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("learner: {lr: 1.0e-5}\nstages: {run: [sft, rl]}\n")
    res = tidal("config", "show", path, "learner.lr=1e-6", "stages.rm.loss=ranking")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["learner"]["lr"] == 1e-6 and shown["stages"]["run"] == ["sft", "rl"]
    assert shown["stages"]["rm"]["loss"] == "ranking" and shown["learner"]["zero_stage"] == 2  # defaults filled in


def test_config_show_overrides_without_file():
    res = tidal("config", "show", "algorithm.name=grpo", "rollout.n_samples=4")
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["algorithm"]["name"] == "grpo" and shown["rollout"]["n_samples"] == 4


def test_config_show_cross_field_error_exits_2():
    res = tidal("config", "show", "learner.num_workers=3")
    assert res.returncode == 2 and "learner.mini_batch_size (8) must be a multiple" in res.stderr
    # what the algorithm table refuses, preflight checks (--check, and `tidal train`)
    res = tidal("config", "show", "--check", "algorithm.name=grpo")
    assert res.returncode == 2 and "rollout.n_samples must be >= 2" in res.stderr


def test_config_show_doc():
    res = tidal("config", "show", "--doc")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.startswith("learner.lr = 1e-05  # Policy learning rate") for line in lines)
    assert any(line.startswith("reward.terms[0].kind = ") for line in lines)
    assert all("  # " in line and line.split("  # ", 1)[1].strip() for line in lines)


def test_config_show_doc_shows_the_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: {name: grpo}\nrollout: {n_samples: 4}\n")
    res = tidal("config", "show", path, "--doc", "learner.lr=1e-6", "reward.terms[0].weight=0.5")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "learner.lr = 1e-06  (default 1e-05)  # Policy learning rate." in lines
    assert any(line.startswith("algorithm.name = 'grpo'  (default 'ppo')") for line in lines)
    assert any(line.startswith("reward.terms[0].weight = 0.5") for line in lines)


def test_output_piped_to_a_reader_that_leaves_is_quiet():
    # `tidal config show --doc | head -1`, with the pipe closed before tidal writes
    proc = subprocess.Popen([TIDAL, "config", "show", "--doc"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_shows_defaults():
    res = tidal("data", "sentiment", "--help")
    assert res.returncode == 0 and "(default: jsonl)" in res.stdout and "(default: 0)" in res.stdout


def test_data_sentiment_never_overwrites(tmp_path):
    (tmp_path / "prompts_train.jsonl").write_text('{"prompt": "mine"}\n')
    res = tidal("data", "sentiment", tmp_path)
    assert res.returncode == 2 and "prompts_train.jsonl exists" in res.stderr
    assert (tmp_path / "prompts_train.jsonl").read_text() == '{"prompt": "mine"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts_train.jsonl"]


def test_reward_template_is_a_valid_reward_module(tmp_path, monkeypatch):
    res = tidal("reward", "template")
    assert res.returncode == 0, res.stderr
    (tmp_path / "tidal_template_rewards.py").write_text(res.stdout)  # a name no other test imports
    monkeypatch.syspath_prepend(str(tmp_path))
    from tidal.driver.preflight import check_reward_function
    from tidal.reward_service.rules import load_function

    try:
        check_reward_function("reward.terms[0].target", "tidal_template_rewards:score")  # raises if the signature is wrong
        scores = load_function("tidal_template_rewards:score")(["p", "q"], ["a b a", "c"], references=[None, None], target=None)
        assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    finally:
        sys.modules.pop("tidal_template_rewards", None)


def test_debug_shows_the_traceback_of_a_user_error():
    plain = tidal("config", "show", "learner.lrr=1")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and len(plain.stderr.splitlines()) == 1
    for args in (["--debug", "config", "show", "learner.lrr=1"], ["config", "show", "learner.lrr=1", "--debug"]):
        res = tidal(*args)
        assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError: unknown key 'learner.lrr'" in res.stderr


def test_every_subcommand_runs_on_a_typed_frozen_dataclass():
    import dataclasses

    from tidal.commands.cli import COMMANDS, parse_args

    assert len(COMMANDS) >= 15
    for cmd in COMMANDS:
        assert dataclasses.is_dataclass(cmd.args) and cmd.args.__dataclass_params__.frozen, cmd.path
        for f in dataclasses.fields(cmd.args):
            assert f.metadata.get("help"), f"{' '.join(cmd.path)}: {f.name} has no help text"
    ns, cmd, args = parse_args(["eval", "a=1", "--run", "ppo=runs/x", "--run", "dpo=runs/y", "b=2"])
    assert cmd.path == ("eval",) and args.config is None and args.overrides == ("a=1", "b=2")
    assert args.run == ("ppo=runs/x", "dpo=runs/y") and args.best_of == 1  # repeated options collect, ints typed


def test_help_names_every_positional_prints_each_default_once_and_lists_every_stage():
    from tidal.commands.cli import COMMANDS

    for cmd in COMMANDS:
        res = tidal(*cmd.path, "--help")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert not [ln for ln in lines if ln.count("default") > 1], f"{cmd.path}: a default shown twice"
        start = lines.index("positional arguments:") if "positional arguments:" in lines else None
        if start is not None:  # each positional has its text on its line or the next
            block = lines[start + 1:lines.index("options:")]
            names = [i for i, ln in enumerate(block) if ln.startswith("  ") and not ln.startswith("   ")]
            for i in names:
                assert len(block[i].split()) > 1 or (i + 1 < len(block) and block[i + 1].startswith("      ")), \
                    f"{cmd.path}: positional {block[i].strip()} has no help"
    assert "sft, rm, dpo, rl, collect" in tidal("train", "--help").stdout.replace("\n", " ").replace("  ", " ")


def test_version():
    res = tidal("--version")
    assert res.returncode == 0 and res.stdout.startswith("tidal ") and res.stdout.split()[1][0].isdigit()


def test_label_errors_and_unwritable_paths_leave_through_the_one_error_path(tmp_path):
    res = tidal("label", "status", tmp_path / "no-store")
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("tidal: label error: ") and "Traceback" not in res.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    res = tidal("data", "sentiment", a_file / "sub")  # a folder inside a file
    assert res.returncode == 2 and res.stderr.startswith("tidal: file error: "), res.stderr
    assert len(res.stderr.splitlines()) == 1 and a_file.read_text() == "mine"
