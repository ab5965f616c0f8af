"""The `tidal` command: everything a user runs is reachable from here.

Subcommands import their implementation lazily so `tidal config show` stays fast and does
not start Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import sys


def _config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional CONFIG positional swallows the first override when no file is given."""
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _config_show(args: argparse.Namespace) -> int:
    from tidal.common.config import describe, load_config, to_yaml

    cfg = load_config(*_config_args(args))
    if args.check:
        from tidal.driver.preflight import preflight

        preflight(cfg)  # data, models, reward functions; the built-in task's files may not exist yet
    print("\n".join(describe(cfg)) if args.doc else to_yaml(cfg), end="\n" if args.doc else "")
    return 0


def _data_sentiment(args: argparse.Namespace) -> int:
    from tidal.common.config import ConfigError
    from tidal.common.sentiment import sentiment_paths, write_sentiment_task

    existing = [str(p) for p in sentiment_paths(args.outdir, args.format).values() if p.exists()]
    if existing:  # never overwrite a file a user may have edited
        raise ConfigError(f"{existing[0]} exists ({len(existing)} of the task's files are there); choose an empty "
                          f"folder, or delete the files to rebuild them.")
    paths = write_sentiment_task(args.outdir, seed=args.seed, fmt=args.format, max_per_split=args.max_rows)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tidal.common.dashboard import plot_dashboard
    from tidal.common.metrics import plot_run

    try:
        paths = [plot_dashboard(args.run_dir), *plot_run(args.run_dir)]
    except (FileNotFoundError, ValueError) as e:  # no metrics.jsonl, or nothing in it to plot
        print(f"tidal report: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from tidal.commands.train import train_from_cli

    config, overrides = _config_args(args)
    return train_from_cli(config, overrides, resume=args.resume, verbose=args.verbose)


def _reward_template(args: argparse.Namespace) -> int:
    from tidal.reward_service.rules import TEMPLATE

    print(TEMPLATE, end="")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from tidal.commands.submit import submit

    return submit(args.config, args.overrides, address=args.address, follow=not args.no_wait)


def _reward_serve(args: argparse.Namespace) -> int:
    from tidal.reward_service.server import serve_from_cli

    config, overrides = _config_args(args)
    return serve_from_cli(config, overrides, host=args.host, port=args.port, token_env=args.token_env)


def _eval(args: argparse.Namespace) -> int:
    from tidal.commands.evaluate import eval_from_cli

    config, overrides = _config_args(args)
    return eval_from_cli(config, overrides, args.run, args.sft, args.best_of, args.out)


def _generate(args: argparse.Namespace) -> int:
    from tidal.commands.generate import GenerateArgs, generate_from_cli

    config, overrides = _config_args(args)
    return generate_from_cli(GenerateArgs(config, overrides, model=args.model, best_of=args.best_of, inp=args.inp,
                                          in_format=args.in_format, out=args.out, json=args.json, all=args.all,
                                          score=args.score))


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="a policy's completions for prompts from a file or stdin; --best-of N "
                                          "answers with the best of N samples by the config's reward")
    gen.add_argument("config", nargs="?", default=None, help="YAML config: model.policy, rollout.*, reward.*")
    gen.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    gen.add_argument("--model", default=None, metavar="PATH",
                     help="a run directory (its newest sft/dpo/rl policy; its config.yaml when no CONFIG is given) "
                          "or an HF folder; none: model.policy")
    gen.add_argument("--best-of", default="1", metavar="N",
                     help="sample N per prompt and keep the one the config's reward scores highest")
    gen.add_argument("--in", dest="inp", default="-", metavar="FILE",
                     help="prompts: .jsonl/.json/.parquet rows with 'prompt' (or 'messages'), any other file one "
                          "prompt per line; '-' is stdin")
    gen.add_argument("--in-format", choices=["auto", "jsonl", "txt"], default="auto",
                     help="how --in is read; auto: by its suffix, stdin one prompt per line")
    gen.add_argument("--out", default=None, metavar="FILE",
                     help="write JSON lines {prompt, completion, score, candidates} here (never overwrites a file)")
    gen.add_argument("--json", action="store_true",
                     help="stdout gets JSON lines rows instead of one completion per line")
    gen.add_argument("--all", action="store_true",
                     help="with --best-of N: add all N samples and their scores to each row (JSON rows)")
    gen.add_argument("--score", action="store_true", help="score the completions by the reward also without --best-of")
    gen.set_defaults(fn=_generate)


