"""The README's "Using it" commands, read from the README itself so they cannot drift.

Each command is taken as written (`.venv/bin/tidal ...`, run from a scratch folder laid out
like the checkout: `configs/` and `.venv` as links). Every one must parse with the real
argument parser, name config files that exist, and carry overrides its config accepts. The
cheap ones run for real, in order, as a new user would: `config show` (plus `--doc` and
`--check`), `data sentiment`, `report` (on a run made here), `reward template > FILE` (then
checked the way its own text says). The expensive ones (train, submit, eval, reward serve)
go through the same preflight `tidal train` runs before Ray (`config show ... --check`), or
for `--resume` through the resume override rules. `@pytest.mark.slow` runs `train` for real.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tidal.commands.cli import main, parse_args
from tidal.common.config import LoggingConfig, load_config, to_yaml
from tidal.common.metrics import MetricsLogger

REPO = Path(__file__).resolve().parents[1]
PREFIX = ".venv/bin/tidal"
RUN = "readme-run"  # what `runs/<run>` stands for here
CHEAP = {("config", "show"), ("data", "sentiment"), ("report", None), ("reward", "template")}
PARSED_ONLY = {("train", None), ("submit", None), ("eval", None), ("reward", "serve"), ("generate", None)}


def using_it() -> str:
    text = (REPO / "README.md").read_text()
    assert "\n## Using it\n" in text, "README.md lost its '## Using it' section"
    return text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(lang: str) -> list[list[str]]:
    """The lines of each fenced block of the section whose fence names `lang` ('' for none)."""
    blocks, inside, keep = [], False, False
    for line in using_it().splitlines():
        if line.startswith("```"):
            inside = not inside
            keep = inside and line[3:].strip() == lang
            if keep:
                blocks.append([])
        elif inside and keep:
            blocks[-1].append(line)
    return blocks


def readme_commands() -> list[list[str]]:
    """Every line of the section's bash blocks, split as a shell would (comments dropped)."""
    return [words for block in code_blocks("bash") for line in block if (words := shlex.split(line, comments=True))]


def readme_error_examples() -> list[tuple[list[str], str]]:
    """`$ tidal ...` lines of the plain blocks, each with the first output line it shows."""
    out = []
    for lines in code_blocks(""):
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                out.append((shlex.split(line[2:]), lines[i + 1]))
    return out


def _kind(parsed) -> tuple[str, str | None]:
    ns, cmd, _ = parsed
    return cmd.path[0], cmd.path[1] if len(cmd.path) > 1 else None


def _console_script() -> Path | None:
    for cand in (REPO / PREFIX, Path(sys.executable).parent / "tidal"):
        if cand.is_file():
            return cand
    return None


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A folder shaped like the checkout, holding a finished run for `runs/<run>`."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    if (REPO / ".venv").is_dir():
        (tmp_path / ".venv").symlink_to(REPO / ".venv")
    run = tmp_path / "runs" / RUN
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", ["logging.output_dir=runs", f"logging.run_name={RUN}"])
    with MetricsLogger(run, LoggingConfig(wandb_mode="disabled")) as logger:
        for step in range(1, 4):
            logger.log(step, {"rl/score_mean": 0.1 * step, "rl/kl": 0.01 * step, "experience/response_len": 9.0,
                              "losses/policy": -0.1, "time/generate_s": 1.0, "time/update_s": 0.5}, stage="rl")
    (run / "config.yaml").write_text(to_yaml(cfg))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _argv(words: list[str]) -> tuple[list[str], str | None]:
    """The arguments after the script, `runs/<run>` filled in, and a `> FILE` redirect split off."""
    argv = [w.replace("<run>", RUN) for w in words[1:]]
    if ">" in argv:
        return argv[:argv.index(">")], argv[argv.index(">") + 1]
    return argv, None


def test_the_section_has_the_commands_this_test_knows():
    cmds = readme_commands()
    assert len(cmds) >= 8
    for words in cmds:
        assert words[0] == PREFIX, f"{shlex.join(words)}: the section's commands start with {PREFIX} (run from the checkout)"
        args = parse_args(_argv(words)[0])  # SystemExit: the CLI refuses the command as written
        assert _kind(args) in CHEAP | PARSED_ONLY, f"{shlex.join(words)}: a new README command; teach this test to run it"


def test_using_it_commands_run_as_written(scratch, capsys):
    checked: set[tuple[str, ...]] = set()  # preflights already run (eval and serve share demo.yaml's)
    for words in readme_commands():
        line = shlex.join(words)
        argv, redirect = _argv(words)
        parsed = parse_args(argv)  # SystemExit here: the CLI refuses the command as written
        command, args = _kind(parsed)[0], parsed[2]  # the subcommand and its typed arguments
        for word in argv:
            if word.endswith((".yaml", ".yml")):
                assert Path(word).is_file(), f"{line}: {word} does not exist"
        kind = _kind(parsed)
        if kind in CHEAP:
            code, out, err = _run(capsys, argv)
            checked.add(tuple(argv))
            assert code == 0, f"{line}: exit {code}: {err}"
            if redirect:
                Path(redirect).write_text(out)
            _check_output(kind, argv, out, line)
        elif command == "generate":  # needs a finished run's policy: parsed (above) only
            assert args.best_of is None or int(args.best_of) >= 2, f"{line}: --best-of takes N >= 2"
        elif command == "train" and args.resume is not None:
            from tidal.commands.train import resume_config

            assert args.config is None, f"{line}: a resume takes no config file"
            resume_config(Path(args.resume), list(args.overrides))  # ConfigError: a resume refuses these overrides
        else:
            config, overrides = args.config, list(args.overrides)
            # the checks `tidal train` (and submit) run before Ray starts, through the real CLI
            check = ("config", "show", *([config] if config else []), *overrides, "--check")
            if check not in checked:
                code, _, err = _run(capsys, list(check))
                assert code == 0, f"{line}: its preflight fails: {err}"
                checked.add(check)
            if command == "eval":
                assert all("=" in r for r in args.run), f"{line}: --run takes NAME=RUN_DIR"


