"""Partial rollouts (rollout.partial: continue | abort): a step stops waiting for its longest responses.

Without them a step's generate call returns when its LONGEST response is done, so with uneven
lengths the engine idles on a few stragglers while the learner waits. Here (async mode only) a
step's generation runs in slices of rollout.partial_tokens tokens over prompts_per_step +
rollout.partial_spare prompt groups in flight; `next_batch(step, k)` returns, at a slice boundary,
the first k groups whose every sample is done - ordered by (the slice it finished in, the order
the prompt was taken), so the choice never depends on timing. The unfinished groups stay here,
the pipeline's state between steps (and in the checkpoint).

The weight push is a job on the rollout thread between two produce calls (tidal.driver.pipeline),
so an unfinished sequence is always paused at a slice boundary when new weights load. The next
call then
  * continue: goes on with it under the new weights - a new engine request of the prompt plus the
    tokens so far, at most what is left of rollout.max_new_tokens (the prefix's KV is recomputed
    with the new weights: docs/platform.md); each token records the version that sampled it and
    its engine log-prob is that version's, which is what the mismatch correction weighs;
  * abort: drops its tokens and samples it again from its prompt under the new weights (its group
    keeps its place, ahead of newer prompts), so every response is of one version.

Seeds: each slice request is seeded from (sample, attempt, slice) - `request_id` - so a continued
or restarted sequence samples the same way on every run, whichever worker serves it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidal.common.config import ConfigError, TidalConfig
from tidal.common.types import PromptBatch, RolloutBatch
from tidal.learner.experience import max_token_lag
from tidal.rollout.sampling import Sampling

if TYPE_CHECKING:
    from tidal.common.prompts import PromptDataset
    from tidal.rollout.pool import RolloutPool


def check_config(cfg: TidalConfig) -> None:
    """ConfigError (one line, naming the keys) for a rollout.partial setting that cannot run."""
    r, a = cfg.rollout, cfg.algorithm
    if r.partial == "off":
        return
    if a.mode != "async" or a.max_staleness < 1:
        raise ConfigError(f"rollout.partial={r.partial} carries unfinished responses over a weight push, which needs "
                          f"algorithm.mode=async with algorithm.max_staleness >= 1 (got mode={a.mode}, max_staleness="
                          f"{a.max_staleness}); set them, or rollout.partial=off.")
    if a.dynamic_sampling:
        raise ConfigError("rollout.partial and algorithm.dynamic_sampling=true cannot be combined yet (a step's "
                          "groups come from the slices in flight, not from extra rounds); set one of them off.")
    if cfg.feedback.mode == "online":
        raise ConfigError("rollout.partial and feedback.mode=online cannot be combined yet (online queries sample "
                          "a step's first round); set rollout.partial=off.")


def spare_groups(cfg: TidalConfig) -> int:
    """Prompt groups in flight beyond prompts_per_step (rollout.partial_spare; None: a quarter)."""
    spare = cfg.rollout.partial_spare
    return max(1, cfg.algorithm.prompts_per_step // 4) if spare is None else spare


@dataclass
class Seq:
    """One sample in flight: its response so far."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the engine's, of the version that sampled each token
    versions: list[int] = field(default_factory=list)  # weight version of each token
    text: str = ""
    finish: str = ""  # "" while running; "stop" (EOS) or "length" (rollout.max_new_tokens reached)
    done_at: int = -1  # the slice counter value when it finished
    attempt: int = 0  # abort restarts


@dataclass
class Group:
    """One prompt and its n samples, in flight."""

    serial: int  # the order its prompt was taken from the dataset
    index: int
    text: str
    ids: list[int]
    reference: str | None
    seqs: list[Seq]

    @property
    def done(self) -> bool:
        return all(s.finish for s in self.seqs)

    @property
    def done_at(self) -> int:
        return max(s.done_at for s in self.seqs)


def request_id(serial: int, sample: int, n: int, attempt: int, slice_no: int) -> int:
    """The engine-request index of one slice: a unique id per call that the pool seeds the request
    from (Sampling.prompt_seed), so the slice is sampled the same way on every run."""
    return ((serial * n + sample) * 1024 + attempt % 1024) * 4096 + slice_no


