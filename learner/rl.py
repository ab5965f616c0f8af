"""The RL update on one batch of experience: PPO (with a critic), PPO-ptx, and the critic-free
GRPO / RLOO / REINFORCE-with-baseline (same clipped policy loss, advantages given).

K = algorithm.ppo_epochs passes over the rank's shard in freshly shuffled minibatches; each
minibatch is one optimizer step of the policy (and of the critic for PPO). Experience without
pi_old (tidal.learner.experience.old_in_update) is one minibatch per epoch: its log-probs before
the first optimizer step are pi_old, kept for later epochs and for the batch's KL metric. After each step the
approximate KL(pi_old || pi_theta) is averaged over ranks, and the update stops early once it
exceeds algorithm.early_stop_kl - the same decision on every rank, so collectives stay in step.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from tidal.common.ops import masked_mean
from tidal.common.types import Experience
from tidal.learner.algorithms import algorithm_for
from tidal.learner.kl import kl_estimate
from tidal.learner.losses import policy_loss, sft_loss, truncated_is_weights, value_loss
from tidal.learner.engine import linear_lr
from tidal.learner.experience import old_logprob_metrics

if TYPE_CHECKING:
    from tidal.learner.sft import SFTBatch
    from tidal.learner.worker import LearnerWorker


def rl_update(w: "LearnerWorker", exp: Experience, ptx: "SFTBatch | None",
              is_weight_cap: float | None) -> dict[str, float]:
    """Train on this rank's shard of `exp`; returns metrics averaged over minibatches and ranks."""
    algo, lc = w.cfg.algorithm, w.cfg.learner
    use_critic = algorithm_for(w.cfg).uses_critic
    if use_critic and w.critic is None:
        raise RuntimeError(f"algorithm.name={algo.name} needs a critic: build the LearnerGroup with critic_path "
                           "(the reward-model folder, docs/implementation.md#d9, or the policy for a fresh value head)")
    if ptx is not None and algo.ptx_coef <= 0:
        raise ValueError("a PPO-ptx batch was passed but algorithm.ptx_coef is 0; set it > 0 or pass no ptx batch")
    mini = w.mini_per_rank
    n = len(exp)
    if n < mini:
        raise ValueError(f"rank {w.rank} got {n} experience rows but a minibatch needs {mini} per rank "
                         f"(learner.mini_batch_size={lc.mini_batch_size} over {w.world_size} ranks); "
                         "collect more samples per step or lower learner.mini_batch_size")
    per_epoch = n // mini  # rows beyond whole minibatches sit out this epoch (reshuffled each epoch)
    derived: list[torch.Tensor] | None = None
    if exp.old_logprobs is None:  # pi_old from the first minibatch, before its optimizer step
        if n != mini:
            raise ValueError(f"rank {w.rank} got {n} experience rows without pi_old; taking it inside the update "
                             f"needs exactly one minibatch ({mini} rows per rank): compute old log-probs first")
        derived = []
    sums: dict[str, float] = {}
    done, stopped, first = 0, False, None
    ptx_cursor = [0]
    for epoch in range(algo.ppo_epochs):
        order = w.epoch_order(n, epoch, salt=1 + w.rl_updates)
        for k in range(per_epoch):
            lr = linear_lr(lc.lr, w.rl_steps, w.spec.rl_total_steps, lc.lr_schedule)
            w.set_lr(w.engine, lr)
            if use_critic:
                w.set_lr(w.critic, linear_lr(lc.critic_lr, w.rl_steps, w.spec.rl_total_steps, lc.lr_schedule))
            metrics = w.all_reduce_mean(_minibatch_step(w, exp.select(order[k * mini:(k + 1) * mini]), ptx, ptx_cursor,
                                                        is_weight_cap, use_critic, derived))
            if derived:  # rows in `order`, now pi_old of the whole shard
                old = torch.empty_like(exp.response_mask)
                old[order] = torch.cat(derived).float().cpu()
                exp, derived = replace(exp, old_logprobs=old * exp.response_mask), None
                first = w.all_reduce_mean(old_logprob_metrics(exp, algo.kl_estimator))
            metrics["lr"] = lr
            w.rl_steps += 1
            done += 1
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
            if algo.early_stop_kl is not None and metrics["policy/approx_kl"] > algo.early_stop_kl:
                stopped = True
                break
        if stopped:
            break
    w.rl_updates += 1
    out = {k: v / done for k, v in sums.items()}
    if first is not None:  # equal shards per rank: the mean over ranks is the batch's
        out.update(first)
    out.update({"ppo/early_stopped": float(stopped), "ppo/minibatches": float(done),
                "ppo/minibatches_planned": float(per_epoch * algo.ppo_epochs), "ppo/rows_per_rank": float(n)})
    return out


