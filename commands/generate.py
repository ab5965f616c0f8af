"""`tidal generate`: a policy's completions for prompts from a file or stdin, optionally the best
of N samples by the config's reward (`driver/best_of.py`).

Input (`--in`, default `-` = stdin): a .jsonl/.json/.parquet file of prompt rows (`prompt` or
`messages`, validated like `data.prompts`), any other file one prompt per line (blank lines
skipped); stdin is read one prompt per line unless `--in-format jsonl`. Every row is checked
before Ray starts; a bad one is one line naming FILE:LINE and the field (exit 2).

The policy: `--model` (an HF folder, or a run directory: its current policy, the newest sft,
dpo or rl output in its run_state.json), else `model.policy`. With a run directory and no
CONFIG, the run's own config.yaml is used, and a reward-model term without model.reward scores
with the reward model the run's rm stage trained. Sampling: the config's rollout.*
(temperature, top_p/top_k, max_new_tokens) with seed `seed`, on a real rollout pool (rollout.backend, vLLM by default) on
the Ray cluster `tidal eval` uses (embedded by default, cluster.address to join one).
Prompts are rendered and cut to data.max_prompt_tokens exactly as in training (a note on
stderr counts the prompts that were cut).

Output: `--out FILE` (never overwritten) gets JSON lines {prompt, completion[, score]
[, candidates]}; without --out, stdout gets the same rows with `--json`, else one completion per
line with backslash and line breaks escaped (\\\\, \\n, \\r, ...; `plain_line`), so line i
answers prompt i. Everything else tidal says goes to stderr. `score` is the reward's raw
weighted sum, present with --best-of N > 1 or --score; `candidates` (--all, JSON rows only)
lists all N samples with their scores, in sampling order.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tidal.commands.args import GenerateArgs
from tidal.common.config import ConfigError, TidalConfig
from tidal.driver.run_folder import reward_model_of

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")


def check_args(args: GenerateArgs) -> int:
    """The options that need nothing loaded; returns N of --best-of."""
    try:
        n = int(args.best_of)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--best-of {args.best_of}: N must be a whole number >= 1 (1 samples once; N >= 2 keeps "
                          f"the best of N samples by the config's reward).")
    if args.all and n < 2:
        raise ConfigError("--all lists the N samples of --best-of N; add --best-of N with N >= 2.")
    if args.inp != "-" and not Path(args.inp).is_file():
        raise ConfigError(f"--in {args.inp}: no such file; give a prompts file (.jsonl rows with 'prompt', or one "
                          f"prompt per line) or '-' for stdin.")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():  # never overwrite what a user has
        raise ConfigError(f"--out {out}: the file exists; pass a new file name (tidal never overwrites it).")
    if out is not None and any(p.exists() and not p.is_dir() for p in out.parents):
        raise ConfigError(f"--out {out}: {next(p for p in out.parents if p.exists() and not p.is_dir())} is a file, "
                          f"not a folder; pass a path in a folder.")
    if args.model is not None and not Path(args.model).expanduser().exists():
        parent = Path(args.model).expanduser().parent
        if args.model.startswith((".", "/", "~")) or (str(parent) != "." and parent.is_dir()):  # not a hub id
            raise ConfigError(f"--model {args.model}: no such folder; pass a run directory or an HF model folder.")
    return n


def run_config(args: GenerateArgs) -> Optional[str]:
    """The config file: CONFIG, else RUN/config.yaml when --model is a run directory (the run's
    own rollout, reward and data settings), else none (defaults)."""
    if args.config is not None or args.model is None:
        return args.config
    saved = Path(args.model) / "config.yaml"
    return str(saved) if saved.is_file() else None


def read_prompts(src: str, fmt: str = "auto") -> list:
    """PromptRecords of --in: a file (format by suffix unless told) or '-' (stdin)."""
    from tidal.common.data import DataError, read_prompt_lines, read_records

    if src == "-":
        if sys.stdin.isatty():
            print("tidal generate: reading prompts from stdin, one per line (end with Ctrl-D)", file=sys.stderr, flush=True)
        records = read_prompt_lines(sys.stdin.buffer, "<stdin>", "txt" if fmt == "auto" else fmt)
        name = "stdin"
    else:
        path = Path(src)  # an existing file (check_args)
        if fmt == "auto" and path.suffix.lower() in RECORD_SUFFIXES:
            records = read_records(path, "prompts")
        else:
            with open(path, "rb") as f:
                records = read_prompt_lines(f, path.name, "txt" if fmt == "auto" else fmt)
        name = path.name
    if not records:
        raise DataError(f"{name}: no prompts; give at least one (a 'prompt' row, or a non-blank line).")
    return records


def resolve_generate_policy(cfg: TidalConfig, model: Optional[str]) -> str:
    """--model (HF folder or run directory) or model.policy, checked; returns the HF folder."""
    from tidal.driver.run_folder import policy_folder
    from tidal.driver.preflight import check_model
    from tidal.common.models import resolve_model

    if model is not None and Path(model).is_dir():
        path = policy_folder(model, f"--model {model}")
        check_model("--model", path)
        return path
    key, name = ("--model", model) if model is not None else ("model.policy", cfg.model.policy)
    check_model(key, name)
    return str(resolve_model(name))


def check_reward(cfg: TidalConfig, why: str, reward_model: Optional[str]) -> None:
    """The config's reward can score text here, before anything starts."""
    from tidal.driver.preflight import check_model, check_reward_function

    if not cfg.reward.terms:
        raise ConfigError(f"{why} needs a reward: reward.terms is empty; configure one (e.g. "
                          f"reward.terms='[{{kind: length, target: \"32\"}}]' or a model term with model.reward).")
    for i, term in enumerate(cfg.reward.terms):
        if term.kind == "function":
            check_reward_function(f"reward.terms[{i}].target", term.target)
        elif term.kind == "model":
            if not term.target and not reward_model:
                raise ConfigError(f"{why} needs a usable reward: reward.terms[{i}] (kind model) has no reward model; "
                                  f"set model.reward=RUN/reward_model (or the term's target) to a reward-model folder.")
            check_model(f"reward.terms[{i}].target" if term.target else "model.reward", term.target or reward_model)


