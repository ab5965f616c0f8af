"""Every `tidal` command of README.md and docs/*.md, read from the pages themselves so they
cannot drift.

Each command is taken as written (`.venv/bin/tidal ...` or `tidal ...`, run from a scratch
folder laid out like the checkout: `configs/` and `.venv` as links, a finished run for
`runs/<run>`, `RUN`, `runs/ppo-1`). A synopsis's optional `[...]` parts are left out, `\`
continuations joined, and the tidal side of a pipe taken with the pipe's text as its stdin.
Every command must parse with the real argument parser, name config files that exist, and
carry overrides its config accepts. The cheap ones run for real, in order, as a new user would:
`config show` (plus `--doc` and `--check`), `data sentiment`, `report` (on the run made here),
`reward template > FILE` (then checked the way its own text says), and the label commands that
need no model. The expensive ones run up to where Ray would start: `train`, `submit` and
`reward serve` through the preflight `tidal train` runs (`config show ... --check`), `--resume`
through the resume rules, `eval` and `generate` through every check they make before Ray
(`plan_eval`, `plan_generate`), `label tasks` through its sources and models. `label serve`
serves until stopped: parsed only. `@pytest.mark.slow` runs `train` and `eval` for real.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
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
CHEAP = {("config", "show"), ("data", "sentiment"), ("report", None), ("reward", "template"), ("label", "add-tasks"),
         ("label", "set"), ("label", "add-labeler"), ("label", "status"), ("label", "export")}
PARSED_ONLY = {("train", None), ("submit", None), ("eval", None), ("reward", "serve"), ("generate", None),
               ("label", "tasks"), ("label", "serve")}
# What the pages' placeholders stand for here: a finished run (runs/<run> in the README, RUN and
# runs/ppo-1 / runs/dpo-1 in docs/alternatives.md, the four arms' runs in docs/feedback.md).
PLACEHOLDERS = ((r"runs/<run>", f"runs/{RUN}"), (r"runs/(ppo|dpo)-1", f"runs/{RUN}"), (r"(?<![\w/])RUN/", f"runs/{RUN}/"),
                (r"runs/arms/(static|rounds|random|active)\b", f"runs/{RUN}"))


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


def page_commands(text: str) -> list[tuple[list[str], str | None]]:
    """(words, stdin) of each tidal command in a page's bash blocks: continuations joined,
    optional `[...]` parts dropped, `printf TEXT | tidal ...` as the command with TEXT on stdin."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(re.sub(r"\[[^\]]*\]", "", line), comments=True)
            stdin = None
            if "|" in words:
                left, words = words[:words.index("|")], words[words.index("|") + 1:]
                stdin = left[1].encode().decode("unicode_escape") if left[:1] == ["printf"] else None
            if words and words[0] in (PREFIX, "tidal"):
                out.append((words, stdin))
    return out


def all_commands() -> list[tuple[str, list[str], str | None]]:
    """(page, words, stdin) of every tidal command of README.md and docs/*.md, README first."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [(p.name, words, stdin) for p in pages for words, stdin in page_commands(p.read_text())]


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


def finished_run(run: Path, base: Path) -> None:
    """What `tidal train` leaves in a run folder that eval, generate and label tasks read: the
    sft, rm and rl outputs (copies of the HF folder `base`, a reward model on its backbone)."""
    from tidal.common.models import load_tokenizer, load_value_model, save_value_model

    for sub in ("sft", "policy"):
        shutil.copytree(base, run / sub)
    save_value_model(load_value_model(base), run / "reward_model", {"reward_mean": 0.0, "reward_std": 1.0},
                     tokenizer=load_tokenizer(base))
    outputs = {"sft": "sft", "rm": "reward_model", "rl": "policy"}
    (run / "run_state.json").write_text(json.dumps({"stages": {k: {"output": f"runs/{RUN}/{v}"}
                                                              for k, v in outputs.items()}}))


@pytest.fixture
def scratch(tmp_path, monkeypatch, tiny_model):
    """A folder shaped like the checkout, holding a finished run for `runs/<run>` and the files
    the pages' commands name."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    if (REPO / ".venv").is_dir():
        (tmp_path / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "prompts.txt").write_text("The film was\nDinner tonight\n")
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"prompt": "The film was", "responses": ["great", "dull"]}) + "\n")
    run = tmp_path / "runs" / RUN
    finished_run(run, tiny_model)
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
    """The arguments after the script, the placeholders filled in, and a `> FILE` redirect split off."""
    argv = words[1:]
    for pattern, value in PLACEHOLDERS:
        argv = [re.sub(pattern, value, w) for w in argv]
    if ">" in argv:
        return argv[:argv.index(">")], argv[argv.index(">") + 1]
    return argv, None


