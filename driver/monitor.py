"""The over-optimisation monitor of an RL run (Gao et al. 2022): every logging.gold_every steps
the current policy answers the held-out *selection* prompts (logging.gold_samples of them,
after the logging.eval_samples reporting prompts; tidal.driver.heldout), one fixed sampling
seed, scored by the proxy (the reward RL optimises, raw) and by a gold judge it never trains on
(logging.gold_term), with the KL to the reference. Logged as eval/proxy, eval/gold, eval/kl and
eval/sqrt_kl (Gao et al.'s x axis), plus eval/gold_p (the test's p-value) and eval/gold_best;
plotted at the end as proxy and gold against sqrt(KL) in plots/overoptimisation.png.

The warning (once per run) fires when, over the last logging.gold_window evaluations, the
proxy's least-squares slope is up while gold falls significantly: a one-sided t test over the
selection prompts' own gold slopes at level logging.gold_alpha, by at least
logging.gold_min_drop (tidal.common.scoreboard.overoptimisation_check). algorithm.early_stop:
gold_drop stops the run at that point and the final policy is the best-gold one the monitor saw
(tidal.driver.best_checkpoint); kl stops it once the step's KL to the reference (rl/kl, nats
per sequence) exceeds algorithm.stop_at_kl (a KL budget); none only warns. The monitor's
history is part of each checkpoint, so a resumed run continues its window and its best.

`CollapseWatch` needs no held-out evaluation: after every step it warns (once each) when the
batch's degenerate share or the KL per response token passes logging.warn_degenerate /
logging.warn_kl, the plain signs of a collapsing policy.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tidal.common.scoreboard import OveroptimisationCheck, gao_x, overoptimisation_check


@dataclass(frozen=True)
class Verdict:
    warn: bool  # print the over-optimisation warning now (first alarm of the run)
    stop: str | None  # why the run should stop now ("gold_drop", "kl"), or None
    check: OveroptimisationCheck | None  # the window's slopes (None: no gold evaluation this step)
    best: bool = False  # this evaluation's gold is the best of the run so far


@dataclass
class GoldMonitor:
    """The decision logic, fed with numbers (no models): `observe_eval` after each held-out
    evaluation (gold per selection prompt), `observe_kl` after each training step."""

    window: int
    early_stop: str = "none"  # none | kl | gold_drop
    stop_at_kl: float | None = None
    alpha: float = 0.01  # logging.gold_alpha
    min_drop: float = 0.0  # logging.gold_min_drop
    steps: list[float] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)  # mean over the selection prompts
    kl: list[float] = field(default_factory=list)
    recent: list[list[float]] = field(default_factory=list)  # per-prompt gold of the last `window` evaluations
    warned: bool = False
    best_step: int | None = None
    best_gold: float = -math.inf

    @classmethod
    def from_config(cls, cfg) -> "GoldMonitor":
        lc, a = cfg.logging, cfg.algorithm
        return cls(lc.gold_window, a.early_stop, a.stop_at_kl, alpha=lc.gold_alpha, min_drop=lc.gold_min_drop)

    def observe_eval(self, step: int, proxy: float, gold: list[float], kl: float) -> Verdict:
        """`gold`: the gold score of each selection prompt, in the same prompt order every time."""
        mean = statistics.fmean(gold)
        self.steps.append(float(step))
        self.proxy.append(float(proxy))
        self.gold.append(mean)
        self.kl.append(float(kl))
        self.recent = [*self.recent, [float(g) for g in gold]][-self.window:]
        window_steps = self.steps[-len(self.recent):]
        check = overoptimisation_check(window_steps, self.proxy[-len(self.recent):], self.recent, self.window,
                                       alpha=self.alpha, min_gold_drop=self.min_drop)
        warn = check.alarm and not self.warned
        self.warned = self.warned or check.alarm
        best = mean > self.best_gold
        if best:
            self.best_step, self.best_gold = int(step), mean
        return Verdict(warn, "gold_drop" if check.alarm and self.early_stop == "gold_drop" else None, check, best)

    def observe_kl(self, kl: float) -> Verdict:
        over = self.early_stop == "kl" and self.stop_at_kl is not None and kl > self.stop_at_kl
        return Verdict(False, "kl" if over else None, None)

    def warning(self, step: int, check: OveroptimisationCheck, gold_term: str) -> str:
        return (f"tidal: warning: over-optimisation at step {step}: over the last {check.points} held-out "
                f"evaluations the proxy reward rises ({check.proxy_slope:+.4f}/step) while the gold judge "
                f"({gold_term}) falls ({check.gold_slope:+.4f}/step, {check.gold_drop:.4f} across the window, "
                f"one-sided p={check.p_value:.2g} <= logging.gold_alpha={self.alpha:g}). The policy is gaming the "
                f"reward; stop earlier (algorithm.early_stop=gold_drop or kl with algorithm.stop_at_kl), or raise "
                f"algorithm.kl_coef.")

    def metrics(self, verdict: Verdict) -> dict[str, float]:
        """eval/overoptimisation (the alarm), eval/gold_best and, once the window is full, eval/gold_p."""
        out = {"eval/overoptimisation": float(verdict.check.alarm), "eval/gold_best": self.best_gold}
        if not math.isnan(verdict.check.p_value):
            out["eval/gold_p"] = verdict.check.p_value
        return out

    def past_best(self) -> str | None:
        """A note when the last evaluation's gold is below the best one's (None: it is the best)."""
        if not self.gold or self.best_step is None or self.gold[-1] >= self.best_gold:
            return None
        return (f"the final policy's gold on the selection prompts, {self.gold[-1]:.4f} at step {int(self.steps[-1])}, "
                f"is below the best, {self.best_gold:.4f} at step {self.best_step}")

    def state_dict(self) -> dict:
        return {"steps": self.steps, "proxy": self.proxy, "gold": self.gold, "kl": self.kl, "recent": self.recent,
                "warned": self.warned, "best_step": self.best_step,
                "best_gold": self.best_gold if self.best_step is not None else None}

    def load_state_dict(self, state: dict) -> None:
        for key in ("steps", "proxy", "gold", "kl", "recent", "warned", "best_step"):
            setattr(self, key, state[key])
        self.best_gold = -math.inf if state["best_gold"] is None else state["best_gold"]

    def forget_best(self) -> None:
        self.best_step, self.best_gold = None, -math.inf

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


@dataclass
class CollapseWatch:
    """Console warnings, once each per run, when a run is collapsing rather than learning: the
    share of degenerate completions in a step's batch (rollout/degenerate) reaches
    logging.warn_degenerate, or the KL to the reference per response token (rl/kl_per_token)
    reaches logging.warn_kl. Both follow too high a learning rate or too weak a KL leash; without
    a word, such a run (KL 97 nats, every completion 'omacomac...') finishes looking normal.
    The run goes on: algorithm.early_stop=kl with algorithm.stop_at_kl is what stops one."""

    degenerate: float  # share of the batch; 0: off
    kl_per_token: float  # nats per response token; 0: off
    warned: set[str] = field(default_factory=set)

    @classmethod
    def from_config(cls, cfg) -> "CollapseWatch":
        return cls(cfg.logging.warn_degenerate, cfg.logging.warn_kl)

    def observe(self, step: int, metrics: dict[str, float]) -> list[str]:
        """The warnings step `step`'s metrics raise (each kind at most once per run)."""
        out = []
        share, kl = metrics.get("rollout/degenerate"), metrics.get("rl/kl_per_token")
        if self.degenerate > 0 and share is not None and share >= self.degenerate and "degenerate" not in self.warned:
            self.warned.add("degenerate")
            out.append(f"tidal: warning: at rl step {step}, {100 * share:.0f}% of the batch's completions are degenerate "
                       f"(empty, symbols, or a short unit or one word repeated), at least logging.warn_degenerate="
                       f"{self.degenerate:g}: the policy is collapsing. Lower learner.lr or raise algorithm.kl_coef.")
        if self.kl_per_token > 0 and kl is not None and kl >= self.kl_per_token and "kl" not in self.warned:
            self.warned.add("kl")
            out.append(f"tidal: warning: at rl step {step} the KL to the reference is {metrics.get('rl/kl', 0.0):.3g} "
                       f"nats per sequence, {kl:.3g} per response token, at least logging.warn_kl={self.kl_per_token:g}: "
                       f"the policy is running away from the reference. Lower learner.lr, raise algorithm.kl_coef "
                       f"(algorithm.kl_target with adaptive KL), or stop at a KL budget (algorithm.early_stop=kl).")
        return out


class HeldOutJudge:
    """Scores the pool's current policy on the selection prompts: proxy, gold per prompt, KL."""

    def __init__(self, cfg, prompts, gold):
        from tidal.driver.heldout import Seeds, eval_sampling

        self.prompts, self.gold = prompts, gold  # PromptBatch of the selection set; the gold judge
        self.sampling = eval_sampling(cfg, Seeds.SELECTION)

    def __call__(self, pool, reward, learners) -> tuple[dict[str, float], list[float]]:
        """(metrics, gold score per selection prompt in prompt order)."""
        from tidal.driver.heldout import evaluate_pool

        ev = evaluate_pool(pool, learners, self.prompts, self.sampling, reward, self.gold)
        kl = statistics.fmean(ev.kl)
        return {"eval/proxy": statistics.fmean(ev.proxy), "eval/gold": statistics.fmean(ev.gold), "eval/kl": kl,
                "eval/sqrt_kl": gao_x(kl)}, ev.gold

    def close(self) -> None:
        self.gold.close()


def print_warning(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
