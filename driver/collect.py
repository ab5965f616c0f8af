"""The `collect` stage: sample the current policy for new human (or simulated) labels, so the
next `rm` stage refreshes the reward model on what the policy now produces.

    stages.run: [sft, rm, rl, collect, rm, rl]

One collect round writes a feedback folder RUN/feedback-<round>/ (tidal.feedback.store): for
feedback.prompts training prompts (an order of their own per round), feedback.responses samples
of the current policy each, drawn by a rollout pool, every response recorded with its source
(the stage and policy folder) and weight version. Then:
  * feedback.labeler: simulated - a simulated labeler ranks them at once from a gold judge the
    policy never trains on (feedback.gold: a rule reward, e.g. VADER sentiment), with
    Bradley-Terry noise (feedback.temperature) and a share of random labels (feedback.error_rate);
  * feedback.labeler: human - the run stops with the command that serves the labeling app;
    `tidal train --resume RUN` goes on once feedback.min_labels tasks are labeled.
The labels are exported next to the store (comparisons.jsonl, rankings.jsonl) in the formats the
rm stage reads, each labeler's rows weighted by its reliability from gold tasks (a comparison's
weight times it; a labeler below feedback.min_reliability left out); the next rm stage continues
from the previous reward model on them plus feedback.old_data of the earlier preference data.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from tidal.common.config import TidalConfig
from tidal.common.metrics import MetricsLogger


class WaitingForLabels(Exception):
    """A human-labeled collect round has fewer labels than feedback.min_labels (not an error)."""

    def __init__(self, folder: Path, labeled: int, needed: int, run_dir: Path):
        self.folder, self.labeled, self.needed = folder, labeled, needed
        super().__init__(
            f"collect: {labeled} of {needed} needed tasks are labeled in {folder}. Serve the labeling app with "
            f"`tidal label serve {folder}` (add labelers with `tidal label add-labeler {folder} NAME`), then continue "
            f"with `tidal train --resume {run_dir}`.")


def gold_judge(cfg: TidalConfig):
    """(prompts, completions) -> scores of feedback.gold (a rule reward kind, or 'module:function'),
    the gold judge tidal.driver.heldout.build_gold builds for the monitor too."""
    from tidal.driver.heldout import build_gold, feedback_gold_term

    return build_gold(cfg, feedback_gold_term(cfg)).score_texts


def sample_tasks(cfg: TidalConfig, policy: str, prompts_path: Path, round_: int, source: str):
    """feedback.prompts prompts x feedback.responses samples of `policy`, as feedback tasks."""
    from tidal.feedback.store import NewTask

    from tidal.driver.heldout import Seeds

    fb = cfg.feedback
    order, sampling = Seeds(cfg.seed).collect(round_)
    batch, texts = prompt_batch(cfg, policy, prompts_path, fb.prompts, seed=order)
    responses = sample_responses(cfg, policy, batch, fb.responses, seed=sampling, source=source)
    return [NewTask(prompt, rows) for prompt, rows in zip(texts, responses)]


def prompt_batch(cfg: TidalConfig, tokenizer: str, prompts_path: Path, m: int, seed: int):
    """The first m prompts of the file in a seeded order: (PromptBatch, the prompts as written)."""
    from tidal.common.prompts import PromptDataset

    ds = PromptDataset.from_config(prompts_path, tokenizer, cfg.data, seed=seed)
    batch = ds.next_batch(min(m, len(ds)))
    return batch, [ds.records[i].prompt for i in batch.index]


def sample_responses(cfg: TidalConfig, policy: str, batch, k: int, seed: int, source: str):
    """k samples of `policy` (an HF folder) per prompt of `batch`, drawn by a rollout pool of
    the run's rollout settings; per prompt a list of TaskResponse(text, source, weight version)."""
    from tidal.driver.heldout import eval_sampling, sample
    from tidal.feedback.store import TaskResponse

    rollout = sample(policy, batch, eval_sampling(cfg, seed, n=k), cfg)
    return [[TaskResponse(rollout.response_text[r], source=source, version=str(rollout.weight_version[r]))
             for r in range(p * k, (p + 1) * k)] for p in range(len(batch.index))]


def run_collect(cfg: TidalConfig, run_dir: Path, logger: MetricsLogger, data, policy: str, round_: int,
                stage: str) -> dict:
    """One collect round (see the module doc); returns the stage record {output, comparisons, rankings, ...}."""
    from tidal.driver.checkpoint import atomic_write_text
    from tidal.feedback.export import export_rows, to_jsonl
    from tidal.feedback.simulated import SimulatedLabeler
    from tidal.feedback.stats import reliability
    from tidal.feedback.store import FeedbackStore

    fb = cfg.feedback
    folder = run_dir / f"feedback-{round_}"
    store = FeedbackStore(folder, create=True)
    store.configure(min_reliability=fb.min_reliability)  # the researcher page shows who is left out
    if not store.tasks():  # a resumed round keeps the tasks (and labels) it already has
        tasks = sample_tasks(cfg, policy, data.prompts, round_, source=f"{stage}:{policy}")
        store.add_tasks(tasks, overlap_fraction=0.0 if fb.labeler == "simulated" else None, seed=cfg.seed + round_,
                        duplicates="drop")  # samples may repeat; a ranking row may not
        print(f"tidal: collect round {round_}: {len(tasks)} prompts x {fb.responses} responses of {policy} in {folder}",
              flush=True)
    if fb.labeler == "simulated":
        SimulatedLabeler(gold_judge(cfg), fb.temperature, fb.error_rate, seed=cfg.seed + round_).label(store)
    labeled = len({lab.task_id for lab in store.labels() if lab.ranking is not None})
    if labeled < fb.min_labels:
        raise WaitingForLabels(folder, labeled, fb.min_labels, run_dir)
    out = {"output": str(folder), "labels": labeled}
    weights = {k: v["weight"] for k, v in reliability(store.labels(), store.tasks(), fb.min_reliability).items()}
    for fmt in ("comparisons", "rankings"):  # tidal's own files in its own folder: rewritten when the round reruns
        out[fmt] = str(folder / f"{fmt}.jsonl")
        rows = [r for r in export_rows(store, fmt) if _distinct(r)]  # equal samples teach the reward model nothing
        atomic_write_text(Path(out[fmt]), to_jsonl(weighted(rows, weights)))
    gold = gold_judge(cfg)
    scores = [s for t in store.tasks().values() for s in gold([""] * len(t.responses), [r.text for r in t.responses])]
    logger.log(round_, {f"{stage}/tasks": float(len(store.tasks())), f"{stage}/labels": float(labeled),
                        f"{stage}/gold_mean": statistics.fmean(scores) if scores else 0.0}, stage=stage)
    return out


def weighted(rows: list[dict], weights: dict[str, float]) -> list[dict]:
    """Export rows with each labeler's reliability (tidal.feedback.stats.reliability) applied: a
    comparison's weight times it, and no row of a labeler that weighs 0 (rankings carry no weight)."""
    out = []
    for r in rows:
        w = weights.get(r["labeler"], 1.0)
        if w > 0:
            out.append({**r, "weight": r["weight"] * w} if "weight" in r else r)
    return out


def _distinct(row: dict) -> bool:
    """An exported row without two equal responses (a policy may sample the same text twice)."""
    texts = [row["chosen"], row["rejected"]] if "chosen" in row else row["responses"]
    return len({t.strip() for t in texts}) == len(texts)
