"""The `tidal` command: everything a user runs is reachable from here.

`COMMANDS` is the table of subcommands: each has its typed arguments (a dataclass of
tidal.commands.args, from which its argparse parser is built) and the function that runs it.
Implementations are imported lazily, so `tidal config show` stays fast and starts neither Ray,
vLLM nor DeepSpeed. Every user error (tidal.common.errors.UserError, and files the user named
that cannot be written) leaves through one path: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable

from tidal.commands import args as A

# -------------------------------------------------------------------------- the implementations


def _train(a: A.TrainArgs) -> int:
    from tidal.commands.train import train_from_cli

    return train_from_cli(a.config, list(a.overrides), resume=a.resume, verbose=a.verbose)


def _submit(a: A.SubmitArgs) -> int:
    from tidal.commands.submit import submit

    return submit(a.config, list(a.overrides), address=a.address, follow=not a.no_wait, resume=a.resume)


def _eval(a: A.EvalArgs) -> int:
    from tidal.commands.evaluate import eval_from_cli

    return eval_from_cli(a)


def _generate(a: A.GenerateArgs) -> int:
    from tidal.commands.generate import generate_from_cli

    return generate_from_cli(a)


def _reward_serve(a: A.RewardServeArgs) -> int:
    from tidal.reward_service.server import serve_from_cli

    return serve_from_cli(a.config, list(a.overrides), host=a.host, port=a.port, token_env=a.token_env)


def _config_show(a: A.ConfigShowArgs) -> int:
    from tidal.commands.basic import config_show

    return config_show(a)


def _data_sentiment(a: A.DataSentimentArgs) -> int:
    from tidal.commands.basic import data_sentiment

    return data_sentiment(a)


def _report(a: A.ReportArgs) -> int:
    from tidal.commands.basic import report

    return report(a)


def _reward_template(a: A.NoArgs) -> int:
    from tidal.commands.basic import reward_template

    return reward_template(a)


def _label_serve(a: A.LabelServeArgs) -> int:
    from tidal.feedback.cli import serve

    return serve(a.dir, host=a.host, port=a.port)


def _label_add_labeler(a: A.LabelAddLabelerArgs) -> int:
    from tidal.feedback.cli import add_labeler

    return add_labeler(a.dir, a.name, a.admin)


def _label_add_tasks(a: A.LabelAddTasksArgs) -> int:
    from tidal.feedback.cli import add_tasks

    return add_tasks(a.dir, a.file, a.overlap, a.flags)


def _label_set(a: A.LabelSetArgs) -> int:
    from tidal.feedback.cli import configure

    return configure(a.dir, a.guidelines, a.likert, a.edit_minutes)


def _label_status(a: A.LabelStatusArgs) -> int:
    from tidal.feedback.cli import status

    return status(a.dir)


def _label_export(a: A.LabelExportArgs) -> int:
    from tidal.feedback.cli import export

    return export(a.dir, a.out, a.format, a.include_gold)


def _label_tasks(a: A.LabelTasksArgs) -> int:
    from tidal.commands.label_tasks import tasks_from_cli

    return tasks_from_cli(a)


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # ("label", "serve") is `tidal label serve`
    args: type  # its typed arguments (tidal.commands.args)
    run: Callable[[Any], int]  # returns the exit status
    help: str


GROUPS = {"config": "inspect configs", "data": "build datasets", "reward": "reward service",
          "label": "human feedback: the labeling web app and its store"}
COMMANDS: tuple[Command, ...] = (
    Command(("config", "show"), A.ConfigShowArgs, _config_show,
            "print the resolved config (file + overrides), validated"),
    Command(("data", "sentiment"), A.DataSentimentArgs, _data_sentiment,
            "write the built-in sentiment task (prompts, demonstrations, comparisons, rankings)"),
    Command(("report",), A.ReportArgs, _report, "plot a run's metrics: RUN/dashboard.png and RUN/plots/*.png"),
    Command(("train",), A.TrainArgs, _train, f"run the stages a config lists ({A.STAGE_NAMES})"),
    Command(("submit",), A.SubmitArgs, _submit, "submit `tidal train` to a Ray cluster as a Ray job"),
    Command(("eval",), A.EvalArgs, _eval, "compare finished policies against SFT on held-out prompts (gold "
            "win-rate, proxy, KL, length, degenerate share); writes eval.json and eval.png"),
    Command(("generate",), A.GenerateArgs, _generate, "a policy's completions for prompts from a file or stdin; "
            "--best-of N answers with the best of N samples by the config's reward"),
    Command(("reward", "serve"), A.RewardServeArgs, _reward_serve, "serve the configured reward over HTTP (JSON)"),
    Command(("reward", "template"), A.NoArgs, _reward_template,
            "print a user reward function module to start from (docs/rewards.md)"),
    Command(("label", "serve"), A.LabelServeArgs, _label_serve, "serve the labeling app for a feedback folder"),
    Command(("label", "add-labeler"), A.LabelAddLabelerArgs, _label_add_labeler,
            "register a labeler and print its token (once)"),
    Command(("label", "add-tasks"), A.LabelAddTasksArgs, _label_add_tasks,
            "add tasks from a JSON-lines file {prompt, responses, [gold_ranking]}"),
    Command(("label", "set"), A.LabelSetArgs, _label_set,
            "the page's settings for a feedback folder: guidelines, Likert scores, edit window"),
    Command(("label", "tasks"), A.LabelTasksArgs, _label_tasks,
            "add tasks sampled from models (runs, the SFT model) and reference answers"),
    Command(("label", "status"), A.LabelStatusArgs, _label_status, "queue, per-labeler counts, agreement"),
    Command(("label", "export"), A.LabelExportArgs, _label_export,
            "write the labels as rankings, comparisons or ratings (JSON lines)"),
)

# -------------------------------------------------------------------------- parsing


def _with_default(help: str, default: Any) -> str:
    if default is None or default is False or default in ((), "") or "default" in help:
        return help
    return f"{help} (default: {default})"


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per field of the args dataclass `cls` (see tidal.commands.args)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m, tp = f.metadata, hints[f.name]
        base = next(t for t in typing.get_args(tp) if t is not type(None)) if typing.get_origin(tp) is typing.Union else tp
        default = None if f.default is dataclasses.MISSING else f.default
        if m.get("positional"):
            kw = {k: v for k, v in (("nargs", m["nargs"]), ("metavar", m["metavar"])) if v}
            if f.default is not dataclasses.MISSING:
                kw["default"] = list(default) if isinstance(default, tuple) else default
            parser.add_argument(f.name, help=m["help"], **kw)
            continue
        kw = {"dest": f.name, "help": _with_default(m["help"], default)}
        if base is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(base) is tuple:
            kw["action"] = "append"
        else:
            kw.update(type=base, default=default)
        kw.update({k: m[k] for k in ("metavar", "choices") if m[k]})
        if m["required"]:
            kw["required"] = True
        parser.add_argument(m["flag"] or "--" + f.name.replace("_", "-"), **kw)


def _typed(cls: type, ns: argparse.Namespace) -> Any:
    """The args dataclass from a parsed namespace; the optional CONFIG positional swallows the
    first override when no file is given (`tidal train a.b=1`)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    for name, v in values.items():
        if isinstance(v, list) or (v is None and name in ("run", "sources")):
            values[name] = tuple(v or ())
    config = values.get("config")
    if "overrides" in values and config is not None and "=" in config and not config.endswith((".yaml", ".yml")) \
            and typing.get_type_hints(cls)["config"] != str:
        values["config"], values["overrides"] = None, (config, *values["overrides"])
    return cls(**values)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tidal")
    except PackageNotFoundError:  # a source checkout without an install
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidal", description="Distributed RLHF on Ray: SFT, reward models, "
                                "PPO/GRPO/RLOO/REINFORCE, DPO, expert iteration, human feedback.")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    p.add_argument("-V", "--version", action="version", version=f"tidal {_version()}")
    top = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for cmd in COMMANDS:
        where = top
        if len(cmd.path) == 2:
            group = cmd.path[0]
            if group not in groups:
                gp = top.add_parser(group, help=GROUPS[group], description=GROUPS[group])
                groups[group] = gp.add_subparsers(dest="action", required=True, metavar="ACTION")
            where = groups[group]
        sub = where.add_parser(cmd.path[-1], help=cmd.help, description=cmd.help)
        _add_fields(sub, cmd.args)
        sub.set_defaults(command_entry=cmd)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Command, Any]:
    """(namespace, command, its typed args). Overrides may follow options (`--resume RUN
    algorithm.steps=80`, `--address URL a.b=1`): argparse stops filling a positional list at the
    first option, so the rest come back as extras; the ones shaped like overrides join the list,
    anything else is an error."""
    parser = build_parser()
    ns, extras = parser.parse_known_args(argv)
    if "--debug" in extras:  # also accepted after the subcommand: `tidal train ... --debug`
        ns.debug, extras = True, [e for e in extras if e != "--debug"]
    if extras and hasattr(ns, "overrides"):
        if getattr(ns, "config", "x") is None and "=" not in extras[0] and not extras[0].startswith("-"):
            ns.config, extras = extras[0], extras[1:]
        ns.overrides = list(ns.overrides) + [e for e in extras if "=" in e and not e.startswith("-")]
        extras = [e for e in extras if "=" not in e or e.startswith("-")]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    cmd = ns.command_entry
    return ns, cmd, _typed(cmd.args, ns)


# Errors of the files and folders a user named, not of tidal: a folder that is a file, no
# permission, a full disk (or a quota, or a file size limit).
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOSPC, errno.EROFS, errno.EEXIST,
                errno.EFBIG, errno.EDQUOT, errno.ENAMETOOLONG}


def main(argv: list[str] | None = None) -> int:
    from tidal.common.errors import UserError

    ns, cmd, args = parse_args(argv)
    try:
        code = int(cmd.run(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) shows up here, not at exit
        return code
    except UserError as e:  # the user's input: one line, exit 2 (tidal's own bugs keep their traceback)
        if ns.debug:
            raise
        print(f"tidal: {e.kind}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tidal config show --doc | head`: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise complain again flushing stdout at exit
        return 0
    except OSError as e:
        if ns.debug or e.errno not in _USER_ERRNOS or not e.filename:
            raise
        print(f"tidal: file error: {e.filename}: {e.strerror} (check the path and its permissions)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