def prompt_batch(cfg: TidalConfig, records: list, policy: str):
    """(PromptBatch of every record in order, how many were cut to data.max_prompt_tokens)."""
    from tidal.common.prompts import render_prompt
    from tidal.common.prompts import PromptDataset
    from tidal.common.models import load_tokenizer
    from tidal.rollout.worker import check_prompts

    tok = load_tokenizer(policy)
    template, limit = cfg.data.chat_template, cfg.data.max_prompt_tokens
    cut = sum(len(tok(render_prompt(tok, r.prompt, template), add_special_tokens=not template)["input_ids"]) > limit
              for r in records)
    batch = PromptDataset.from_config(records, tok, cfg.data).make_batch(list(range(len(records))))
    try:  # what the engine would refuse after minutes of start-up, refused now
        check_prompts(batch, cfg.rollout.max_model_len, cfg.rollout.max_new_tokens)
    except ValueError as e:
        raise ConfigError(f"{e} (prompt numbers count from 0 in input order)") from None
    return batch, cut


def output_rows(records: list, texts: list[str], scores: Optional[list[float]], best=None) -> list[dict]:
    """The JSON rows: the prompt as given, the completion, its score and (best given) the candidates."""
    rows = []
    for i, (record, text) in enumerate(zip(records, texts)):
        row = {"prompt": record.prompt, "completion": text}
        if scores is not None:
            row["score"] = scores[i]
        if best is not None:
            row["candidates"] = [{"completion": c, "score": s} for c, s in best.candidates_of(i)]
        rows.append(row)
    return rows


# Every character Python's str.splitlines breaks a line at (not only newline and carriage
# return: also \v, \f, \x1c-\x1e, \x85, \u2028, \u2029, which a random model does emit),
# and the backslash that starts an escape.
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\v": "\\v", "\f": "\\f",
                          **{c: f"\\x{ord(c):02x}" for c in "\x1c\x1d\x1e\x85"},
                          **{c: f"\\u{ord(c):04x}" for c in "\u2028\u2029"}})


def plain_line(text: str) -> str:
    """One completion on one line: backslash and every line break escaped (\\\\, \\n, \\r, \\v,
    \\f, \\x1c, ..., \\u2029), so that line i of the output answers prompt i."""
    return text.translate(_ESCAPES)


