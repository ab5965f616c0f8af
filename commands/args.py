"""The typed arguments of every `tidal` subcommand, one frozen dataclass each.

A field is a positional (`positional(...)`) or an option (`option(...)`); its help text, default,
choices and flag live on the field, and `commands/cli.py` builds the argparse parser from these
classes, so what a subcommand accepts, what `--help` says and what its code receives cannot
drift apart. Every subcommand's implementation takes its dataclass, never an argparse Namespace.
Checks that need nothing loaded (a number in range, a file that must exist) are the
implementation's, as one-line user errors.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any, Optional

OVERRIDES_HELP = "dotted overrides, e.g. learner.lr=1e-6 or reward.terms[0].weight=0.5 (also after options)"
CONFIG_HELP = "YAML config (omit for the defaults)"
STAGE_NAMES = "sft, rm, dpo, rl, collect"  # the stage table's names (tidal.driver.stages)


def positional(help: str, nargs: str | None = None, default: Any = MISSING, metavar: str | None = None) -> Any:
    """A positional argument; without a default it is required (and comes first in its class)."""
    meta = {"help": help, "positional": True, "nargs": nargs, "metavar": metavar}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def verbose_option(logs: str | None) -> Any:
    """--verbose of a command that starts Ray: the one console policy (tidal.driver.runtime.ray_session)."""
    where = f"by default it goes to {logs}" if logs else "by default it is dropped"
    return option(False, f"show Ray's, the workers' and the engines' output on the console ({where}; tidal's own "
                         f"lines show either way)")


def option(default: Any, help: str, flag: str | None = None, metavar: str | None = None,
           choices: tuple | None = None, required: bool = False) -> Any:
    """An option `--name` (underscores become dashes, or `flag`); a bool is a switch, a tuple
    collects repeated uses."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar, "choices": choices,
                                            "required": required})


@dataclass(frozen=True)
class ConfigShowArgs:
    config: Optional[str] = positional(CONFIG_HELP, nargs="?")
    overrides: tuple[str, ...] = positional(OVERRIDES_HELP, nargs="*", default=())
    doc: bool = option(False, "list every field with its resolved value and documentation")
    check: bool = option(False, "also run the preflight checks of `tidal train` (data rows, models, reward functions)")


@dataclass(frozen=True)
class DataSentimentArgs:
    outdir: str = positional("an empty or new folder (existing files are never overwritten)")
    seed: int = option(0, "seed of the split and the row order")
    format: str = option("jsonl", "file format", choices=("jsonl", "parquet"))
    max_rows: Optional[int] = option(None, "cap rows per file", metavar="N")


@dataclass(frozen=True)
class ReportArgs:
    run_dir: str = positional("a run directory (holds metrics.jsonl)")


@dataclass(frozen=True)
class TrainArgs:
    config: Optional[str] = positional(CONFIG_HELP, nargs="?")
    overrides: tuple[str, ...] = positional(OVERRIDES_HELP, nargs="*", default=())
    resume: Optional[str] = option(None, "continue a run from its last checkpoint (overrides: algorithm.steps, "
                                         "logging.*; more algorithm.steps extend a finished run too)",
                                   metavar="RUN_DIR")
    verbose: bool = verbose_option("RUN/logs/ray")


@dataclass(frozen=True)
class SubmitArgs:
    config: Optional[str] = positional("YAML config, inside the current folder (it is uploaded); none with --resume",
                                       nargs="?")
    overrides: tuple[str, ...] = positional(OVERRIDES_HELP, nargs="*", default=())
    address: str = option("", "Ray dashboard address, e.g. http://HOST:8265", required=True)
    resume: Optional[str] = option(None, "continue a run on the cluster from its last checkpoint: the run's absolute "
                                         "directory on the cluster's storage (overrides as for `tidal train --resume`)",
                                   metavar="RUN_DIR")
    no_wait: bool = option(False, "return after submission instead of following logs")


@dataclass(frozen=True)
class EvalArgs:
    config: Optional[str] = positional(CONFIG_HELP, nargs="?")
    overrides: tuple[str, ...] = positional(OVERRIDES_HELP, nargs="*", default=())
    run: tuple[str, ...] = option((), "a policy to compare: a run directory (its current policy) or an HF folder; "
                                      "repeatable", metavar="NAME=RUN_DIR")
    sft: Optional[str] = option(None, "the baseline (default: a run's sft stage output, else model.policy)")
    best_of: int = option(1, "also score best-of-N over SFT by the proxy", metavar="N")
    out: Optional[str] = option(None, "output folder (default: logging.output_dir/eval)")
    verbose: bool = verbose_option("OUT/logs/ray")


