"""The data behind every plot of a run, one panel per question a user asks of it.

`RUN/metrics.jsonl` mixes stages that count their own steps (sft, rm, rl, and later rounds rm2,
rl2, ...), metrics on unrelated scales and metrics of different kinds (seconds per phase, 0/1
flags, one-off evaluations). A `Panel` holds what one axes shows, already separated: one
stage's x axis (RL step, RM step, ...), a left and a right y axis for two scales, stacked phase
times that add up to the step's wall time, reference lines (the KL target), and before/after
bars. `tidal.common.dashboard` draws them: the dashboard (`RUN/dashboard.png`, the first look)
and the report pages (`RUN/plots/*.png`, one page per question):

    learning          is it learning? RL reward per step and per term, held-out before/after, SFT/DPO loss
    overoptimisation  is it over-optimising? KL (target, coefficient), held-out proxy vs gold,
                      reward against sqrt(KL) (Gao et al. 2022), length and degenerate share
    time              where does the time go? phases of a step, idle roles, throughput
    reward_model      is the reward model still right? its fit, held-out RM score vs the gold judge,
                      online RLHF's label arrival and online accuracy per reward-model version
    update            is the update healthy? losses, clipping, approx KL, entropy, learning rate
    other             every metric no question page shows, one small axes each

With online RLHF (feedback.mode=online) the reward, KL and gold panels of the rl stage carry
the reward-model versions as bands: the steps each version scored (online/reward_version).

Panels are pure data (lists of numbers) so tests can check what each one shows.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Phases of the learner (main) thread: they run one after another, so with "other" (what no
# timer covers) they add up to the step's wall time, time/step_s. The rollout thread's phases
# (generate, score, load_weights) overlap them: in sync mode the learner waits for them
# (wait_rollout), in async mode they run during the update. Stacking both counted them twice.
ROLLOUT_PHASES = ("generate", "score", "load_weights")
PHASE_ORDER = ("wait_rollout", "forward", "advantages", "update", "sync")
STAGE_AXES = {"sft": "SFT step", "rm": "RM step", "dpo": "DPO step", "rl": "RL step"}
HELD_OUT = (("rm_score", "reward-model score"), ("vader", "VADER (gold)"), ("reward", "reward (raw)"))


@dataclass
class Line:
    label: str
    x: list[float]
    y: list[float]
    right: bool = False  # on the panel's second y axis
    flag: bool = False  # a 0/1 switch: drawn as steps, not a curve


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str = ""
    right_label: str = ""
    lines: list[Line] = field(default_factory=list)
    stack: list[Line] = field(default_factory=list)  # stacked areas that add up to a total
    hlines: list[tuple[str, float]] = field(default_factory=list)  # (label, y) reference lines, left axis
    bars: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)  # label -> (before, after)
    missing: str = ""  # what a run would have to log for this panel
    ylim: tuple[float, float] | None = None  # fixed ranges of shares (0..1)
    right_ylim: tuple[float, float] | None = None
    bands: list[tuple[float, float, str]] = field(default_factory=list)  # (x from, x to, label): RM versions

    @property
    def empty(self) -> bool:
        return not (self.lines or self.stack or self.bars)

    def line(self, label: str) -> Line:
        return next(ln for ln in (*self.lines, *self.stack) if ln.label == label)


class RunMetrics:
    """metrics.jsonl by stage: values[stage][metric][step] (a step logged twice, as a resumed
    run redoes it, keeps its latest value), plus the run's config where it is readable."""

    def __init__(self, records: list[dict], config=None):
        self.values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
        for rec in records:
            stage = str(rec.get("stage") or "run")
            for key, value in rec.items():
                if key not in ("step", "stage", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    self.values[stage][key][int(rec["step"])] = float(value)
        self.config = config
        self.used: set[str] = set()  # every metric a panel asked for (the rest go to the "other" page)

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "RunMetrics":
        from tidal.common.metrics import read_metrics

        config = None
        path = Path(run_dir) / "config.yaml"
        if path.is_file():
            from tidal.common.config import load_config

            try:
                config = load_config(path)
            except Exception:  # noqa: BLE001 - a config from another tidal version: plots without targets
                config = None
        return cls(read_metrics(run_dir), config)

    def rounds(self, base: str) -> list[str]:
        """The stage keys of `base` in order: rl, rl2, rl3, ..."""
        keys = [k for k in self.values if re.fullmatch(rf"{base}\d*", k)]
        return sorted(keys, key=lambda k: int(k[len(base):] or 1))

    def series(self, base: str, metric: str, label: str | None = None, right: bool = False,
               flag: bool = False) -> list[Line]:
        """One line per round of `base` that logged `metric`; later rounds continue the x axis
        where the earlier one ended, so rl2's step 1 follows rl's last step."""
        out, offset = [], 0
        rounds = self.rounds(base)
        self.used.add(metric)
        for key in rounds:
            points = self.values[key].get(metric, {})
            steps = sorted(s for s in points if math.isfinite(points[s]))
            if steps:
                name = label or metric
                out.append(Line(name if len(rounds) == 1 else f"{name} ({key})", [s + offset for s in steps],
                                [points[s] for s in steps], right, flag))
            offset += max((s for m in self.values[key].values() for s in m), default=0)
        return out

    def points(self, base: str, metric: str) -> dict[float, float]:
        """x -> value of `metric` over every round of `base` (the x axis of `series`)."""
        return {x: y for ln in self.series(base, metric) for x, y in zip(ln.x, ln.y)}

    def names(self, base: str) -> set[str]:
        return {m for key in self.rounds(base) for m in self.values[key]}


# ---------------------------------------------------------------------------- the panels


def version_bands(m: RunMetrics) -> list[tuple[float, float, str]]:
    """Online RLHF: (first step - 1/2, last step + 1/2, 'RM vK') of each run of RL steps one
    reward-model version scored; none for a run whose reward model never changed."""
    points = sorted(m.points("rl", "online/reward_version").items())
    bands: list[tuple[float, float, str]] = []
    for x, v in points:
        label = f"RM v{int(v)}"
        if bands and bands[-1][2] == label:
            bands[-1] = (bands[-1][0], x + 0.5, label)
        else:
            bands.append((x - 0.5, x + 0.5, label))
    return bands if len({b[2] for b in bands}) > 1 else []


def rl_reward(m: RunMetrics) -> Panel:
    return Panel("Is it learning? reward of the training batch", "RL step", "reward (as RL optimises it)",
                 lines=m.series("rl", "rl/score_mean", "reward"), missing="rl/score_mean", bands=version_bands(m))


def online_feedback(m: RunMetrics) -> Panel:
    """Online RLHF: labels arriving per RL step, and each new version's accuracy on the newest
    labels before any fit had seen them (right axis), with the versions as bands."""
    arrived = [Line("new labels per step", ln.x, [b - a for a, b in zip([0.0, *ln.y], ln.y)])
               for ln in m.series("rl", "online/labels")]
    return Panel("Online feedback: label arrival and online accuracy", "RL step", "labels", "online accuracy",
                 lines=[*arrived, *m.series("rl", "online/online_accuracy", "online accuracy", right=True)],
                 missing="online/labels (feedback.mode=online)", right_ylim=(-0.02, 1.02), bands=version_bands(m))


def reward_terms(m: RunMetrics) -> Panel:
    lines = [ln for name in sorted(m.names("rl")) if name.startswith("reward/term/")
             for ln in m.series("rl", name, name.removeprefix("reward/term/"))]
    return Panel("Each reward term (raw, training batch)", "RL step", "score", lines=lines, missing="reward/term/*")


def held_out(m: RunMetrics) -> Panel:
    """Held-out reporting prompts before and after RL (the last round's evaluation)."""
    evals = [k for k in m.values if k == "eval" or k.startswith("eval-")]
    ev = {name: points[max(points)] for name, points in m.values[evals[-1]].items()} if evals else {}
    m.used.update(f"eval/{key}_{when}" for key, _ in HELD_OUT for when in ("before", "after"))
    bars = {label: (ev.get(f"eval/{key}_before"), ev.get(f"eval/{key}_after")) for key, label in HELD_OUT
            if f"eval/{key}_before" in ev or f"eval/{key}_after" in ev}
    return Panel("Held-out prompts: before and after RL", "", "mean score", bars=bars, missing="eval/*_before/after")


def kl(m: RunMetrics) -> Panel:
    """KL to the reference with what steers it: the adaptive controller's target and its
    coefficient (right axis), and the KL budget of algorithm.early_stop=kl."""
    p = Panel("How far has it moved? KL to the reference", "RL step", "nats per sequence", "KL coefficient",
              lines=[*m.series("rl", "rl/kl", "KL"), *m.series("rl", "rl/kl_coef", "kl_coef", right=True)],
              missing="rl/kl", bands=version_bands(m))
    a = m.config.algorithm if m.config is not None else None
    if a is not None and a.adaptive_kl:
        p.hlines.append(("kl_target (adaptive)", a.kl_target))
    if a is not None and a.early_stop == "kl" and a.stop_at_kl is not None:
        p.hlines.append(("stop_at_kl", a.stop_at_kl))
    return p


def collapse(m: RunMetrics) -> Panel:
    return Panel("Are completions collapsing? length and degenerate share", "RL step", "response tokens",
                 "degenerate share", lines=[*m.series("rl", "experience/response_len", "response length"),
                                            *m.series("rl", "rollout/degenerate", "degenerate share", right=True)],
                 missing="experience/response_len", right_ylim=(-0.02, 1.02))


def heldout_gold(m: RunMetrics) -> Panel:
    """The over-optimisation monitor's held-out evaluations (logging.gold_every)."""
    return Panel("Held-out proxy and gold during RL (monitor)", "RL step", "mean score",
                 lines=[*m.series("rl", "eval/proxy", "proxy (trained on)"), *m.series("rl", "eval/gold", "gold")],
                 missing="eval/proxy, eval/gold (logging.gold_every > 0)", bands=version_bands(m))


def gao(m: RunMetrics) -> Panel:
    """Reward against sqrt(KL): the axis of Gao et al. 2022's over-optimisation curves."""
    lines = []
    for base_metric, label in (("rl/score_mean", "training reward"), ("eval/proxy", "held-out proxy"),
                               ("eval/gold", "held-out gold")):
        kl_metric = "rl/kl" if base_metric.startswith("rl/") else "eval/kl"
        for key in m.rounds("rl"):
            ys, ks = m.values[key].get(base_metric, {}), m.values[key].get(kl_metric, {})
            steps = sorted(s for s in ys if s in ks)
            if steps:
                lines.append(Line(label, [math.sqrt(max(ks[s], 0.0)) for s in steps], [ys[s] for s in steps]))
    return Panel("Reward against sqrt(KL) (Gao et al. 2022)", "sqrt(KL to the reference)", "reward", lines=lines,
                 missing="rl/score_mean, rl/kl")


def rl_losses(m: RunMetrics) -> Panel:
    """The policy loss on the left; the critic's (or else the KL / ptx) loss on its own scale."""
    other = next((n for n in ("losses/value", "losses/kl", "losses/ptx") if n in m.names("rl")), None)
    lines = m.series("rl", "losses/policy", "policy loss")
    right = "" if other is None else other.removeprefix("losses/") + " loss"
    if other is not None:
        lines += m.series("rl", other, right, right=True)
    return Panel("RL losses (each on its own axis)", "RL step", "policy loss", right, lines=lines,
                 missing="losses/policy")


def fit_losses(m: RunMetrics) -> Panel:
    lines = [*m.series("sft", "losses/sft", "SFT loss"), *m.series("dpo", "losses/dpo", "DPO loss", right=True)]
    xlabel = " / ".join(STAGE_AXES[s] for s in ("sft", "dpo") if m.rounds(s)) or "step"
    return Panel("Did SFT / DPO learn? loss per step", xlabel, "SFT loss", "DPO loss" if m.rounds("dpo") else "",
                 lines=lines, missing="losses/sft or losses/dpo")


def reward_model(m: RunMetrics) -> Panel:
    """The reward model's fit per RM step: loss, training pair accuracy, held-out accuracy."""
    lines = [*m.series("rm", "losses/reward", "loss"),
             *m.series("rm", "reward/train_accuracy", "train pair accuracy", right=True),
             *m.series("rm", "rm/eval_accuracy", "held-out pair accuracy", right=True)]
    return Panel("Is the reward model right? its fit", "RM step", "loss", "pair accuracy", lines=lines,
                 missing="losses/reward (an rm stage)")


def rm_vs_gold(m: RunMetrics) -> Panel:
    p = held_out(m)
    p.bars = {k: v for k, v in p.bars.items() if k != "reward (raw)"}
    p.title = "Does the RM agree with the gold judge? (held-out)"
    return p


def phase_times(m: RunMetrics) -> Panel:
    """Learner-thread phases stacked, plus what no timer covers: the stack's top is the step's
    wall time. The rollout thread's busy time is a line of its own (it overlaps the stack)."""
    names = m.names("rl")
    phases = [p for p in PHASE_ORDER if f"time/{p}_s" in names]
    phases += sorted(n[5:-2] for n in names if n.startswith("time/") and n.endswith("_s")
                     and n[5:-2] not in (*PHASE_ORDER, *ROLLOUT_PHASES, "step"))
    wall = m.points("rl", "time/step_s")
    stack = [(p, m.points("rl", f"time/{p}_s")) for p in phases]
    xs = sorted(wall) if wall else sorted({x for _, pts in stack for x in pts})
    stack.append(("other (untimed)", {x: max(0.0, wall[x] - sum(pts.get(x, 0.0) for _, pts in stack)) for x in wall}))
    gen, score = m.points("rl", "time/generate_s"), m.points("rl", "time/score_s")
    lines = [Line("step wall time", xs, [wall[x] for x in xs])] if wall else []
    if gen:
        lines.append(Line("rollout thread busy (generate + score)", sorted(gen),
                          [gen[x] + score.get(x, 0.0) for x in sorted(gen)]))
    return Panel("Where does a step's time go? (s)", "RL step", "seconds", lines=lines,
                 stack=[Line(p, xs, [pts.get(x, 0.0) for x in xs]) for p, pts in stack if pts] if phases else [],
                 missing="time/*_s")


def idle(m: RunMetrics) -> Panel:
    lines = [ln for role in ("rollout", "learner", "reward") for ln in m.series("rl", f"idle/{role}", role)]
    return Panel("Which role sits idle? (share of the step)", "RL step", "idle share", lines=lines,
                 missing="idle/*", ylim=(-0.02, 1.02))


def throughput(m: RunMetrics) -> Panel:
    return Panel("Throughput", "RL step", "response tokens / s",
                 lines=[*m.series("rl", "rl/tokens_per_s", "tokens/s"),
                        *m.series("rl", "time/load_weights_s", "weight load (s)", right=True)],
                 right_label="seconds", missing="rl/tokens_per_s")


def update_health(m: RunMetrics) -> list[Panel]:
    """The RL update: clipping and approximate KL of a step's minibatches, entropy, learning rate."""
    def panel(title: str, left: str, right: str | None, ylabel: str, rlabel: str = "") -> Panel:
        lines = m.series("rl", left) + (m.series("rl", right, right=True) if right else [])
        return Panel(title, "RL step", ylabel, rlabel, lines=lines, missing=left)

    return [panel("PPO clipping and approximate KL of the update", "policy/clipfrac", "policy/approx_kl",
                  "clipped share", "approx KL"),
            panel("Policy entropy (nats per token)", "policy/entropy", None, "nats"),
            panel("Learning rate", "lr", None, "lr")]


DASHBOARD = (rl_reward, held_out, kl, collapse, rl_losses, phase_times, fit_losses, reward_model, idle)
PAGES = {
    "learning": ("Is it learning?", (rl_reward, reward_terms, held_out, fit_losses)),
    "overoptimisation": ("Is it over-optimising?", (kl, heldout_gold, gao, collapse)),
    "time": ("Where does the time go?", (phase_times, idle, throughput)),
    "reward_model": ("Is the reward model still right?", (reward_model, rm_vs_gold, online_feedback)),
    "update": ("Is the update healthy?", (rl_losses, update_health)),
}


def page_panels(m: RunMetrics, builders) -> list[Panel]:
    out: list[Panel] = []
    for build in builders:
        made = build(m)
        out += made if isinstance(made, list) else [made]
    return out


def other_panels(m: RunMetrics) -> list[Panel]:
    """One small panel per metric no panel built so far asked for, per stage; 0/1 switches as
    flags (build the question pages first)."""
    out = []
    for stage in sorted(m.values):
        for name in sorted(m.values[stage]):
            if name in m.used:
                continue
            points = m.values[stage][name]
            steps = sorted(points)
            flag = set(points.values()) <= {0.0, 1.0}
            base = stage.rstrip("0123456789")
            out.append(Panel(f"{stage}: {name}", STAGE_AXES.get(base, "step"),
                             lines=[Line(name, steps, [points[s] for s in steps], flag=flag)]))
    return out