class PartialRollouts:
    """The groups in flight and the slice loop (see the module doc). Runs on the rollout thread."""

    def __init__(self, cfg: TidalConfig, dataset: "PromptDataset", pool: "RolloutPool"):
        r = cfg.rollout
        self.mode, self.slice_tokens, self.max_new = r.partial, r.partial_tokens, r.max_new_tokens
        self.n, self.spare, self.max_lag = r.n_samples, spare_groups(cfg), max_token_lag(cfg)
        self.dataset, self.pool = dataset, pool
        # one base seed for the run: a request's seed comes from its id (sample, attempt, slice)
        self.sampling = dataclasses.replace(Sampling.from_config(r, seed=(cfg.seed * 1_000_003 + 0x5EED) & 0x7FFFFFFF),
                                            n=1)
        self.groups: list[Group] = []
        self.serial = 0  # prompts taken so far
        self.slices = 0  # slices run so far
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ one step

    def next_batch(self, step: int, prompts: int) -> RolloutBatch:
        """Step `step`'s first `prompts` groups to finish, rows grouped by prompt (n each) in the
        order they finished; token_versions per row. Stats of the call in `self.stats`."""
        self.stats = {"rollout/partial_slices": 0.0, "rollout/partial_aborted_tokens": 0.0}
        self._fill(prompts + self.spare)
        self._restart(lambda s: s.versions and step - s.versions[-1] > self.max_lag)
        if self.mode == "abort":
            version = self.pool.weight_version
            self._restart(lambda s: not s.finish and s.versions and s.versions[-1] != version)
        while sum(g.done for g in self.groups) < prompts:
            self._slice()
        taken = sorted((g for g in self.groups if g.done), key=lambda g: (g.done_at, g.serial))[:prompts]
        ids = {g.serial for g in taken}
        self.groups = [g for g in self.groups if g.serial not in ids]
        self.stats["rollout/partial_carried"] = float(sum(bool(s.tokens) and not s.finish
                                                          for g in self.groups for s in g.seqs))
        batch = self._batch(taken)
        self.stats["rollout/partial_mixed"] = float(sum(len(set(v)) > 1 for v in batch.token_versions))
        return batch

    def _fill(self, k: int) -> None:
        """Take prompts (in data order) until `k` groups are in flight."""
        need = k - len(self.groups)
        if need <= 0:
            return
        batch = self.dataset.next_batch(need)
        for p, idx in enumerate(batch.index):
            ref = batch.reference[p] if batch.reference else None
            self.groups.append(Group(self.serial, idx, batch.text[p], list(batch.token_ids[p]), ref,
                                     [Seq() for _ in range(self.n)]))
            self.serial += 1

    def _restart(self, drop) -> None:
        """Sequences `drop` picks start again from their prompt: in abort mode the unfinished ones a
        weight push left behind; in both modes one whose newest token would lag the step past
        rollout.partial_max_lag (nothing of it could train: a group that finished early but was not
        taken in time, or a response still running after that many pushes)."""
        for g in self.groups:
            for i, s in enumerate(g.seqs):
                if drop(s):
                    self.stats["rollout/partial_aborted_tokens"] += len(s.tokens)
                    g.seqs[i] = Seq(attempt=s.attempt + 1)

    def _slice(self) -> None:
        """One slice: every unfinished sequence gets up to partial_tokens more tokens (one pool call
        per token budget: a sequence's last slice may be shorter)."""
        running = [(g, i, s) for g in self.groups for i, s in enumerate(g.seqs) if not s.finish]
        budgets: dict[int, list] = {}
        for g, i, s in running:
            budgets.setdefault(min(self.slice_tokens, self.max_new - len(s.tokens)), []).append((g, i, s))
        for budget, rows in sorted(budgets.items()):
            rid = [request_id(g.serial, i, self.n, s.attempt, len(s.tokens) // self.slice_tokens) for g, i, s in rows]
            prompts = PromptBatch(rid, [g.text for g, _, _ in rows], [g.ids + s.tokens for g, _, s in rows])
            out = self.pool.generate(prompts, dataclasses.replace(self.sampling, max_new_tokens=budget))
            row_of = {idx: r for r, idx in enumerate(out.prompt_index)}
            for (g, i, s), idx in zip(rows, rid):
                self._extend(s, out, row_of[idx])
        self.slices += 1
        self.stats["rollout/partial_slices"] += 1

    def _extend(self, s: Seq, out: RolloutBatch, r: int) -> None:
        new = out.response_ids[r]
        s.tokens += new
        s.logprobs += out.response_logprobs[r]
        s.versions += [out.weight_version[r]] * len(new)
        s.text += out.response_text[r]
        if out.finish_reason[r] == "stop" or len(s.tokens) >= self.max_new:
            s.finish = "stop" if out.finish_reason[r] == "stop" else "length"
            s.done_at = self.slices

    def _batch(self, groups: list[Group]) -> RolloutBatch:
        rows = [(g, s) for g in groups for s in g.seqs]
        refs = [g.reference for g, _ in rows] if any(g.reference is not None for g in groups) else []
        return RolloutBatch(
            [g.index for g, _ in rows], [g.text for g, _ in rows], [list(g.ids) for g, _ in rows],
            [s.text for _, s in rows], [list(s.tokens) for _, s in rows], [list(s.logprobs) for _, s in rows],
            [s.finish for _, s in rows], [s.versions[-1] for _, s in rows], refs,
            [list(s.versions) for _, s in rows])

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the groups in flight (tokens, log-probs, versions, restarts) and
        the counters the seeds and the order come from."""
        return {"groups": [dataclasses.asdict(g) for g in self.groups], "serial": self.serial, "slices": self.slices}

    def load_state_dict(self, state: dict) -> None:
        self.groups = [Group(**{**g, "seqs": [Seq(**s) for s in g["seqs"]]}) for g in state["groups"]]
        self.serial, self.slices = state["serial"], state["slices"]


def token_metrics(step: int, batch: RolloutBatch, max_lag: int) -> dict[str, float]:
    """rl/token_lag/<k>: the share of a step's response tokens sampled k versions before the one
    it trains; rl/tokens_stale: the share past `max_lag` (left out of the loss: learner.experience.max_token_lag);
    rl/response_len_max: its longest response (without rollout.partial, the decode steps its
    generation took)."""
    counts: dict[int, int] = {}
    for row, versions in enumerate(batch.token_versions or [[v] * len(ids) for v, ids in
                                                           zip(batch.weight_version, batch.response_ids)]):
        for v in versions:
            counts[step - v] = counts.get(step - v, 0) + 1
    total = max(sum(counts.values()), 1)
    out = {f"rl/token_lag/{k}": c / total for k, c in sorted(counts.items())}
    out["rl/tokens_stale"] = sum(c for k, c in counts.items() if k > max_lag) / total
    out["rl/response_len_max"] = float(max((len(r) for r in batch.response_ids), default=0))
    return out