def write_new(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all, and never over an existing file (a hard link
    of a finished temporary file fails when `path` exists, even if it appeared meanwhile)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigError(f"--out {path}: the file appeared while generating; it was left as it is.") from None
    finally:
        tmp.unlink(missing_ok=True)


def sample(cfg: TidalConfig, n: int, policy: str, prompts, reward, verbose: bool = False):
    """(texts, scores or None, BestOf or None) in prompt order, from a fresh rollout pool on Ray
    (tidal.driver.heldout; closed afterwards). With a reward every sample is scored and each
    prompt keeps its best."""
    from tidal.driver.best_of import BestOfN, NoValidSample
    from tidal.driver.heldout import Seeds, eval_sampling, sample as sample_policy
    from tidal.driver.runtime import ray_session
    from tidal.reward_service.combine import InvalidRewardError

    sampling = eval_sampling(cfg, Seeds(cfg.seed).generate)
    best_of = None if reward is None else BestOfN(None, reward, sampling, n)  # its pool: sample_policy's own
    with ray_session(cfg.cluster, min_cpus=cfg.rollout.num_workers * cfg.rollout.cpus_per_worker, verbose=verbose):
        candidates = sample_policy(policy, prompts, sampling if best_of is None else best_of.sampling, cfg)
    if best_of is None:
        return list(candidates.response_text), None, None
    try:
        best = best_of.choose(candidates)
    except (InvalidRewardError, NoValidSample) as e:  # NaN/inf under reward.on_invalid
        raise ConfigError(f"reward: {e}") from None
    return list(best.chosen.response_text), best.scores, best


@dataclass(frozen=True)
class GeneratePlan:
    """What `tidal generate` needs, checked before anything is loaded or started."""

    cfg: TidalConfig
    n: int  # --best-of N
    scored: bool
    policy: str  # HF folder
    reward_model: Optional[str]  # of a model reward term (scored only)
    records: list  # PromptRecords, in input order


def plan_generate(args: GenerateArgs) -> GeneratePlan:
    """The arguments, the config (a run's own when --model is a run directory and no CONFIG),
    the policy, the reward that scores and every prompt row: each user error here, in seconds."""
    from tidal.common.config import load_config

    n = check_args(args)
    config = run_config(args)
    cfg = load_config(config, args.overrides)
    if config is not None and config != args.config:
        print(f"tidal generate: settings from {config}", file=sys.stderr, flush=True)
    scored = n > 1 or args.score
    policy = resolve_generate_policy(cfg, args.model)
    reward_model = reward_model_of(cfg, args.model) if scored else None
    if scored:
        check_reward(cfg, f"--best-of {n}" if n > 1 else "--score", reward_model)
    return GeneratePlan(cfg, n, scored, policy, reward_model, read_prompts(args.inp, args.in_format))


def generate_from_cli(args: GenerateArgs) -> int:
    """Entry point of `tidal generate`; returns the exit status."""
    from tidal.driver.runtime import quiet_libraries
    from tidal.common.models import resolve_model

    plan = plan_generate(args)
    cfg, n, scored, policy, reward_model, records = (plan.cfg, plan.n, plan.scored, plan.policy, plan.reward_model,
                                                     plan.records)
    if not args.verbose:
        quiet_libraries()
    prompts, cut = prompt_batch(cfg, records, policy)
    if cut:
        print(f"tidal generate: {cut} of {len(records)} prompts are longer than data.max_prompt_tokens="
              f"{cfg.data.max_prompt_tokens} tokens and were cut from the left (raise it to keep them whole)",
              file=sys.stderr, flush=True)
    reward = None
    if scored:
        from tidal.reward_service.combine import build_reward

        reward = build_reward(cfg.reward, reward_model=str(resolve_model(reward_model)) if reward_model else None,
                              policy_tokenizer=policy, local=True, dtype=cfg.model.dtype)
    how = f", the best of {n} by the reward" if n > 1 else ""
    print(f"tidal generate: {len(records)} prompts x {n} samples from {policy}{how}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the completions and nothing else
            texts, scores, best = sample(cfg, n, policy, prompts, reward, args.verbose)
    finally:
        if reward is not None:
            reward.close()
    note = f"; mean score {sum(scores) / len(scores):.4g}" if scores else ""
    print(f"tidal generate: {len(texts)} completions in {time.perf_counter() - start:.1f} s{note}",
          file=sys.stderr, flush=True)
    rows = output_rows(records, texts, scores, best if args.all else None)
    out = Path(args.out) if args.out else None
    if out is not None or args.json or args.all:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        text = "".join(plain_line(t) + "\n" for t in texts)
    if out is None:
        sys.stdout.write(text)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    write_new(out, text)
    print(f"tidal generate: wrote {len(rows)} rows to {out}", file=sys.stderr, flush=True)
    return 0
