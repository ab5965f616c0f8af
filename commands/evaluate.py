"""`tidal eval`: an honest scoreboard of finished policies against the SFT model.

Every policy (the SFT model, each run's final policy, best-of-n over SFT) answers the same
held-out reporting prompts (data.eval_prompts or the task's held-out prompts, the first
logging.eval_samples; the monitor picks models on the next ones, never on these), sampled with
one fixed seed, one policy after another, by one rollout pool that loads each policy's weights
in turn (tidal.driver.heldout.PolicySampler: one engine start per model). Each
completion is scored by the proxy (the config's reward, the one RL optimises) and by a gold
judge the policies never trained on (logging.gold_term, VADER by default). Per method: the
simulated win-rate against SFT on gold (pairwise on the same prompts, ties count half, Wilson
95% interval), mean gold, mean proxy, KL to SFT, mean length in tokens and the share of
degenerate completions; with a learned reward model in the proxy, two reward-model columns: the
accuracy of the reward model the method's run ended with on (method, SFT) pairs judged by gold,
and its margin between a plain answer and the exploit probes (tidal.commands.eval_judges).
Written to OUT/eval.json and OUT/eval.png.

KL to SFT is the k1 estimate on the method's own samples, sum over response tokens of
log pi - log pi_sft, both from plain HF forward passes on the driver (the eval set is small;
no learner group is started). Best-of-n is not a model with log-probs: its KL is the analytic
bound log n - (n - 1) / n (Stiennon et al. 2020, appendix), reported as such.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from tidal.commands.args import EvalArgs
from tidal.common.config import ConfigError, TidalConfig
from tidal.driver.heldout import (PolicySampler, Seeds, build_gold, eval_sampling, gold_term, hf_sequence_kl,
                                  raw_scores)
from tidal.driver.run_folder import policy_folder, sft_of

COLUMNS = ("method", "win-rate vs SFT (95% CI)", "gold", "proxy", "KL to SFT", "length", "degenerate", "RM acc",
           "probe margin")


@dataclass
class MethodResult:
    name: str
    path: str
    completions: list[str]
    gold: list[float]
    proxy: list[float]
    kl: list[float]  # per completion; best-of-n: the analytic bound repeated
    lengths: list[int]

    def row(self, sft_gold: list[float]) -> dict:
        from tidal.common.scoreboard import degenerate_share, win_rate

        w = win_rate(self.gold, sft_gold)
        return {"method": self.name, "path": self.path, "win_rate": w.rate, "win_low": w.low, "win_high": w.high,
                "wins": w.wins, "ties": w.ties, "losses": w.losses, "gold": statistics.mean(self.gold),
                "proxy": statistics.mean(self.proxy), "kl": statistics.mean(self.kl),
                "length": float(statistics.mean(self.lengths)), "degenerate": float(degenerate_share(self.completions)),
                "n": len(self.gold)}


def resolve_policy(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, HF folder): PATH is an HF folder or a run directory holding one."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--run {spec!r}: write NAME=RUN_DIR (e.g. --run ppo=runs/ppo-1).")
    return name, policy_folder(path, f"--run {spec}")


def evaluate_policies(cfg: TidalConfig, policies: dict[str, str], sft: str, best_of: int, eval_prompts: Path,
                      proxy, judges: dict[str, str] | None = None, default_judge: str | None = None) -> list[dict]:
    """Sample, score and tabulate every policy (plus SFT, plus best-of-n over SFT when best_of > 1);
    `judges` (method -> the reward model its run ended with; others: `default_judge`, the proxy's)
    adds the reward-model columns (tidal.commands.eval_judges)."""
    from transformers import AutoModelForCausalLM

    from tidal.common.models import load_tokenizer
    from tidal.driver.heldout import heldout_prompts

    tok = load_tokenizer(sft)
    prompts = heldout_prompts(cfg, eval_prompts, tok).reporting
    if prompts is None:
        raise ConfigError("tidal eval needs held-out prompts: set logging.eval_samples > 0 and data.eval_prompts.")
    count, sampling = len(prompts.index), eval_sampling(cfg, Seeds.REPORTING)
    gold = build_gold(cfg, gold_term(cfg.logging.gold_term), sft)
    sft_model = AutoModelForCausalLM.from_pretrained(sft, torch_dtype=torch.float32).eval()
    results, best = [], None
    try:
        with PolicySampler(cfg) as draw:  # one engine for every policy of the same model
            for name, path in {"sft": sft, **policies}.items():
                print(f"tidal eval: sampling {count} completions from {name} ({path})", flush=True)
                rollout = draw(path, prompts, sampling)
                kl, lengths = hf_sequence_kl(path, sft_model, rollout, cfg.rollout.temperature, tok)
                results.append(MethodResult(name, path, list(rollout.response_text), raw_scores(gold, rollout),
                                            raw_scores(proxy, rollout), kl, lengths))
                if name == "sft" and best_of > 1:  # while the engine holds SFT's weights
                    best = _best_of_sft(cfg, draw, sft, sft_model, tok, prompts, best_of, proxy, gold)
        results += [best] if best is not None else []
    finally:
        gold.close()
    sft_gold = results[0].gold
    rows = [r.row(sft_gold) for r in results]
    if judges is not None:
        _judge_rows(cfg, rows, results, judges, default_judge, sft, list(prompts.text))
    return rows


def _judge_rows(cfg: TidalConfig, rows: list[dict], results: list[MethodResult], judges: dict[str, str],
                default_judge: str | None, sft: str, prompts: list[str]) -> None:
    """Adds each row's reward-model columns, with its run's final reward model (or the proxy's)."""
    from tidal.commands.eval_judges import judge_columns

    sft_result = results[0]
    for row, r in zip(rows, results):
        against_sft = r is not sft_result
        print(f"tidal eval: reward-model columns of {r.name}", flush=True)
        row.update(judge_columns(cfg, judges.get(r.name) or default_judge, sft, prompts, r.completions, r.gold,
                                 sft_result.completions if against_sft else None,
                                 sft_result.gold if against_sft else None))


def _best_of_sft(cfg: TidalConfig, draw: PolicySampler, sft: str, sft_model, tok, prompts, n: int, proxy,
                 gold) -> MethodResult:
    """Best-of-n over SFT by the proxy; its KL is the analytic bound (Stiennon et al. 2020)."""
    from tidal.driver.best_of import BestOfN

    count = len(prompts.index)
    print(f"tidal eval: best-of-{n} over sft ({n * count} samples)", flush=True)
    best_of = BestOfN(None, proxy, eval_sampling(cfg, Seeds.REPORTING), n)  # its pool: the sampler's
    best = best_of.choose(draw(sft, prompts, best_of.sampling))
    chosen = best.chosen
    _, lengths = hf_sequence_kl(sft, sft_model, chosen, cfg.rollout.temperature, tok)
    bound = math.log(n) - (n - 1) / n
    return MethodResult(f"best-of-{n}", sft, list(chosen.response_text), raw_scores(gold, chosen), best.scores,
                        [bound] * count, lengths)


def format_table(rows: list[dict]) -> str:
    """The scoreboard as text; the reward-model columns (eval_judges) only when a row has them."""
    judged = any("rm_judge" in r for r in rows)
    head = f"{COLUMNS[0]:<16}{COLUMNS[1]:>26}{COLUMNS[2]:>9}{COLUMNS[3]:>9}{COLUMNS[4]:>11}{COLUMNS[5]:>8}{COLUMNS[6]:>12}"
    lines = [head + (f"{COLUMNS[7]:>8}{COLUMNS[8]:>14}" if judged else "")]
    for r in rows:
        win = f"{100 * r['win_rate']:.1f} [{100 * r['win_low']:.1f}, {100 * r['win_high']:.1f}]"
        line = (f"{r['method']:<16}{win:>26}{r['gold']:>9.3f}{r['proxy']:>9.3f}{r['kl']:>11.3f}"
                f"{r['length']:>8.1f}{100 * r['degenerate']:>11.1f}%")
        if judged:
            acc, margin = r.get("rm_accuracy"), r.get("probe_margin")
            line += (f"{'-' if acc is None else f'{100 * acc:.1f}%':>8}"
                     f"{'-' if margin is None else f'{margin:+.2f}':>14}")
        lines.append(line)
    return "\n".join(lines)


def plot_table(rows: list[dict], path: Path) -> None:
    """Win-rate bars with their intervals, and gold against sqrt(KL) (Gao et al.'s axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from tidal.common.scoreboard import gao_x

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = [r["method"] for r in rows]
    rates = [100 * r["win_rate"] for r in rows]
    err = [[100 * (r["win_rate"] - r["win_low"]) for r in rows], [100 * (r["win_high"] - r["win_rate"]) for r in rows]]
    ax.bar(names, rates, yerr=err, capsize=4)
    ax.axhline(50, color="grey", lw=0.8)
    ax.set_ylabel("gold win-rate vs SFT (%)")
    ax.tick_params(axis="x", rotation=30)
    for r in rows:
        bx.scatter(gao_x(r["kl"]), r["gold"], label=r["method"])
    bx.set_xlabel("sqrt(KL to SFT)")
    bx.set_ylabel("mean gold score")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


@dataclass(frozen=True)
class EvalPlan:
    """Everything `tidal eval` needs, checked before Ray starts."""

    cfg: TidalConfig
    policies: dict[str, str]  # method name -> HF folder
    sft: str
    reward_model: str | None  # of the proxy's model term: model.reward, else a run's own
    judges: dict[str, str]  # method -> the reward model its run ended with (tidal.commands.eval_judges)
    eval_prompts: Path
    out_dir: Path


def plan_eval(args: EvalArgs) -> EvalPlan:
    """The config, the policies, the SFT model, the proxy's reward model (model.reward, else the
    one the first --run run's rm stage trained: the reward its RL optimised, as `tidal generate`
    finds it), the held-out prompts and the output folder; every user error here, before Ray."""
    from tidal.commands.eval_judges import judges
    from tidal.commands.generate import check_reward
    from tidal.common.config import load_config
    from tidal.driver.job import prepare_data
    from tidal.driver.preflight import check_model
    from tidal.driver.run_folder import reward_model_of

    cfg = load_config(args.config, list(args.overrides))
    if args.best_of < 1:
        raise ConfigError(f"--best-of {args.best_of}: use N >= 2 to add best-of-N over SFT, or leave it out.")
    runs = list(args.run)
    policies = dict(resolve_policy(s) for s in runs)
    sft_path = sft_of(runs, args.sft, cfg)
    check_model("--sft" if args.sft else "model.policy", sft_path)
    reward_model = next((m for m in (reward_model_of(cfg, s.partition("=")[2]) for s in runs) if m), cfg.model.reward)
    check_reward(cfg, "tidal eval", reward_model)
    gold_term(cfg.logging.gold_term)  # a bad logging.gold_term is a config error, not a failure after sampling
    out_dir = Path(args.out or Path(cfg.logging.output_dir) / "eval")
    if (out_dir / "eval.json").exists():  # never overwrite an earlier scoreboard
        raise ConfigError(f"{out_dir / 'eval.json'} already exists; pass another --out folder.")
    blocked = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ConfigError(f"--out {out_dir}: {blocked} is a file, not a folder; pass another --out folder.")
    data = prepare_data(cfg)
    if data.eval_prompts is None:
        raise ConfigError("tidal eval needs held-out prompts: set data.eval_prompts (or data.task: sentiment).")
    return EvalPlan(cfg, policies, sft_path, reward_model, judges(runs), data.eval_prompts, out_dir)


def eval_from_cli(args: EvalArgs) -> int:
    """Entry point of `tidal eval`; returns the exit status. A user error stops in `plan_eval`,
    before Ray starts and before anything is written; the output folder gets the scoreboard and
    (without --verbose) the worker and engine logs."""
    from tidal.common.models import resolve_model
    from tidal.driver.runtime import ray_session
    from tidal.reward_service.combine import build_reward

    plan = plan_eval(args)
    cfg = plan.cfg
    if plan.reward_model and not cfg.model.reward:
        print(f"tidal eval: the proxy's reward model is {plan.reward_model} (the run's own rm stage)", flush=True)
    reward_model = str(resolve_model(plan.reward_model)) if plan.reward_model else None
    with ray_session(cfg.cluster, min_cpus=cfg.rollout.num_workers, verbose=args.verbose,
                     logs_to=plan.out_dir / "logs" / "ray"):
        proxy = build_reward(cfg.reward, reward_model=reward_model, policy_tokenizer=plan.sft, local=True,
                             dtype=cfg.model.dtype)
        try:
            rows = evaluate_policies(cfg, plan.policies, plan.sft, args.best_of, plan.eval_prompts, proxy,
                                     plan.judges, reward_model)
        finally:
            proxy.close()
    print(format_table(rows), flush=True)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / "eval.json").write_text(json.dumps({"gold": cfg.logging.gold_term, "sft": plan.sft,
                                                        "reward_model": plan.reward_model, "rows": rows}, indent=2))
    plot_table(rows, plan.out_dir / "eval.png")
    print(f"tidal eval: wrote {plan.out_dir / 'eval.json'} and {plan.out_dir / 'eval.png'}", flush=True)
    return 0
