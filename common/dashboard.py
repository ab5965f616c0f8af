"""A run's pictures: `RUN/dashboard.png`, the first look on one page, and `RUN/plots/*.png`,
one page per question (`tidal report RUN` redraws both; the job draws them when it ends).

The dashboard's nine panels: the training reward per RL step; the held-out prompts before and
after RL (reward-model score, VADER, raw reward); the KL to the reference with the adaptive
controller's target and its coefficient; response length with the degenerate share; the RL
losses, each on its own axis; where a step's time goes (the learner thread's phases stacked,
adding up to the step's wall time); SFT/DPO loss per step; the reward model's fit per RM step;
the idle share of each role. Every stage has its own x axis (an RM step is not an RL step),
and a panel whose metrics a run did not log says so instead of vanishing, so the layout is the
same for every run. What each panel shows is `tidal.common.report`'s (pure data, tested).
"""

from __future__ import annotations

import math
from pathlib import Path

from tidal.common.report import DASHBOARD, PAGES, Panel, RunMetrics, other_panels, page_panels

DASHBOARD_FILE = "dashboard.png"
PLOTS = "plots"


def draw_panel(ax, panel: Panel) -> None:
    """One panel on matplotlib axes `ax`: stack, lines (left / right axis), reference lines, bars."""
    ax.set_title(panel.title, fontsize=9, loc="left")
    ax.grid(alpha=0.3)
    if panel.empty:
        ax.text(0.5, 0.5, f"not in this run:\n{panel.missing}", transform=ax.transAxes, ha="center", va="center",
                color="gray", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if panel.bars:
        _bars(ax, panel)
        return
    if panel.stack:
        ax.stackplot(panel.stack[0].x, [s.y for s in panel.stack], labels=[s.label for s in panel.stack], alpha=0.75)
    right = ax.twinx() if any(ln.right for ln in panel.lines) else None
    for i, ln in enumerate(panel.lines):
        target = right if ln.right else ax
        style = {"drawstyle": "steps-post"} if ln.flag else {"marker": "." if len(ln.x) < 60 else None}
        if len(ln.x) == 1:
            style["marker"] = "o"
        color = "black" if panel.stack and i == 0 else f"C{(i + len(panel.stack)) % 10}"
        target.plot(ln.x, ln.y, label=ln.label, color=color, linestyle="--" if ln.right else "-", **style)
        if not all(math.isfinite(v) for v in ln.y):
            ax.text(0.99, 0.02, "non-finite values not drawn", transform=ax.transAxes, ha="right", fontsize=6)
    for j, (x0, x1, label) in enumerate(panel.bands):  # reward-model versions (online RLHF)
        ax.axvspan(x0, x1, color="C7", alpha=0.12 if j % 2 else 0.04, linewidth=0)
        ax.text(x0, 0.99, label, transform=ax.get_xaxis_transform(), fontsize=5, va="top", color="dimgray")
    for j, (label, y) in enumerate(panel.hlines):
        ax.axhline(y, color="gray", linestyle=":" if j else "-.", linewidth=1, label=f"{label} = {y:g}")
    ax.set_xlabel(panel.xlabel, fontsize=8)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    xs = {x for ln in panel.lines for x in ln.x}
    if len(xs) == 1:  # one evaluation: one tick, not a range of fractions around it
        ax.set_xticks(sorted(xs))
    elif panel.xlabel.endswith("step"):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    handles, labels = ax.get_legend_handles_labels()
    if right is not None:
        right.set_ylabel(panel.right_label, fontsize=8)
        if panel.right_ylim is not None:
            right.set_ylim(*panel.right_ylim)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if any(ln.flag for ln in panel.lines):
        ax.set_yticks([0, 1])
    if len(labels) > 1 or panel.hlines:  # a lone line is named by the title
        ax.legend(handles, labels, fontsize=6, loc="best", ncol=2 if len(labels) > 4 else 1)


def _bars(ax, panel: Panel) -> None:
    labels = list(panel.bars)
    width = 0.38
    for k, (when, color) in enumerate((("before RL", "C7"), ("after RL", "C0"))):
        values = [panel.bars[lb][k] for lb in labels]
        xs = [i + (k - 0.5) * width for i in range(len(labels))]
        ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], width,
               label=when, color=color)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.legend(fontsize=6)


def _figure(panels: list[Panel], columns: int, title: str, width: float = 4.6, height: float = 3.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(width * columns, height * rows + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        draw_panel(ax, panel)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    return fig


def plot_dashboard(run_dir: str | Path) -> Path:
    """Write RUN/dashboard.png from RUN/metrics.jsonl and return its path."""
    run_dir = Path(run_dir)
    m = RunMetrics.of_run(run_dir)
    if not m.values:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no numeric metrics to draw.")
    fig = _figure([build(m) for build in DASHBOARD], 3, f"tidal run {run_dir.name}")
    path = run_dir / DASHBOARD_FILE
    fig.savefig(path, dpi=80)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write one page per question into RUN/plots/ (pages with nothing to show are left out),
    then the metrics none of them shows (plots/other.png); returns the paths."""
    run_dir = Path(run_dir)
    m = RunMetrics.of_run(run_dir)
    if not m.values:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no numeric metrics to plot.")
    out_dir = run_dir / PLOTS
    out_dir.mkdir(exist_ok=True)
    paths = []
    for name, (question, builders) in PAGES.items():
        panels = [p for p in page_panels(m, builders) if not p.empty]
        if panels:
            paths.append(_save(_figure(panels, 2, f"{question}  ({run_dir.name})"), out_dir / f"{name}.png"))
    rest = other_panels(m)
    if rest:
        fig = _figure(rest, 4, f"Every other metric  ({run_dir.name})", width=3.4, height=2.2)
        paths.append(_save(fig, out_dir / "other.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=80)
    return path