def test_the_pages_have_the_commands_this_test_knows():
    cmds = readme_commands()
    assert len(cmds) >= 8
    for words in cmds:
        assert words[0] == PREFIX, f"{shlex.join(words)}: the section's commands start with {PREFIX} (run from the checkout)"
    every = all_commands()
    assert {page for page, _, _ in every} >= {"README.md", "alternatives.md", "feedback.md"}
    for page, words, _ in every:
        args = parse_args(_argv(words)[0])  # SystemExit: the CLI refuses the command as written
        assert _kind(args) in CHEAP | PARSED_ONLY, f"{page}: {shlex.join(words)}: a new command; teach this test to run it"


def test_every_command_of_the_pages_runs_as_written(scratch, capsys, monkeypatch):
    checked: set[tuple[str, ...]] = set()  # preflights already run (eval and serve share demo.yaml's)
    for page, words, stdin in all_commands():
        line = f"{page}: {shlex.join(words)}"
        argv, redirect = _argv(words)
        parsed = parse_args(argv)  # SystemExit here: the CLI refuses the command as written
        kind, args = _kind(parsed), parsed[2]
        for word in argv:
            if word.endswith((".yaml", ".yml")):
                assert Path(word).is_file(), f"{line}: {word} does not exist"
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        if kind in CHEAP:
            code, out, err = _run(capsys, argv)
            checked.add(tuple(argv))
            assert code == 0, f"{line}: exit {code}: {err}"
            if redirect:
                Path(redirect).write_text(out)
            _check_output(kind, argv, out, line)
        else:
            _up_to_ray(kind, args, line, checked, capsys)


def _up_to_ray(kind, args, line: str, checked: set, capsys) -> None:
    """An expensive command as far as it goes before Ray starts: every check it makes there."""
    if kind == ("eval", None):
        from tidal.commands.evaluate import plan_eval

        plan = plan_eval(args)  # ConfigError: the command as written fails before Ray
        assert plan.reward_model and Path(plan.reward_model, "config.json").is_file(), line
    elif kind == ("generate", None):
        from tidal.commands.generate import plan_generate

        assert plan_generate(args).records, line
    elif kind == ("train", None) and args.resume is not None:
        from tidal.commands.train import resume_config

        assert args.config is None, f"{line}: a resume takes no config file"
        resume_config(Path(args.resume), list(args.overrides))  # ConfigError: a resume refuses these overrides
    elif kind == ("label", "tasks"):
        from tidal.commands.label_tasks import _models_and_prompts, plan_sources
        from tidal.common.config import load_config as load

        planned = plan_sources(list(args.sources), args.responses)
        models, _, prompts = _models_and_prompts(load(args.config, list(args.overrides)), args, planned)
        assert len(prompts) == args.prompts and all(Path(m, "config.json").is_file() for m in models.values()), line
    elif kind != ("label", "serve"):  # serve runs until stopped
        config, overrides = args.config, list(args.overrides)
        # the checks `tidal train` (and submit) run before Ray starts, through the real CLI
        check = ("config", "show", *([config] if config else []), *overrides, "--check")
        if check not in checked:
            code, _, err = _run(capsys, list(check))
            assert code == 0, f"{line}: its preflight fails: {err}"
            checked.add(check)


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


@pytest.mark.slow
def test_eval_as_written(scratch):
    """The README's `tidal eval` for real, through the console script, on a run whose policy and
    reward model share demo.yaml's tokenizer (SmolLM2's 2-layer build): it finds the run's reward
    model by itself, prints the scoreboard and tidal's own lines only, and writes it."""
    from tidal.common.models import resolve_model

    script = _console_script()
    if script is None:
        pytest.skip(f"no {PREFIX} here and no tidal script next to {sys.executable}")
    words = next(w for w in readme_commands() if w[1] == "eval")
    run = scratch / "runs" / RUN
    for sub in ("sft", "policy", "reward_model"):
        shutil.rmtree(run / sub)
    finished_run(run, resolve_model("smollm2-135m-2l"))
    env = {**os.environ, "WANDB_MODE": "disabled", "TMPDIR": str(scratch)}
    argv = _argv(words)[0]
    res = subprocess.run([str(script), *argv, "logging.eval_samples=8"], capture_output=True, text=True, timeout=900,
                         cwd=scratch, env=env)  # 8 of demo.yaml's 64 reporting prompts: the same command, shorter
    assert res.returncode == 0, res.stderr[-3000:]
    board = json.loads((scratch / "runs" / "eval" / "eval.json").read_text())
    assert [r["method"] for r in board["rows"]] == ["sft", "ppo", "best-of-4"]
    assert board["reward_model"] == f"runs/{RUN}/reward_model"  # the run's own, found without model.reward
    table = {"method", "sft", "ppo", "best-of-4"}
    noise = [ln for ln in res.stdout.splitlines() if not ln.startswith("tidal") and ln.split()[0] not in table]
    assert noise == [] and res.stderr == "", (noise, res.stderr[-3000:])