def _check_output(kind, argv: list[str], out: str, line: str) -> None:
    if kind == ("config", "show") and "--doc" not in argv:
        shown = yaml.safe_load(out)  # the resolved config, with each override applied
        for override in [a for a in argv if "=" in a]:
            key, value = override.split("=", 1)
            node = shown
            for part in key.split("."):
                node = node[part]
            want = yaml.safe_load(value)
            if isinstance(want, str) and re.fullmatch(r"[-+]?[\d.]+e[-+]?\d+", want):
                want = float(want)  # 1e-6: a float to tidal, a string to YAML 1.1
            assert node == want, (line, key, node)
    if kind == ("data", "sentiment"):
        folder = Path(argv[-1])
        assert {p.name for p in folder.glob("*.jsonl")} >= {"prompts_train.jsonl", "comparisons_train.jsonl"}, line
    if kind == ("report", None):
        run = Path(argv[-1])
        assert (run / "dashboard.png").is_file() and list((run / "plots").glob("*.png")), line


def test_the_doc_flag_of_the_first_command(scratch, capsys):
    """The first line's comment promises `--doc`: the resolved value with each field's documentation."""
    words = readme_commands()[0]
    assert words[1:3] == ["config", "show"] and "--doc" in using_it()
    code, out, err = _run(capsys, [*words[1:], "--doc"])
    assert code == 0, err
    override = next(w for w in words if "=" in w)
    key = override.split("=", 1)[0]
    line = next((ln for ln in out.splitlines() if ln.startswith(f"{key} = ")), None)
    assert line is not None and "(default" in line and "  # " in line, line


def test_the_reward_template_works_the_way_it_says(scratch, capsys, monkeypatch):
    """`tidal reward template > my_rewards.py`, then the check its own text and docs/rewards.md
    give: on PYTHONPATH, named in reward.terms, `config show --check` accepts it."""
    code, out, _ = _run(capsys, ["reward", "template"])
    assert code == 0
    (scratch / "my_rewards.py").write_text(out)
    target = re.search(r'target: "([\w.]+:\w+)"', out).group(1)
    monkeypatch.syspath_prepend(str(scratch))  # PYTHONPATH=. as docs/rewards.md says
    try:
        code, _, err = _run(capsys, ["config", "show", "configs/tiny_ppo.yaml", "reward.terms.0.kind=function",
                                     f"reward.terms.0.target={target}", "--check"])
        assert code == 0, err
    finally:
        sys.modules.pop(target.split(":")[0], None)


def test_the_error_example_prints_as_shown(scratch, capsys):
    examples = readme_error_examples()
    assert examples, "the section's example of a config error is gone"
    for argv, shown in examples:
        assert argv[0] == "tidal"
        code, out, err = _run(capsys, argv[1:])
        assert code == 2 and out == "", (argv, err)
        assert err.strip().startswith(shown.split("...")[0].strip()), (shown, err)


def test_the_console_script_runs_from_the_checkout():
    """`.venv/bin/tidal --help` itself (the entry point, not main()): it lists every subcommand
    the section uses."""
    script = _console_script()
    if script is None:
        pytest.skip(f"no {PREFIX} here and no tidal script next to {sys.executable}")
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr
    for words in readme_commands():
        assert words[1] in res.stdout, words[1]


@pytest.mark.slow
def test_train_and_report_as_written(scratch):
    """The train commands for real (tiny configs, Ray, vLLM), in order, through the console
    script, then `report` on the run they made."""
    script = _console_script()
    if script is None:
        pytest.skip(f"no {PREFIX} here and no tidal script next to {sys.executable}")
    env = {**os.environ, "WANDB_MODE": "disabled", "TMPDIR": str(scratch)}
    cmds = readme_commands()
    data = next(w for w in cmds if w[1:3] == ["data", "sentiment"])
    trains = [w for w in cmds if w[1] == "train" and "--resume" not in w]
    assert trains
    for words in [data, *trains]:
        res = subprocess.run([str(script), *words[1:]], capture_output=True, text=True, timeout=900, cwd=scratch, env=env)
        assert res.returncode == 0, (shlex.join(words), res.stderr[-3000:])
    runs = sorted(p for p in (scratch / "runs").iterdir() if p.name != RUN and (p / "summary.json").is_file())
    assert len(runs) == len(trains), [p.name for p in (scratch / "runs").iterdir()]
    res = subprocess.run([str(script), "report", str(runs[0])], capture_output=True, text=True, timeout=300, cwd=scratch,
                         env=env)
    assert res.returncode == 0 and (runs[0] / "dashboard.png").is_file(), res.stderr[-3000:]
