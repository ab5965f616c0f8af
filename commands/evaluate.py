"""`tidal eval`: an honest scoreboard of finished policies against the SFT model.

Every policy (the SFT model, each run's final policy, best-of-n over SFT) answers the same
held-out prompts (data.eval_prompts or the task's held-out prompts, the first
logging.eval_samples), sampled by the rollout pool with one fixed seed, one policy after
another. Each completion is scored by the proxy (the config's reward, the one RL optimises)
and by a gold judge the policies never trained on (logging.gold_term, VADER by default).
Per method: the simulated win-rate against SFT on gold (pairwise on the same prompts, ties
count half, Wilson 95% interval), mean gold, mean proxy, KL to SFT, mean length in tokens and
the share of degenerate completions. Written to OUT/eval.json and OUT/eval.png.

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

from tidal.common.config import ConfigError, TidalConfig
from tidal.driver.heldout import build_gold, eval_sampling, raw_scores
from tidal.driver.run_folder import policy_folder, sft_of

COLUMNS = ("method", "win-rate vs SFT (95% CI)", "gold", "proxy", "KL to SFT", "length", "degenerate")


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


def sample(cfg: TidalConfig, path: str, prompts, n: int):
    """n completions per prompt from the HF folder `path` (a fresh pool, closed afterwards)."""
    from tidal.rollout.pool import RolloutPool

    pool = RolloutPool(cfg, path)
    try:
        return pool.generate(prompts, eval_sampling(cfg, n))
    finally:
        pool.shutdown()


def token_stats(path: str, sft_model, rollout, temperature: float, tokenizer) -> tuple[list[float], list[int]]:
    """(sequence KL to SFT, response length) per completion; KL is the k1 sum over tokens."""
    from transformers import AutoModelForCausalLM

    from tidal.common.models import sequence_logprobs
    from tidal.learner.experience import pad_rollout

    ids, mask, resp = pad_rollout(rollout, tokenizer.pad_token_id, tokenizer.eos_token_id)
    R, t = resp.shape[1], temperature if temperature > 0 else 1.0
    policy = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    kl = []
    with torch.no_grad():
        for s in range(0, len(ids), 16):
            sl = slice(s, s + 16)
            diff = sequence_logprobs(policy, ids[sl], mask[sl], R, t) - sequence_logprobs(sft_model, ids[sl], mask[sl], R, t)
            kl += (diff * resp[sl]).sum(-1).tolist()
    return kl, resp.sum(-1).long().tolist()


def evaluate_policies(cfg: TidalConfig, policies: dict[str, str], sft: str, best_of: int, eval_prompts: Path,
                      proxy) -> list[dict]:
    """Sample, score and tabulate every policy (plus SFT, plus best-of-n over SFT when best_of > 1)."""
    from transformers import AutoModelForCausalLM

    from tidal.driver.best_of import BestOfN
    from tidal.common.prompts import PromptDataset
    from tidal.common.models import load_tokenizer
    from tidal.rollout.pool import RolloutPool

    tok = load_tokenizer(sft)
    ds = PromptDataset(eval_prompts, tok, cfg.data.max_prompt_tokens, cfg.data.chat_template)
    count = min(cfg.logging.eval_samples, len(ds))
    if count == 0:
        raise ConfigError("tidal eval needs held-out prompts: set logging.eval_samples > 0 and data.eval_prompts.")
    prompts = ds.make_batch(list(range(count)))
    gold = build_gold(cfg, sft)
    sft_model = AutoModelForCausalLM.from_pretrained(sft, torch_dtype=torch.float32).eval()
    results = []
    try:
        for name, path in {"sft": sft, **policies}.items():
            print(f"tidal eval: sampling {count} completions from {name} ({path})", flush=True)
            rollout = sample(cfg, path, prompts, 1)
            kl, lengths = token_stats(path, sft_model, rollout, cfg.rollout.temperature, tok)
            results.append(MethodResult(name, path, list(rollout.response_text), raw_scores(gold, rollout),
                                        raw_scores(proxy, rollout), kl, lengths))
        if best_of > 1:
            print(f"tidal eval: best-of-{best_of} over sft ({best_of * count} samples)", flush=True)
            pool = RolloutPool(cfg, sft)
            try:
                best = BestOfN(pool, proxy, eval_sampling(cfg), best_of).generate(prompts)
            finally:
                pool.shutdown()
            chosen = best.chosen
            _, lengths = token_stats(sft, sft_model, chosen, cfg.rollout.temperature, tok)
            bound = math.log(best_of) - (best_of - 1) / best_of
            results.append(MethodResult(f"best-of-{best_of}", sft, list(chosen.response_text),
                                        raw_scores(gold, chosen), best.scores, [bound] * count, lengths))
    finally:
        gold.close()
    sft_gold = results[0].gold
    return [r.row(sft_gold) for r in results]


def format_table(rows: list[dict]) -> str:
    lines = [f"{COLUMNS[0]:<16}{COLUMNS[1]:>26}{COLUMNS[2]:>9}{COLUMNS[3]:>9}{COLUMNS[4]:>11}{COLUMNS[5]:>8}{COLUMNS[6]:>12}"]
    for r in rows:
        win = f"{100 * r['win_rate']:.1f} [{100 * r['win_low']:.1f}, {100 * r['win_high']:.1f}]"
        lines.append(f"{r['method']:<16}{win:>26}{r['gold']:>9.3f}{r['proxy']:>9.3f}{r['kl']:>11.3f}"
                     f"{r['length']:>8.1f}{100 * r['degenerate']:>11.1f}%")
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


def eval_from_cli(config: str | None, overrides: list[str], runs: list[str], sft: str | None, best_of: int,
                  out: str | None) -> int:
    """Entry point of `tidal eval`; returns the exit status."""
    from tidal.driver.job import prepare_data
    from tidal.driver.runtime import connect, disconnect
    from tidal.common.config import load_config
    from tidal.common.models import resolve_model
    from tidal.reward_service.combine import build_reward

    cfg = load_config(config, overrides)
    if best_of < 1:
        raise ConfigError(f"--best-of {best_of}: use N >= 2 to add best-of-N over SFT, or leave it out.")
    policies = dict(resolve_policy(s) for s in runs)
    sft_path = sft_of(runs, sft, cfg)
    data = prepare_data(cfg)
    if data.eval_prompts is None:
        raise ConfigError("tidal eval needs held-out prompts: set data.eval_prompts (or data.task: sentiment).")
    out_dir = Path(out or Path(cfg.logging.output_dir) / "eval")
    if (out_dir / "eval.json").exists():  # never overwrite an earlier scoreboard
        raise ConfigError(f"{out_dir / 'eval.json'} already exists; pass another --out folder.")
    out_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(cfg.cluster, min_cpus=cfg.rollout.num_workers)
    reward_model = str(resolve_model(cfg.model.reward)) if cfg.model.reward else None
    proxy = build_reward(cfg.reward, reward_model=reward_model, policy_tokenizer=sft_path, local=True,
                         dtype=cfg.model.dtype)
    try:
        rows = evaluate_policies(cfg, policies, sft_path, best_of, data.eval_prompts, proxy)
    finally:
        proxy.close()
        disconnect(conn)
    table = format_table(rows)
    print(table, flush=True)
    (out_dir / "eval.json").write_text(json.dumps({"gold": cfg.logging.gold_term, "sft": sft_path, "rows": rows},
                                                  indent=2))
    plot_table(rows, out_dir / "eval.png")
    print(f"tidal eval: wrote {out_dir / 'eval.json'} and {out_dir / 'eval.png'}", flush=True)
    return 0
