"""The `tidal` command: everything a user runs is reachable from here.

Subcommands import their implementation lazily so `tidal config show` stays fast and does
not start Ray, vLLM or DeepSpeed.
"""

from __future__ import annotations

import argparse
import sys


def _config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The optional CONFIG positional swallows the first override when no file is given."""
    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def _config_show(args: argparse.Namespace) -> int:
    from tidal.common.config import describe, load_config, to_yaml

    if args.doc:
        print("\n".join(describe()))
        return 0
    print(to_yaml(load_config(*_config_args(args))), end="")
    return 0


def _data_sentiment(args: argparse.Namespace) -> int:
    from tidal.common.sentiment import write_sentiment_task

    paths = write_sentiment_task(args.outdir, seed=args.seed, fmt=args.format, max_per_split=args.max_rows)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from tidal.common.metrics import plot_run

    try:
        paths = plot_run(args.run_dir)
    except (FileNotFoundError, ValueError) as e:  # no metrics.jsonl, or nothing in it to plot
        print(f"tidal report: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _train(args: argparse.Namespace) -> int:
    from tidal.cluster.driver import train_from_cli

    config, overrides = _config_args(args)
    return train_from_cli(config, overrides, resume=args.resume)


def _submit(args: argparse.Namespace) -> int:
    from tidal.cluster.submit import submit

    return submit(args.config, args.overrides, address=args.address, follow=not args.no_wait)


def _reward_serve(args: argparse.Namespace) -> int:
    from tidal.reward_service.server import serve_from_cli

    config, overrides = _config_args(args)
    return serve_from_cli(config, overrides, host=args.host, port=args.port, token_env=args.token_env)


def _eval(args: argparse.Namespace) -> int:
    from tidal.cluster.evaluate import eval_from_cli

    config, overrides = _config_args(args)
    return eval_from_cli(config, overrides, args.run, args.sft, args.best_of, args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidal", description="Distributed RLHF on Ray: SFT, reward models, PPO/GRPO/RLOO/REINFORCE.")
    sub = p.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print the resolved config (file + overrides), validated")
    show.add_argument("config", nargs="?", default=None, help="YAML config (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-6")
    show.add_argument("--doc", action="store_true", help="list every field with its default and documentation")
    show.set_defaults(fn=_config_show)

    data = sub.add_parser("data", help="build datasets").add_subparsers(dest="action", required=True)
    sent = data.add_parser("sentiment", help="write the built-in sentiment task (prompts, demonstrations, comparisons, rankings)")
    sent.add_argument("outdir")
    sent.add_argument("--seed", type=int, default=0)
    sent.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    sent.add_argument("--max-rows", type=int, default=None, help="cap rows per file")
    sent.set_defaults(fn=_data_sentiment)

    rep = sub.add_parser("report", help="plot a run's metrics to PNG files")
    rep.add_argument("run_dir")
    rep.set_defaults(fn=_report)

    tr = sub.add_parser("train", help="run the stages a config lists (sft, rm, rl)")
    tr.add_argument("config", nargs="?", default=None)
    tr.add_argument("overrides", nargs="*")
    tr.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its last checkpoint")
    tr.set_defaults(fn=_train)

    sb = sub.add_parser("submit", help="submit `tidal train` to a Ray cluster as a Ray job")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HOST:8265")
    sb.add_argument("--no-wait", action="store_true", help="return after submission instead of following logs")
    sb.set_defaults(fn=_submit)

    ev = sub.add_parser("eval", help="compare finished policies against SFT on held-out prompts (gold win-rate, "
                                     "proxy, KL, length, degenerate share); writes eval.json and eval.png")
    ev.add_argument("config", nargs="?", default=None)
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="a policy to compare: a run directory (its policy/ or policy_dpo/) or an HF folder; repeatable")
    ev.add_argument("--sft", default=None, help="the baseline (default: a run's sft stage output, else model.policy)")
    ev.add_argument("--best-of", type=int, default=1, metavar="N", help="also score best-of-N over SFT by the proxy")
    ev.add_argument("--out", default=None, help="output folder (default: logging.output_dir/eval)")
    ev.set_defaults(fn=_eval)

    rw = sub.add_parser("reward", help="reward service").add_subparsers(dest="action", required=True)
    serve = rw.add_parser("serve", help="serve the configured reward over HTTP (JSON)")
    serve.add_argument("config", nargs="?", default=None)
    serve.add_argument("overrides", nargs="*")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (localhost unless told otherwise)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-env", default="TIDAL_REWARD_TOKEN", help="env var holding the bearer token")
    serve.set_defaults(fn=_reward_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from tidal.common.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"tidal: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
