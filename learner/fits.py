"""The supervised fits of a `LearnerGroup` (SFT, expert-iteration rounds, DPO, reward model):
shard the data once, then train in windows of STEPS_PER_CALL optimizer steps, each window one
remote call under the sync timeout. `SupervisedFits` is a collaborator the group owns
(`LearnerGroup.fits`); it reaches the ranks only through the calls it is built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tidal.common.config import TidalConfig
from tidal.learner.dpo import DPOBatch, sequence_logps
from tidal.learner.reward_model import PreferenceBatch, pair_accuracy
from tidal.learner.sft import SFTBatch
from tidal.learner.worker import FitPlan

STEPS_PER_CALL = 8  # optimizer steps per remote fit call: each call is bounded by the sync timeout
Progress = Callable[[list, int], None]  # (history so far, total steps): called before and after each window
RankCall = Callable[[str, dict[int, Callable[[Any], Any]]], list]  # (method, {rank: fn(handle)}) -> values by rank
Scores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, T) ids, mask -> (N,) reward-model scores
Logprobs = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]  # (B, P+R) ids, mask, R, T -> (B, R)


def train_shards(n: int, world_size: int) -> list[torch.Tensor]:
    """Row indices per rank for training: equal contiguous ranges; the n % world_size trailing
    rows are left out (every rank must take the same number of optimizer steps)."""
    k = n // world_size
    if k == 0:
        raise ValueError(f"{n} rows cannot feed {world_size} learner ranks; need at least one row per rank")
    return [torch.arange(r * k, (r + 1) * k) for r in range(world_size)]


@dataclass(frozen=True)
class RewardFit:
    history: list[dict[str, float]]  # per optimizer step
    eval_accuracy: float | None  # held-out pair accuracy (None without held-out data)
    reward_mean: float  # score statistics over the training (+ held-out) responses,
    reward_std: float  # saved with the model for reward normalization


class SupervisedFits:
    """The fits of one learner group.

    call: runs {rank: fn(handle)} on the ranks and returns their values in rank order, or raises
        the group's error naming the rank that failed (LearnerGroup._call).
    put: what a rank's call receives for its data shard (ActorGroup.put).
    compute_logprobs / compute_scores: the group's sharded forward passes (policy log-probs for
        the DPO reference; reward-model scores for the held-out accuracy and normalisation)."""

    def __init__(self, cfg: TidalConfig, world_size: int, call: RankCall, put: Callable[[Any], Any],
                 compute_logprobs: Logprobs, compute_scores: Scores):
        self.cfg, self.world_size, self.call, self.put = cfg, world_size, call, put
        self.compute_logprobs, self.compute_scores = compute_logprobs, compute_scores
        self.reward_stats: dict[str, float] = {}  # set by fit_reward; saved with the reward model

    def _fit(self, method: str, data, epochs: int, max_steps: int | None, lr: float,
             extra: tuple = (), on_progress: Progress | None = None,
             schedule: str | None = None) -> list[dict[str, float]]:
        """Shard `data` (SFTBatch or PreferenceBatch) once, then run the fit in windows of
        STEPS_PER_CALL optimizer steps, each window one remote call under the sync timeout."""
        shards = train_shards(len(data), self.world_size)
        mini = self.cfg.learner.mini_batch_size // self.world_size
        steps_per_epoch = len(shards[0]) // mini
        if steps_per_epoch == 0:
            raise ValueError(f"{method}: {len(data)} examples give {len(shards[0])} per rank, fewer than one minibatch "
                             f"({mini} per rank = learner.mini_batch_size / num_workers); add data or lower mini_batch_size")
        total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
        refs = [self.put(data.select(s)) for s in shards]
        history: list[dict[str, float]] = []
        if on_progress:
            on_progress(history, total)
        for start in range(0, total, STEPS_PER_CALL):
            plan = FitPlan(lr, total, start, min(STEPS_PER_CALL, total - start), steps_per_epoch, schedule)
            calls = {r: (lambda a, ref=ref: getattr(a, method).remote(ref, plan, *extra)) for r, ref in enumerate(refs)}
            history += self.call(method, calls)[0]  # rank 0 holds the averages
            if on_progress:
                on_progress(history, total)
        return history

    def fit_sft(self, data: SFTBatch, epochs: int | None = None, max_steps: int | None = None,
                lr: float | None = None, on_progress: Progress | None = None) -> list[dict[str, float]]:
        """Supervised fine-tuning on demonstrations (prompt tokens masked out). Defaults from
        stages.sft; lr None -> stages.sft.lr or learner.lr. Returns per-step metrics."""
        st = self.cfg.stages.sft
        return self._fit("fit_sft", data, epochs or st.epochs, max_steps or st.max_steps,
                         lr or st.lr or self.cfg.learner.lr, on_progress=on_progress)

    def update_sft(self, data: SFTBatch, epochs: int, lr: float) -> dict[str, float]:
        """One expert-iteration round: `epochs` passes of SFT over `data` at a constant `lr`
        (the RL stage's schedule sets it per round); `data` must fill whole minibatches on every
        rank. Returns the round's metrics averaged over its optimizer steps."""
        history = self._fit("fit_sft", data, epochs, None, lr, schedule="constant")
        return {k: sum(h[k] for h in history) / len(history) for k in history[0] if k not in ("step", "epoch", "lr")}

    def dpo_reference(self, data: DPOBatch) -> DPOBatch:
        """`data` with the reference sequence log-probs attached, computed by this group's policy
        as it is now (call before any update: a freshly built group IS the frozen model it
        loaded, dropout off, LoRA adapters still zero), so no second model is held for DPO."""
        token_lp = self.compute_logprobs(data.input_ids, data.attention_mask, data.response_len, 1.0)  # (2N, R)
        return data.with_reference(sequence_logps(token_lp, data.response_mask))

    def fit_dpo(self, data: DPOBatch, epochs: int | None = None, max_steps: int | None = None,
                lr: float | None = None, on_progress: Progress | None = None) -> list[dict[str, float]]:
        """Direct preference optimisation (stages.dpo defaults): reference log-probs once
        (`dpo_reference`, unless `data` carries them), then DPO/IPO steps; mini/micro-batch sizes
        count pairs. Returns per-step metrics (losses/dpo, dpo/rewards/*)."""
        st = self.cfg.stages.dpo
        if data.ref_logps is None:
            data = self.dpo_reference(data)
        return self._fit("fit_dpo", data, epochs or st.epochs, max_steps or st.max_steps,
                         lr or st.lr or self.cfg.learner.lr, (st.beta, st.loss, st.label_smoothing), on_progress)

    def fit_reward(self, train: PreferenceBatch, held_out: PreferenceBatch | None = None, loss: str | None = None,
                   epochs: int | None = None, max_steps: int | None = None, lr: float | None = None,
                   on_progress: Progress | None = None) -> RewardFit:
        """Reward-model training (stages.rm defaults): pairwise Bradley-Terry or K-wise ranking
        loss; mini/micro-batch sizes count prompts, each with all K of its responses. Afterwards
        the held-out pair accuracy, and score mean/std over all responses (kept for save_pretrained)."""
        st = self.cfg.stages.rm
        loss = loss or st.loss
        if loss not in ("pairwise", "ranking"):
            raise ValueError(f"unknown reward-model loss {loss!r}; choose 'pairwise' or 'ranking' (stages.rm.loss)")
        if loss == "pairwise" and train.group_size != 2:
            raise ValueError(f"stages.rm.loss=pairwise needs 2 responses per prompt, the data has {train.group_size}; "
                             "use stages.rm.loss=ranking for K-wise rankings")
        history = self._fit("fit_reward", train, epochs or st.epochs, max_steps or st.max_steps,
                            lr or st.lr or self.cfg.learner.lr, (loss,), on_progress)
        scores = [self.compute_scores(train.input_ids, train.attention_mask)]
        accuracy = None
        if held_out is not None:
            held = self.evaluate_reward(held_out)
            accuracy, scores = held["accuracy"], scores + [held["scores"]]
        all_scores = torch.cat(scores)
        self.reward_stats = {"reward_mean": all_scores.mean().item(), "reward_std": all_scores.std().item()}
        return RewardFit(history, accuracy, **self.reward_stats)

    def evaluate_reward(self, data: PreferenceBatch) -> dict:
        """{"accuracy": correctly ordered pairs / all C(K,2) pairs, "scores": (N*K,) tensor}."""
        scores = self.compute_scores(data.input_ids, data.attention_mask)
        correct, pairs = pair_accuracy(scores.view(-1, data.group_size), data.ranks)
        return {"accuracy": correct / max(pairs, 1), "scores": scores}
