"""The over-optimisation monitor of an RL run (Gao et al. 2022): every logging.gold_every steps
the current policy answers a fixed held-out set (the first logging.eval_samples held-out
prompts, one fixed sampling seed), scored by the proxy (the reward RL optimises, raw) and by a
gold judge it never trains on (logging.gold_term), with the KL to the reference. Logged as
eval/proxy, eval/gold, eval/kl and eval/sqrt_kl (Gao et al.'s x axis); plotted at the end as
proxy and gold against sqrt(KL) in plots/overoptimisation.png.

The warning (once per run) fires when, over the last logging.gold_window evaluations, the
proxy's least-squares slope is up while gold's is down (tidal.common.scoreboard
.overoptimisation_check). algorithm.early_stop: gold_drop stops the run at that point; kl
stops it once the step's KL to the reference (rl/kl, nats per sequence) exceeds
algorithm.stop_at_kl (the seeds' "early stop based on KL distance"); none only warns.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tidal.common.scoreboard import OveroptimisationCheck, gao_x, overoptimisation_check


@dataclass(frozen=True)
class Verdict:
    warn: bool  # print the over-optimisation warning now (first alarm of the run)
    stop: str | None  # why the run should stop now ("gold_drop", "kl"), or None
    check: OveroptimisationCheck | None  # the window's slopes (None: no gold evaluation this step)


@dataclass
class GoldMonitor:
    """The decision logic, fed with numbers (no models): `observe_eval` after each held-out
    evaluation, `observe_kl` after each training step."""

    window: int
    early_stop: str = "none"  # none | kl | gold_drop
    stop_at_kl: float | None = None
    steps: list[float] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    warned: bool = False

    def observe_eval(self, step: int, proxy: float, gold: float, kl: float) -> Verdict:
        self.steps.append(float(step))
        self.proxy.append(float(proxy))
        self.gold.append(float(gold))
        self.kl.append(float(kl))
        check = overoptimisation_check(self.steps, self.proxy, self.gold, self.window)
        warn = check.alarm and not self.warned
        self.warned = self.warned or check.alarm
        return Verdict(warn, "gold_drop" if check.alarm and self.early_stop == "gold_drop" else None, check)

    def observe_kl(self, kl: float) -> Verdict:
        over = self.early_stop == "kl" and self.stop_at_kl is not None and kl > self.stop_at_kl
        return Verdict(False, "kl" if over else None, None)

    def warning(self, step: int, check: OveroptimisationCheck, gold_term: str) -> str:
        return (f"tidal: warning: over-optimisation at step {step}: over the last {check.points} held-out "
                f"evaluations the proxy reward rises ({check.proxy_slope:+.4f}/step) while the gold judge "
                f"({gold_term}) falls ({check.gold_slope:+.4f}/step). The policy is gaming the reward; stop earlier "
                f"(algorithm.early_stop=gold_drop or kl with algorithm.stop_at_kl), or raise algorithm.kl_coef.")

    def plot(self, path: Path) -> Path | None:
        """Proxy and gold against sqrt(KL to the reference), one point per evaluation."""
        if not self.steps:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        x = gao_x(self.kl)
        ax.plot(x, self.proxy, "o-", label="proxy (trained on)")
        ax.plot(x, self.gold, "s-", label="gold (held out)")
        ax.set_xlabel("sqrt(KL to reference)")
        ax.set_ylabel("mean held-out score")
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path


class HeldOutJudge:
    """Scores the pool's current policy on the fixed held-out prompts: proxy, gold, KL."""

    def __init__(self, cfg, eval_path: Path, tokenizer, policy_path: str):
        from tidal.driver.heldout import build_gold
        from tidal.driver.heldout import EVAL_SEED
        from tidal.common.prompts import PromptDataset
        from tidal.rollout.sampling import Sampling

        ds = PromptDataset(eval_path, tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)
        count = min(cfg.logging.eval_samples, len(ds))
        if count == 0:
            raise ValueError("logging.gold_every > 0 needs held-out prompts: set logging.eval_samples > 0")
        self.prompts = ds.make_batch(list(range(count)))
        self.sampling = dataclasses.replace(Sampling.from_config(cfg.rollout, EVAL_SEED + 2), n=1)
        self.gold = build_gold(cfg, policy_path)

    def __call__(self, pool, reward, learners) -> dict[str, float]:
        from tidal.driver.heldout import raw_scores

        rollout = pool.generate(self.prompts, self.sampling)
        fwd = learners.forward(rollout, with_values=False)
        kl = fwd.sequence_kl().mean().item()
        proxy, gold = raw_scores(reward, rollout), raw_scores(self.gold, rollout)
        return {"eval/proxy": sum(proxy) / len(proxy), "eval/gold": sum(gold) / len(gold), "eval/kl": kl,
                "eval/sqrt_kl": gao_x(kl)}

    def close(self) -> None:
        self.gold.close()


def print_warning(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