def _minibatch_step(w: "LearnerWorker", mb: Experience, ptx: "SFTBatch | None", ptx_cursor: list[int],
                    is_weight_cap: float | None, use_critic: bool,
                    derived: list[torch.Tensor] | None = None) -> dict[str, float]:
    """One optimizer step (policy, and critic for PPO) over the micro-batches of minibatch `mb`.

    Every token of the minibatch weighs the same, however the minibatch is split into
    micro-batches and ranks: a micro-batch's token-mean loss is scaled by its share of the
    minibatch's tokens on all ranks (`w.token_scale`), which undoes DeepSpeed's averaging over
    micro-batches and ranks. The logged losses are then the exact token means of the minibatch.
    `derived` (a list): mb has no pi_old; each micro-batch's log-probs, taken before this step's
    optimizer step, stand for it and are appended in order."""
    algo, m = w.cfg.algorithm, w.cfg.learner.micro_batch_size
    R = mb.response_mask.shape[1]
    sums: dict[str, float] = {}
    micro = [torch.arange(i, min(i + m, len(mb))) for i in range(0, len(mb), m)]
    total_tokens = w.global_sum(mb.response_mask.sum().item())
    if ptx is not None:  # this minibatch's ptx rows, one per experience row, in order
        p_all = ptx.select(torch.arange(ptx_cursor[0], ptx_cursor[0] + len(mb)) % len(ptx))
        ptx_cursor[0] += len(mb)
        ptx_tokens = w.global_sum(p_all.response_mask.sum().item())
    for idx in micro:
        x = mb.select(idx)
        mask = x.response_mask.to(w.device)  # (b, R)
        scale = w.token_scale(mask.sum().item(), total_tokens, len(micro))
        logprobs, entropy = w.policy_logprobs(x.input_ids, x.attention_mask, R, w.cfg.rollout.temperature,
                                              entropy="loss" if algo.entropy_coef > 0 else "metric")  # (b, R) each
        if derived is not None:
            derived.append(logprobs.detach())
        old = logprobs.detach() if derived is not None else x.old_logprobs.to(w.device)
        is_weights = None
        if is_weight_cap is not None and x.rollout_logprobs is not None:
            is_weights = truncated_is_weights(old, x.rollout_logprobs.to(w.device), mask, is_weight_cap)
        pg_loss, pm = policy_loss(logprobs, old, x.advantages.to(w.device), mask, algo.clip_eps, is_weights=is_weights)
        ent = masked_mean(torch.where(mask.bool(), entropy, 0.0), mask)
        loss = pg_loss - algo.entropy_coef * ent
        if algo.kl_loss > 0:  # k3 KL(pi_theta || pi_ref) as a loss term, with gradient (GRPO paper)
            kl3 = masked_mean(torch.where(mask.bool(), kl_estimate(logprobs, x.ref_logprobs.to(w.device), "k3"), 0.0), mask)
            loss = loss + algo.kl_loss * kl3
        loss = loss * scale
        metrics = {"losses/policy": pg_loss.item() * scale, "policy/entropy": ent.item(),
                   "policy/approx_kl": pm["approx_kl"].item(), "policy/clipfrac": pm["clipfrac"].item(),
                   "policy/ratio_mean": pm["ratio_mean"].item()}
        if algo.kl_loss > 0:
            metrics["losses/kl"] = kl3.item() * scale
        if ptx is not None:
            p = p_all.select(idx)
            p_mask = p.response_mask.to(w.device)
            ptx_lp, _ = w.policy_logprobs(p.input_ids, p.attention_mask, p.response_len, 1.0)
            ptx_l = sft_loss(ptx_lp, p_mask) * w.token_scale(p_mask.sum().item(), ptx_tokens, len(micro))
            loss = loss + algo.ptx_coef * ptx_l  # PPO-ptx: + gamma * pretraining log-likelihood
            metrics["losses/ptx"] = ptx_l.item()
        w.engine.backward(loss)
        w.engine.step()
        if use_critic:
            values = w.critic_values(x.input_ids, x.attention_mask, R)  # (b, R)
            v_loss = value_loss(values, x.values.to(w.device), x.returns.to(w.device), mask, algo.value_clip_eps) * scale
            w.critic.backward(algo.value_coef * v_loss)
            w.critic.step()
            metrics["losses/value"] = v_loss.item()
            metrics["critic/value_mean"] = masked_mean(values.detach(), mask).item()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(micro) for k, v in sums.items()}
