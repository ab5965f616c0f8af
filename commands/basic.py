"""The subcommands that start nothing: `tidal config show`, `tidal data sentiment`,
`tidal report`, `tidal reward template`."""

from __future__ import annotations

import sys

from tidal.commands.args import ConfigShowArgs, DataSentimentArgs, NoArgs, ReportArgs
from tidal.common.config import ConfigError


def config_show(args: ConfigShowArgs) -> int:
    from tidal.common.config import describe, load_config, to_yaml

    cfg = load_config(args.config, list(args.overrides))
    checked = None
    if args.check:
        from tidal.driver.preflight import preflight

        checked = preflight(cfg)  # data, models, reward functions; the built-in task's files may not exist yet
    print("\n".join(describe(cfg)) if args.doc else to_yaml(cfg), end="\n" if args.doc else "")
    if checked is not None:  # on stderr: stdout stays the config, for a pipe or a file
        sys.stdout.flush()
        print("tidal: preflight passed: what `tidal train` checks before Ray starts\n"
              + "".join(f"  {line}\n" for line in checked), end="", file=sys.stderr, flush=True)
    return 0


def data_sentiment(args: DataSentimentArgs) -> int:
    from tidal.common.sentiment import sentiment_paths, write_sentiment_task

    existing = [str(p) for p in sentiment_paths(args.outdir, args.format).values() if p.exists()]
    if existing:  # never overwrite a file a user may have edited
        raise ConfigError(f"{existing[0]} exists ({len(existing)} of the task's files are there); choose an empty "
                          f"folder, or delete the files to rebuild them.")
    paths = write_sentiment_task(args.outdir, seed=args.seed, fmt=args.format, max_per_split=args.max_rows)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def report(args: ReportArgs) -> int:
    from tidal.common.dashboard import plot_dashboard, plot_run

    try:
        paths = [plot_dashboard(args.run_dir), *plot_run(args.run_dir)]
    except (FileNotFoundError, ValueError) as e:  # no metrics.jsonl, or nothing in it to plot
        raise ConfigError(f"{args.run_dir}: {e}") from None
    for path in paths:
        print(path)
    return 0


def reward_template(args: NoArgs) -> int:
    from tidal.reward_service.rules import TEMPLATE

    print(TEMPLATE, end="")
    return 0