def _label(args: argparse.Namespace) -> int:
    from tidal.feedback import cli

    if args.action == "serve":
        return cli.serve(args.dir, host=args.host, port=args.port)
    if args.action == "add-labeler":
        return cli.add_labeler(args.dir, args.name, args.admin)
    if args.action == "add-tasks":
        return cli.add_tasks(args.dir, args.file, args.overlap, args.flags)
    if args.action == "status":
        return cli.status(args.dir)
    if args.action == "tasks":
        from tidal.commands.label_tasks import tasks_from_cli

        config, overrides = _config_args(args)
        return tasks_from_cli(args.dir, config, overrides, args.sources, args.prompts, args.responses, args.sft,
                              args.overlap)
    return cli.export(args.dir, args.out, args.format, args.include_gold)


def _label_parser(sub) -> None:
    lb = sub.add_parser("label", help="human feedback: the labeling web app and its store").add_subparsers(dest="action", required=True)
    srv = lb.add_parser("serve", help="serve the labeling app for a feedback folder")
    srv.add_argument("dir", help="feedback folder (holds feedback.sqlite)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (localhost unless told otherwise)")
    srv.add_argument("--port", type=int, default=8080)
    lab = lb.add_parser("add-labeler", help="register a labeler and print its token (once)")
    lab.add_argument("dir")
    lab.add_argument("name")
    lab.add_argument("--admin", action="store_true", help="may open the researcher page and export")
    tsk = lb.add_parser("add-tasks", help="add tasks from a JSON-lines file {prompt, responses, [gold_ranking]}")
    tsk.add_argument("dir")
    tsk.add_argument("file")
    tsk.add_argument("--overlap", type=float, default=None, help="share of tasks given to 2+ labelers (default: the store's, 0.1)")
    tsk.add_argument("--flags", default=None, help="the per-response flags the page offers, ';'-separated (before labeling starts)")
    gen = lb.add_parser("tasks", help="add tasks sampled from models (runs, the SFT model) and reference answers")
    gen.add_argument("dir", help="feedback folder (created if missing; its tasks stay)")
    gen.add_argument("config", nargs="?", default=None, help="YAML config: prompt data, rollout settings")
    gen.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    gen.add_argument("--from", dest="sources", action="append", default=[], metavar="SOURCE",
                     help="NAME=RUN_DIR (a run's final policy or an HF folder), sft, or references; repeatable")
    gen.add_argument("--prompts", type=int, default=16, metavar="M", help="prompts (tasks) to sample")
    gen.add_argument("--responses", type=int, default=2, metavar="K", help="responses per prompt from each model source")
    gen.add_argument("--sft", default=None, help="the SFT model for --from sft (default: a run's sft stage output, else model.policy)")
    gen.add_argument("--overlap", type=float, default=None, help="share of tasks given to 2+ labelers (default: the store's, 0.1)")
    st = lb.add_parser("status", help="queue, per-labeler counts, agreement")
    st.add_argument("dir")
    ex = lb.add_parser("export", help="write the labels as rankings, comparisons or ratings (JSON lines)")
    ex.add_argument("dir")
    ex.add_argument("out")
    ex.add_argument("--format", choices=["rankings", "comparisons", "ratings"], default="rankings")
    ex.add_argument("--include-gold", action="store_true", help="also export labels of gold tasks")
    for p in (srv, lab, tsk, gen, st, ex):
        p.set_defaults(fn=_label)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default."""


def _subparsers(parser: argparse.ArgumentParser, dest: str):
    sub = parser.add_subparsers(dest=dest, required=True)
    add = sub.add_parser
    sub.add_parser = lambda *a, **kw: add(*a, formatter_class=_Help, **kw)  # type: ignore[method-assign]
    return sub


OVERRIDES_HELP = "dotted overrides, e.g. learner.lr=1e-6 or reward.terms[0].weight=0.5 (also after options)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidal", formatter_class=_Help,
                                description="Distributed RLHF on Ray: SFT, reward models, PPO/GRPO/RLOO/REINFORCE.")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    sub = _subparsers(p, "command")

    cfg = _subparsers(sub.add_parser("config", help="inspect configs"), "action")
    show = cfg.add_parser("show", help="print the resolved config (file + overrides), validated")
    show.add_argument("config", nargs="?", default=None, help="YAML config (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.add_argument("--doc", action="store_true", help="list every field with its resolved value and documentation")
    show.add_argument("--check", action="store_true",
                      help="also run the preflight checks of `tidal train` (data rows, models, reward functions)")
    show.set_defaults(fn=_config_show)

    data = _subparsers(sub.add_parser("data", help="build datasets"), "action")
    sent = data.add_parser("sentiment", help="write the built-in sentiment task (prompts, demonstrations, comparisons, rankings)")
    sent.add_argument("outdir", help="an empty or new folder (existing files are never overwritten)")
    sent.add_argument("--seed", type=int, default=0, help="seed of the split and the row order")
    sent.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="file format")
    sent.add_argument("--max-rows", type=int, default=None, help="cap rows per file")
    sent.set_defaults(fn=_data_sentiment)

    rep = sub.add_parser("report", help="plot a run's metrics: RUN/dashboard.png and RUN/plots/*.png")
    rep.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    rep.set_defaults(fn=_report)

    tr = sub.add_parser("train", help="run the stages a config lists (sft, rm, rl, collect)")
    tr.add_argument("config", nargs="?", default=None, help="YAML config (omit for the defaults)")
    tr.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    tr.add_argument("--resume", metavar="RUN_DIR", default=None,
                    help="continue a run from its last checkpoint (overrides: algorithm.steps, logging.*)")
    tr.add_argument("--verbose", action="store_true",
                    help="show worker and engine logs on the console (by default they go to RUN/logs/ray)")
    tr.set_defaults(fn=_train)

    sb = sub.add_parser("submit", help="submit `tidal train` to a Ray cluster as a Ray job")
    sb.add_argument("config", help="YAML config, inside the current folder (it is uploaded)")
    sb.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    sb.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HOST:8265")
    sb.add_argument("--no-wait", action="store_true", help="return after submission instead of following logs")
    sb.set_defaults(fn=_submit)

    ev = sub.add_parser("eval", help="compare finished policies against SFT on held-out prompts (gold win-rate, "
                                     "proxy, KL, length, degenerate share); writes eval.json and eval.png")
    ev.add_argument("config", nargs="?", default=None)
    ev.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    ev.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="a policy to compare: a run directory (its policy/ or policy_dpo/) or an HF folder; repeatable")
    ev.add_argument("--sft", default=None, help="the baseline (default: a run's sft stage output, else model.policy)")
    ev.add_argument("--best-of", type=int, default=1, metavar="N", help="also score best-of-N over SFT by the proxy")
    ev.add_argument("--out", default=None, help="output folder (default: logging.output_dir/eval)")
    ev.set_defaults(fn=_eval)

    _generate_parser(sub)

    rw = _subparsers(sub.add_parser("reward", help="reward service"), "action")
    serve = rw.add_parser("serve", help="serve the configured reward over HTTP (JSON)")
    serve.add_argument("config", nargs="?", default=None)
    serve.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (localhost unless told otherwise)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--token-env", default="TIDAL_REWARD_TOKEN", help="env var holding the bearer token")
    serve.set_defaults(fn=_reward_serve)
    tpl = rw.add_parser("template", help="print a user reward function module to start from (docs/rewards.md)")
    tpl.set_defaults(fn=_reward_template)
    _label_parser(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides may follow options (`--resume RUN algorithm.steps=80`, `--address URL a.b=1`):
    argparse stops filling a positional list at the first option, so the rest come back as
    extras; the ones shaped like overrides join the list, anything else is an error."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if "--debug" in extras:  # also accepted after the subcommand: `tidal train ... --debug`
        args.debug, extras = True, [e for e in extras if e != "--debug"]
    if extras and hasattr(args, "overrides"):
        if getattr(args, "config", "x") is None and "=" not in extras[0] and not extras[0].startswith("-"):
            args.config, extras = extras[0], extras[1:]
        args.overrides = list(args.overrides) + [e for e in extras if "=" in e and not e.startswith("-")]
        extras = [e for e in extras if "=" not in e or e.startswith("-")]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from tidal.driver.preflight import PreflightError
    from tidal.common.config import ConfigError
    from tidal.common.data import DataError

    args = parse_args(argv)
    try:
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left (`| head`) shows up here, not at exit
        return code
    except (ConfigError, DataError) as e:  # the user's input: one line, exit 2 (tidal's own bugs keep their traceback)
        if args.debug:
            raise
        kind = "data error" if isinstance(e, DataError) else "preflight" if isinstance(e, PreflightError) else "config error"
        print(f"tidal: {kind}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tidal config show --doc | head`: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would otherwise complain again flushing stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
