"""`RUN/dashboard.png`: the panels a person looks at first, on one page.

`plot_run` (common/metrics.py) draws every metric group into `RUN/plots/`; for a 40-step run
that is dozens of files. The dashboard answers the first questions in one image: did the
reward go up (the training reward, and the held-out before/after evaluation with the gold
VADER score where the task has one), how far the policy moved (KL), whether responses
collapsed or ran long (length), where a step's time went, and which side of the pipeline sat
idle. A panel whose metrics a run did not log says so instead of vanishing, so the layout is
the same for every run.
"""

from __future__ import annotations

from pathlib import Path

from tidal.common.metrics import read_metrics

DASHBOARD = "dashboard.png"

# (title, metrics drawn as lines); the first group found in the run's records is used
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward (training batch)", ("rl/score_mean", "rm/reward_mean")),
    ("KL to the reference (nats / sequence)", ("rl/kl", "experience/kl_per_seq")),
    ("response length (tokens)", ("experience/response_len",)),
    ("losses", ("losses/policy", "losses/value", "losses/ptx", "losses/sft", "losses/rm")),
)


def _series(records: list[dict], stage: str | None, name: str) -> tuple[list[int], list[float]]:
    points = {int(r["step"]): float(r[name]) for r in records
              if name in r and (stage is None or r.get("stage") == stage) and isinstance(r[name], (int, float))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this run", transform=ax.transAxes, ha="center", va="center", color="gray")


def plot_dashboard(run_dir: str | Path) -> Path:
    """Write RUN/dashboard.png from RUN/metrics.jsonl and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no records to draw.")
    keys = {k for r in records for k in r}
    fig = Figure(figsize=(13.0, 8.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    for ax, (title, names) in zip(axes, PANELS):
        ax.set_title(title, fontsize=10, loc="left")
        drawn = [n for n in names if n in keys]
        for name in drawn:
            ax.plot(*_series(records, None, name), marker=".", label=name)
        if title.startswith("reward"):
            drawn += _eval_points(ax, records)
        if drawn:
            ax.legend(fontsize=7)
        else:
            _empty(ax, " / ".join(names))
    _time_panel(axes[4], records, sorted(k for k in keys if k.startswith("time/") and k != "time/step_s"))
    _idle_panel(axes[5], records, sorted(k for k in keys if k.startswith("idle/")))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(f"tidal run {run_dir.name}")
    fig.tight_layout()
    path = run_dir / DASHBOARD
    fig.savefig(path, dpi=80)
    return path


def _eval_points(ax, records: list[dict]) -> list[str]:
    """Held-out evaluation before and after RL, drawn at the first and last RL step."""
    ev = next((r for r in reversed(records) if r.get("stage") == "eval"), None)
    rl_steps = [int(r["step"]) for r in records if r.get("stage") == "rl"]
    if ev is None or not rl_steps:
        return []
    drawn = []
    for key, label in (("reward", "held-out reward"), ("vader", "held-out VADER (gold)")):
        before, after = ev.get(f"eval/{key}_before"), ev.get(f"eval/{key}_after")
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            ax.plot([0, max(rl_steps)], [before, after], linestyle="--", marker="o", label=label)
            drawn.append(label)
    return drawn


def _time_panel(ax, records: list[dict], names: list[str]) -> None:
    ax.set_title("step time by phase (s; async phases overlap)", fontsize=10, loc="left")
    rl = [r for r in records if any(n in r for n in names)]
    if not names or not rl:
        _empty(ax, "time/* metrics")
        return
    steps = [int(r["step"]) for r in rl]
    ax.stackplot(steps, [[float(r.get(n, 0.0)) for r in rl] for n in names], labels=[n[5:] for n in names], alpha=0.8)
    total = _series(records, None, "time/step_s")
    if total[0]:
        ax.plot(*total, color="black", linewidth=1, label="step_s (wall)")
    ax.legend(fontsize=6, ncol=2)


def _idle_panel(ax, records: list[dict], names: list[str]) -> None:
    ax.set_title("idle fraction of each role", fontsize=10, loc="left")
    if not names:
        _empty(ax, "idle/* metrics")
        return
    for name in names:
        ax.plot(*_series(records, None, name), marker=".", label=name[5:])
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
