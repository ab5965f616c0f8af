"""One RL step's update, per kind of algorithm-table entry (`Algorithm.update`), behind one signature:

    update(group: LearnerGroup, batch: StepBatch, timer: Timer) -> StepUpdate

`policy_gradient_update`: the advantages of the step's rows (timed "advantages"), then
algorithm.update_epochs passes of clipped policy-gradient minibatch updates on the learner ranks
(tidal.learner.rl, timed "update"). `expert_iteration_update`: keep each prompt's selected samples
(tidal.learner.expert_iteration) and fine-tune on them (timed "update"). The RL loop builds the
batch, calls its algorithm's entry and logs what comes back; it compares no algorithm names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tidal.common.metrics import Timer
from tidal.common.types import ScoredBatch
from tidal.learner.engine import linear_lr
from tidal.learner.experience import ForwardPass
from tidal.learner.expert_iteration import expert_batch, expert_rows, fill_to_multiple

if TYPE_CHECKING:
    from tidal.learner.group import LearnerGroup
    from tidal.learner.mismatch import Correction
    from tidal.learner.sft import PtxSource


@dataclass(frozen=True)
class StepBatch:
    """What one RL step hands its algorithm's update."""

    step: int  # 0-based RL step
    scored: ScoredBatch  # the whole scored batch, every group (expert iteration selects from it)
    scores: torch.Tensor  # (B',) float scores of fwd's rows: the usable ones (invalid rewards dropped)
    fwd: ForwardPass  # of the usable rows, pi_old as tidal.learner.pi_old decided
    kl_coef: float  # the KL controller's coefficient for this step
    ptx: "PtxSource | None" = None  # PPO-ptx demonstrations (algorithm.ptx_coef > 0)
    correction: "Correction | None" = None  # the engine/trainer mismatch correction (tidal.learner.mismatch)


@dataclass(frozen=True)
class StepUpdate:
    """What a step's update reports."""

    kl_per_seq: float  # pi_old's KL to the reference, nats per sequence: rl/kl and the KL controller's input
    metrics: dict[str, float]  # experience/*, update/*, losses/*, policy/*, ei/*, ...


def policy_gradient_update(group: "LearnerGroup", batch: StepBatch, timer: Timer) -> StepUpdate:
    """Advantages, then algorithm.update_epochs of clipped policy-gradient minibatch updates."""
    with timer("advantages"):
        exp, metrics = group.assemble(batch.fwd, batch.scores, batch.kl_coef, step=batch.step)
    ptx = batch.ptx.for_step(batch.step, len(exp)) if batch.ptx is not None else None
    with timer("update"):
        result = group.update_rl(exp, ptx=ptx, correction=batch.correction)
    metrics.update(result.metrics)
    if result.kl_per_seq is not None:  # pi_old taken in the update: its KL and engine gap come from there
        metrics["experience/kl_per_seq"] = result.kl_per_seq
    if result.logprob_gap is not None:
        metrics["rollout/logprob_gap"] = result.logprob_gap
    return StepUpdate(metrics["experience/kl_per_seq"], metrics)


def expert_iteration_update(group: "LearnerGroup", batch: StepBatch, timer: Timer) -> StepUpdate:
    """Keep the step's selected samples and fine-tune on them: algorithm.update_epochs passes of
    SFT at this step's lr. The forward pass is only for the KL to the reference, logged as for
    the other algorithms."""
    cfg = group.cfg
    a, lc = cfg.algorithm, cfg.learner
    kl = batch.fwd.sequence_kl()  # (B',) k1 sequence KL
    metrics = {"experience/kl_per_seq": kl.mean().item(),
               "experience/response_len": batch.fwd.response_mask.sum(-1).mean().item()}
    with timer("update"):
        rows = expert_rows(batch.scored, cfg.rollout.n_samples, a.ei_top_k, a.ei_threshold,
                           keep_truncated=cfg.reward.missing_eos_penalty is None)
        metrics["ei/kept"] = float(len(rows))
        if len(rows):  # a round where nothing passes the threshold trains on nothing
            metrics["ei/kept_score_mean"] = batch.scored.scores[rows].float().mean().item()
            tok = group.tokenizer
            sft = fill_to_multiple(expert_batch(batch.scored, rows, tok.pad_token_id, tok.eos_token_id),
                                   lc.mini_batch_size)
            lr = linear_lr(lc.lr, batch.step, a.steps, lc.lr_schedule)
            metrics.update(group.update_sft(sft, a.update_epochs, lr))
    return StepUpdate(metrics["experience/kl_per_seq"], metrics)