@dataclass(frozen=True)
class GenerateArgs:
    config: Optional[str] = positional("YAML config: model.policy, rollout.*, reward.*", nargs="?")
    overrides: tuple[str, ...] = positional(OVERRIDES_HELP, nargs="*", default=())
    model: Optional[str] = option(None, "a run directory (its newest sft/dpo/rl policy; its config.yaml when no CONFIG "
                                        "is given) or an HF folder; none: model.policy", metavar="PATH")
    # as typed: checked by the command, so a bad N is one line like every other user error
    best_of: str = option("1", "sample N per prompt and keep the one the config's reward scores highest", metavar="N")
    inp: str = option("-", "prompts: .jsonl/.json/.parquet rows with 'prompt' (or 'messages'), any other file one "
                           "prompt per line; '-' is stdin", flag="--in", metavar="FILE")
    in_format: str = option("auto", "how --in is read; auto: by its suffix, stdin one prompt per line",
                            choices=("auto", "jsonl", "txt"))
    out: Optional[str] = option(None, "write JSON lines {prompt, completion, score, candidates} here (never "
                                      "overwrites a file)", metavar="FILE")
    json: bool = option(False, "stdout gets JSON lines rows instead of one completion per line")
    all: bool = option(False, "with --best-of N: add all N samples and their scores to each row (JSON rows)")
    score: bool = option(False, "score the completions by the reward also without --best-of")
    verbose: bool = verbose_option(None)


@dataclass(frozen=True)
class RewardServeArgs:
    config: Optional[str] = positional(CONFIG_HELP, nargs="?")
    overrides: tuple[str, ...] = positional(OVERRIDES_HELP, nargs="*", default=())
    host: str = option("127.0.0.1", "bind address (localhost unless told otherwise)")
    port: int = option(8000, "TCP port")
    token_env: str = option("TIDAL_REWARD_TOKEN", "environment variable holding the bearer token", metavar="VAR")


@dataclass(frozen=True)
class NoArgs:
    pass


@dataclass(frozen=True)
class LabelServeArgs:
    dir: str = positional("feedback folder (holds feedback.sqlite)")
    host: str = option("127.0.0.1", "bind address (localhost unless told otherwise)")
    port: int = option(8080, "TCP port (0: any free port)")


@dataclass(frozen=True)
class LabelAddLabelerArgs:
    dir: str = positional("feedback folder (created if missing)")
    name: str = positional("the labeler's name")
    admin: bool = option(False, "may open the researcher page and export")


@dataclass(frozen=True)
class LabelAddTasksArgs:
    dir: str = positional("feedback folder (created if missing)")
    file: str = positional("JSON-lines file of tasks {prompt, responses, [gold_ranking]}")
    overlap: Optional[float] = option(None, "share of tasks given to 2+ labelers (default: the store's, 0.1)")
    flags: Optional[str] = option(None, "the per-response flags the page offers, ';'-separated (before labeling "
                                        "starts)")


@dataclass(frozen=True)
class LabelSetArgs:
    dir: str = positional("feedback folder")
    guidelines: Optional[str] = option(None, "a Markdown or text file of labeling guidelines, shown on the page "
                                             "(headings, lists, bold, italics and code; no HTML)", metavar="FILE")
    likert: Optional[str] = option(None, "the 1-7 scores: required, optional or off",
                                   choices=("required", "optional", "off"))
    edit_minutes: Optional[float] = option(None, "how long a labeler may edit a label after sending it (0: never)",
                                           metavar="N")


@dataclass(frozen=True)
class LabelTasksArgs:
    dir: str = positional("feedback folder (created if missing; its tasks stay)")
    config: Optional[str] = positional("YAML config: prompt data, rollout settings", nargs="?")
    overrides: tuple[str, ...] = positional(OVERRIDES_HELP, nargs="*", default=())
    sources: tuple[str, ...] = option((), "NAME=RUN_DIR (a run's final policy or an HF folder), sft, or references; "
                                          "repeatable", flag="--from", metavar="SOURCE")
    prompts: int = option(16, "prompts (tasks) to sample", metavar="M")
    responses: int = option(2, "responses per prompt from each model source", metavar="K")
    sft: Optional[str] = option(None, "the SFT model for --from sft (default: a run's sft stage output, else "
                                      "model.policy)")
    overlap: Optional[float] = option(None, "share of tasks given to 2+ labelers (default: the store's, 0.1)")
    verbose: bool = verbose_option("DIR/logs/ray")


@dataclass(frozen=True)
class LabelStatusArgs:
    dir: str = positional("feedback folder")


@dataclass(frozen=True)
class LabelExportArgs:
    dir: str = positional("feedback folder")
    out: str = positional("output file (JSON lines; never overwritten)")
    format: str = option("rankings", "what to write", choices=("rankings", "comparisons", "ratings"))
    include_gold: bool = option(False, "also export labels of gold tasks")
