"""The RL update on one batch of experience, for every policy-gradient entry of the algorithm
table: PPO (with a critic), PPO-ptx, and the critic-free ones (GRPO, RLOO, REINFORCE, REINFORCE++,
Dr. GRPO, GSPO, CISPO), each with its own per-token loss (`Algorithm.loss`), aggregated as
algorithm.loss_agg says, with the engine/trainer mismatch correction (tidal.learner.mismatch).

K = algorithm.update_epochs passes over the rank's shard in freshly shuffled minibatches; each
minibatch is one optimizer step of the policy (and of the critic for PPO). A shard smaller than
a minibatch (rows dropped for invalid rewards, `reward.on_invalid: drop`) is trained as one
smaller minibatch, split into the same number of micro-batches (zero-weight rows fill them when
there are fewer rows than micro-batches), so every token still weighs the same and DeepSpeed's
gradient-accumulation boundary stays at the end of the minibatch (metrics `update/short_minibatch`,
`update/rows_padding`). Experience without pi_old (tidal.learner.pi_old, source `update`) fits in
one minibatch: its log-probs before the first optimizer step are pi_old, kept for later epochs and
for the batch's KL. After each step the approximate KL(pi_old || pi_theta) is averaged over ranks,
and the update stops early once it exceeds algorithm.early_stop_kl - the same decision on every
rank, so collectives stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from tidal.common.ops import masked_mean
from tidal.common.types import Experience
from tidal.learner.algorithms import algorithm_for, clip_range, loss_aggregation
from tidal.learner.engine import linear_lr
from tidal.learner.experience import engine_gap, kl_per_seq
from tidal.learner.kl import kl_estimate
from tidal.learner.losses import Aggregation, sft_loss, value_loss
from tidal.learner.mismatch import Correction

if TYPE_CHECKING:
    from tidal.learner.sft import SFTBatch
    from tidal.learner.worker import LearnerWorker


@dataclass(frozen=True)
class UpdateResult:
    """What an RL update returns (LearnerWorker.update_rl, LearnerGroup.update_rl)."""

    metrics: dict[str, float]  # losses/*, policy/*, critic/*, update/*, lr: means over minibatches and ranks
    optimizer_steps: int  # minibatches trained, one optimizer step each (the worker's LR-schedule position)
    # pi_old taken inside the update (Experience.old_logprobs None): what it says about the batch
    kl_per_seq: float | None = None  # KL to the reference, nats per sequence (algorithm.kl_estimator)
    logprob_gap: float | None = None  # mean |pi_old - engine| logprob per token; None without engine log-probs


def rl_update(w: "LearnerWorker", exp: Experience, ptx: "SFTBatch | None",
              correction: Correction | None) -> UpdateResult:
    """Train on this rank's shard of `exp`, from the worker's counters (w.rl_steps: the LR
    schedule's position; w.rl_updates: this call's shuffle salt), which the worker then moves."""
    algo, lc = w.cfg.algorithm, w.cfg.learner
    use_critic = _check_inputs(w, exp, ptx)
    n = len(exp)
    mini = min(n, w.mini_per_rank)  # fewer rows than a minibatch: one smaller minibatch
    per_epoch = n // mini  # rows beyond whole minibatches sit out this epoch (reshuffled each epoch)
    # no pi_old: the first minibatch's log-probs before its optimizer step (every row is in it)
    derived: list[torch.Tensor] | None = [] if exp.old_logprobs is None else None
    sums: dict[str, float] = {}
    done, stopped, taken = 0, False, None
    ptx_cursor = [0]
    for epoch in range(algo.update_epochs):
        order = w.epoch_order(n, epoch, salt=1 + w.rl_updates)
        for k in range(per_epoch):
            lr = linear_lr(lc.lr, w.rl_steps + done, w.spec.rl_total_steps, lc.lr_schedule)
            w.set_lr(w.engine, lr)
            if use_critic:
                w.set_lr(w.critic, linear_lr(lc.critic_lr, w.rl_steps + done, w.spec.rl_total_steps, lc.lr_schedule))
            metrics = w.all_reduce_mean(_minibatch_step(w, exp.select(order[k * mini:(k + 1) * mini]), ptx, ptx_cursor,
                                                        correction, use_critic, derived))
            if derived:  # rows in `order` (zero-weight fill rows after them), now pi_old of the whole shard
                old = torch.empty_like(exp.response_mask)
                old[order] = torch.cat(derived)[:n].float().cpu()
                exp, derived = replace(exp, old_logprobs=old * exp.response_mask), None
                taken = _pi_old_facts(w, exp)
            metrics["lr"] = lr
            done += 1
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
            if algo.early_stop_kl is not None and metrics["policy/approx_kl"] > algo.early_stop_kl:
                stopped = True
                break
        if stopped:
            break
    out = {k: v / done for k, v in sums.items()}
    out.update({"update/early_stopped": float(stopped), "update/minibatches": float(done),
                "update/minibatches_planned": float(per_epoch * algo.update_epochs), "update/rows_per_rank": float(n),
                "update/short_minibatch": float(n < w.mini_per_rank),
                "update/rows_padding": float(max(0, _micro_count(w) - n))})
    return UpdateResult(out, done, *(taken or (None, None)))


def _check_inputs(w: "LearnerWorker", exp: Experience, ptx: "SFTBatch | None") -> bool:
    """Whether the update trains a critic, after refusing what it cannot train."""
    algo = w.cfg.algorithm
    use_critic = algorithm_for(w.cfg).uses_critic
    if use_critic and w.critic is None:
        raise RuntimeError(f"algorithm.name={algo.name} needs a critic: build the LearnerGroup with critic_path "
                           "(the reward-model folder, docs/implementation.md#d9, or the policy for a fresh value head)")
    if ptx is not None and algo.ptx_coef <= 0:
        raise ValueError("a PPO-ptx batch was passed but algorithm.ptx_coef is 0; set it > 0 or pass no ptx batch")
    if len(exp) == 0:
        raise ValueError(f"rank {w.rank} got no experience rows; every rank needs at least one")
    if exp.old_logprobs is None and len(exp) > w.mini_per_rank:  # rows past the first minibatch: no pi_old
        raise ValueError(f"rank {w.rank} got {len(exp)} experience rows without pi_old; taking it inside the update "
                         f"needs them in one minibatch (at most {w.mini_per_rank} rows per rank): compute old "
                         "log-probs first")
    return use_critic


def _pi_old_facts(w: "LearnerWorker", exp: Experience) -> tuple[float, float | None]:
    """(KL to the reference, engine gap) of pi_old taken in the update, averaged over ranks (equal
    shards per rank: the mean over ranks is the batch's)."""
    gap = engine_gap(exp)
    facts = {"kl": kl_per_seq(exp, w.cfg.algorithm.kl_estimator)}
    if gap is not None:  # the same on every rank: engine log-probs come with every row or none
        facts["gap"] = gap
    facts = w.all_reduce_mean(facts)
    return facts["kl"], facts.get("gap")


def _micro_count(w: "LearnerWorker") -> int:
    """Micro-batches per minibatch on a rank: DeepSpeed's gradient-accumulation count, which puts
    its optimizer-step boundary after that many micro-batches."""
    return w.mini_per_rank // w.cfg.learner.micro_batch_size


def fill_with_zero_weight(batch, size: int):
    """`batch` (an Experience or SFTBatch) grown to `size` rows by repeating its rows with their
    response mask zeroed: rows that run forward and backward but weigh nothing, since every
    token's weight in a loss comes from the response mask."""
    n = len(batch)
    if n >= size:
        return batch
    filled = batch.select(torch.arange(size) % n)
    mask = filled.response_mask.clone()
    mask[n:] = 0
    return replace(filled, response_mask=mask)


@dataclass(frozen=True)
class _Shared:
    """What the micro-batches of one minibatch share."""

    k: int  # micro-batches per minibatch (DeepSpeed's gradient-accumulation count)
    mass: float  # the minibatch's policy-loss mass on all ranks (tidal.learner.losses.Aggregation)
    tokens: float  # its training tokens on all ranks: the value loss is a token mean
    ptx_tokens: float  # its ptx rows' tokens on all ranks
    agg: str  # the aggregation mode (algorithm.loss_agg resolved)
    correction: Correction | None
    use_critic: bool


def train_mask(x: Experience) -> torch.Tensor:
    """(B, R) the tokens the loss trains on: the response mask, less rows left out (Experience.trains)
    and tokens too stale to train (Experience.token_trains)."""
    mask = x.response_mask if x.trains is None else x.response_mask * x.trains[:, None].to(x.response_mask.dtype)
    return mask if x.token_trains is None else mask * x.token_trains.to(mask.dtype)


def _minibatch_step(w: "LearnerWorker", mb: Experience, ptx: "SFTBatch | None", ptx_cursor: list[int],
                    correction: Correction | None, use_critic: bool,
                    derived: list[torch.Tensor] | None = None) -> dict[str, float]:
    """One optimizer step (policy, and critic for PPO) over the micro-batches of minibatch `mb`.

    The policy loss of the minibatch is its aggregation (algorithm.loss_agg,
    tidal.learner.losses.Aggregation) over all of it, however it is split into micro-batches and
    ranks: a micro-batch's aggregated loss is scaled by its share of the minibatch's mass on all
    ranks (`w.token_scale`), which undoes DeepSpeed's averaging over micro-batches and ranks; the
    value loss likewise by its token share. The logged losses are then the minibatch's.
    A short minibatch is split into the same number of (smaller) micro-batches, filled with
    zero-weight rows where it has fewer rows than micro-batches: DeepSpeed steps the optimizer
    after exactly that many. `derived` (a list): mb has no pi_old; each micro-batch's log-probs,
    taken before this step's optimizer step, stand for it and are appended in order."""
    k, rows = _micro_count(w), len(mb)
    mb = fill_with_zero_weight(mb, k)
    agg, mask = loss_aggregation(w.cfg), train_mask(mb)
    mass = w.global_sum(Aggregation.of(mask, agg, w.cfg.rollout.max_new_tokens).mass)
    tokens = w.global_sum(mask.sum().item()) if use_critic else 0.0
    p_all, ptx_tokens = None, 0.0
    if ptx is not None:  # this minibatch's ptx rows, one per experience row, in order (none for fill rows)
        p_all = fill_with_zero_weight(ptx.select(torch.arange(ptx_cursor[0], ptx_cursor[0] + rows) % len(ptx)), k)
        ptx_cursor[0] += rows
        ptx_tokens = w.global_sum(p_all.response_mask.sum().item())
    shared = _Shared(k, mass, tokens, ptx_tokens, agg, correction, use_critic)
    losses: dict[str, float] = {}
    stats: dict[str, float] = {}
    counted = 0  # micro-batches with real tokens: a fill-only one has no entropy, ratio, ... to average
    for idx in torch.tensor_split(torch.arange(len(mb)), k):  # k micro-batches of <= micro_batch_size rows
        x = mb.select(idx)
        real = x.response_mask.sum().item() > 0  # by the response mask: every rank then logs the same keys
        counted += int(real)
        for key, v in _micro_step(w, x, None if p_all is None else p_all.select(idx), shared, derived).items():
            if key.startswith("losses/"):
                losses[key] = losses.get(key, 0.0) + v
            elif real:
                stats[key] = stats.get(key, 0.0) + v
    # losses are mass-scaled shares: their mean over the k micro-batches is the minibatch's aggregate
    return {**{key: v / k for key, v in losses.items()}, **{key: v / max(counted, 1) for key, v in stats.items()}}


def _policy_terms(w: "LearnerWorker", x: Experience, logprobs: torch.Tensor, entropy: torch.Tensor,
                  old: torch.Tensor, mask: torch.Tensor, agg: Aggregation,
                  correction: Correction | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The micro-batch's policy loss (the entry's loss, entropy bonus, KL loss) over its tokens
    mask (b, R), aggregated by `agg`, unscaled; and its metrics."""
    algo, entry = w.cfg.algorithm, algorithm_for(w.cfg)
    weights, touched = None, {}
    if correction is not None and x.rollout_logprobs is not None:
        weights, touched = correction.weights(old, x.rollout_logprobs.to(w.device), mask)
    pg_loss, pm = entry.loss(logprobs, old, x.advantages.to(w.device), mask, *clip_range(w.cfg),
                             is_weights=weights, agg=agg)
    entropy = torch.where(mask.bool(), entropy, 0.0)
    loss = pg_loss - algo.entropy_coef * agg(entropy)
    metrics = {"losses/policy": pg_loss.item(), "policy/entropy": masked_mean(entropy, mask).item(),  # a token mean
               "policy/approx_kl": pm["approx_kl"].item(), "policy/clipfrac": pm["clipfrac"].item(),
               "policy/ratio_mean": pm["ratio_mean"].item(),
               **{f"mismatch/{key}": v.item() for key, v in touched.items()}}
    if algo.kl_loss > 0:  # k3 KL(pi_theta || pi_ref) as a loss term, with gradient (GRPO paper)
        kl3 = agg(torch.where(mask.bool(), kl_estimate(logprobs, x.ref_logprobs.to(w.device), "k3"), 0.0))
        loss = loss + algo.kl_loss * kl3
        metrics["losses/kl"] = kl3.item()
    return loss, metrics


def _micro_step(w: "LearnerWorker", x: Experience, p: "SFTBatch | None", shared: _Shared,
                derived: list[torch.Tensor] | None) -> dict[str, float]:
    """Forward and backward of one micro-batch `x` (and its ptx rows `p`); DeepSpeed steps the
    optimizer after the minibatch's k-th. Returns the micro-batch's metrics (losses scaled)."""
    algo, R = w.cfg.algorithm, x.response_mask.shape[1]
    mask = train_mask(x).to(w.device)  # (b, R)
    agg = Aggregation.of(mask, shared.agg, w.cfg.rollout.max_new_tokens)
    scale = w.token_scale(agg.mass, shared.mass, shared.k)
    logprobs, entropy = w.policy_logprobs(x.input_ids, x.attention_mask, R, w.cfg.rollout.temperature,
                                          entropy="loss" if algo.entropy_coef > 0 else "metric")  # (b, R) each
    if derived is not None:
        derived.append(logprobs.detach())
    old = logprobs.detach() if derived is not None else x.old_logprobs.to(w.device)
    loss, metrics = _policy_terms(w, x, logprobs, entropy, old, mask, agg, shared.correction)
    loss = loss * scale
    for key in ("losses/policy", "losses/kl"):
        if key in metrics:
            metrics[key] *= scale
    if p is not None:
        p_mask = p.response_mask.to(w.device)
        ptx_lp, _ = w.policy_logprobs(p.input_ids, p.attention_mask, p.response_len, 1.0)
        ptx_l = sft_loss(ptx_lp, p_mask) * w.token_scale(p_mask.sum().item(), shared.ptx_tokens, shared.k)
        loss = loss + algo.ptx_coef * ptx_l  # PPO-ptx: + gamma * pretraining log-likelihood
        metrics["losses/ptx"] = ptx_l.item()
    w.engine.backward(loss)
    w.engine.step()
    if shared.use_critic:
        values = w.critic_values(x.input_ids, x.attention_mask, R)  # (b, R)
        v_scale = w.token_scale(mask.sum().item(), shared.tokens, shared.k)
        v_loss = value_loss(values, x.values.to(w.device), x.returns.to(w.device), mask, algo.value_clip_eps) * v_scale
        w.critic.backward(algo.value_coef * v_loss)
        w.critic.step()
        metrics["losses/value"] = v_loss.item()
        metrics["critic/value_mean"] = masked_mean(values.detach(), mask).item()
    return metrics
