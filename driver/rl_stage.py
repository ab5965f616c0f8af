"""The RL stage end to end: place the roles, start them, evaluate before, train, evaluate
after, save the final policy.

Roles: the learner group (policy + critic ranks and the frozen reference) and the rollout pool
are placed by `tidal.actors.placement` (colocated or disaggregated); the reward runs in the
driver (rules) and on reward-model workers (RewardPool). The critic starts from the reward
model when there is one (docs/implementation.md#d9), else from the policy with a fresh value head.

Held-out evaluation (tidal.driver.heldout): the reporting prompts (the first
logging.eval_samples held-out prompts), one sample each with a fixed seed, written to
samples_before.jsonl (initial policy) and samples_after.jsonl (final policy) with the raw
reward, the reward-model score (when a model term exists), the VADER sentiment of the completion
and the sequence KL to the reference (sum over tokens of log pi - log pi_ref). The monitor
(logging.gold_every) scores the disjoint selection prompts instead; with
algorithm.early_stop=gold_drop the final policy is the best-gold one it saw.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from tidal.driver.checkpoint import atomic_write_text
from tidal.driver.heldout import Seeds, eval_sampling
from tidal.driver.interrupt import NO_STOPS, StopRequests
from tidal.driver.rl_loop import RLLoop, RLParts
from tidal.common.config import TidalConfig
from tidal.common.metrics import MetricsLogger

PLACEMENT_FILE = "placement.json"  # node ids of each role's actors, written when the roles are up


def _critic_path(cfg: TidalConfig, policy: str, reward_model: str | None) -> str | None:
    from tidal.learner.algorithms import algorithm_for

    if not algorithm_for(cfg).uses_critic:
        return None
    if cfg.model.critic is not None:
        from tidal.common.models import resolve_model

        return str(resolve_model(cfg.model.critic))  # a registry name or a folder
    return reward_model or policy


def start_parts(cfg: TidalConfig, policy: str, reward_model: str | None, data, calibrate: bool = True,
                reference: str | None = None):
    """Placement, rollout pool, reward, learners (+reference) and prompt dataset. With
    `calibrate` and reference reward normalisation, the reward is calibrated on samples of the
    initial policy first, so the critic can start on the normalised reward's scale. Online
    feedback keeps those samples (RLParts.calibration, also on a resume) to re-measure the
    normalisation for each new reward-model version."""
    from tidal.actors.placement import Placement, plan_placement, role_counts
    from tidal.actors.threads import run_threads
    from tidal.common.prompts import PromptDataset
    from tidal.learner.group import LearnerGroup
    from tidal.reward_service.combine import build_reward
    from tidal.rollout.pool import RolloutPool

    from tidal.learner.lora import uses_own_base

    own_base = uses_own_base(cfg.learner.lora_rank, policy, reference or policy)  # no reference worker then
    placement = Placement(plan_placement(cfg, role_counts(cfg, reference=not own_base)),
                          cfg.cluster.sync_timeout_s)
    learners = pool = reward = calibration_rollout = None
    calibration: dict[str, float] = {}
    try:
        # the engines start before the learners, not beside them: on a colocated GPU vLLM sizes its KV
        # cache from the device's free memory while it profiles, which DeepSpeed allocating at the same
        # time would change (measured on CPU, starting both at once saved ~2 s of 22 on 2 cores)
        pool = RolloutPool(cfg, policy, actor_options=placement.actor_options("rollout"))
        reward = build_reward(cfg.reward, reward_model=reward_model, policy_tokenizer=policy, placement=placement,
                              dtype=cfg.model.dtype, worker_timeout_s=cfg.cluster.sync_timeout_s,
                              num_threads=run_threads(cfg).reward)
        if reward.normalize == "reference" and (calibrate or cfg.feedback.mode == "online"):
            calibration_rollout = _calibration_rollout(cfg, pool, data.prompts, policy)
        if calibrate and calibration_rollout is not None:
            calibration = reward.calibrate(reward.score(calibration_rollout, raw=True))
        critic = _critic_path(cfg, policy, reward_model)
        learners = LearnerGroup(cfg, policy, role="policy", critic_path=critic, reference_path=reference or policy,
                                placement=placement, critic_affine=critic_affine(reward, critic))
        if cfg.rollout.weight_transport == "collective":  # learner rank 0 -> every rollout worker
            from tidal.actors.collective import CollectiveWeights, collective_backend

            weights = CollectiveWeights(learners.ranks, collective_backend(cfg.learner.gpus_per_worker > 0),
                                        cfg.cluster.sync_timeout_s)
            weights.connect(pool.group, pool.worker_ids())
            pool.set_transport(weights)
        elif cfg.rollout.weight_transport == "ipc":  # learner rank k -> the rollout worker on its GPU
            from tidal.actors.ipc import IpcWeights

            pool.set_transport(IpcWeights(learners.ranks, cfg.cluster.sync_timeout_s))
    except BaseException:
        stop_parts(placement, learners, pool, reward)
        raise
    dataset = PromptDataset.from_config(data.prompts, learners.tokenizer, cfg.data, seed=cfg.seed)
    return placement, RLParts(learners, pool, reward, dataset, _ptx_source(cfg, data, learners.tokenizer),
                              calibration_rollout), calibration


def critic_affine(reward, critic_path: str | None) -> tuple[float, float] | None:
    """(shift, scale) that puts a critic initialised from a reward-model folder on the scale of
    the rewards it must predict: the folder's own normalisation, the model term's weight and,
    with reference normalisation, the calibration (docs/implementation.md#d6, #d9). None when the
    critic does not start from the reward model of a `model` term."""
    from tidal.common.models import read_value_model_meta, reward_head_affine
    from tidal.reward_service.combine import ModelReward

    if critic_path is None:
        return None
    terms = [t for t in reward.terms if isinstance(t.fn, ModelReward)
             and Path(t.fn.pool.model_path).resolve() == Path(critic_path).resolve()]
    if len(terms) != 1:
        return None
    reference = reward.reference if reward.normalize == "reference" else None
    return reward_head_affine(read_value_model_meta(critic_path), reference=reference, weight=terms[0].weight)


def _ptx_source(cfg: TidalConfig, data, tokenizer):
    """PPO-ptx rows (tokenized like the SFT stage's), or None when algorithm.ptx_coef is 0."""
    if cfg.algorithm.ptx_coef <= 0:
        return None
    from tidal.common.data import read_records
    from tidal.learner.sft import PtxSource, build_sft_batch

    d = cfg.data
    records = read_records(data.ptx, "demonstrations")
    return PtxSource(build_sft_batch(tokenizer, records, d.max_prompt_tokens, d.max_response_tokens, d.chat_template),
                     cfg.seed)


def stop_parts(placement, learners, pool, reward) -> None:
    for part in (reward, pool, learners):
        if part is not None:
            try:
                part.close() if hasattr(part, "close") else part.shutdown()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                print(f"tidal: while stopping {type(part).__name__}: {e}", flush=True)
    if placement is not None:
        placement.shutdown()


def evaluate(cfg: TidalConfig, parts: RLParts, prompts, out_file: Path) -> dict[str, float]:
    """The pool's current policy on the reporting prompts (a PromptBatch, None: no evaluation),
    scored; one row per completion written to `out_file`."""
    from tidal.common.sentiment import vader_score
    from tidal.driver.heldout import evaluate_pool
    from tidal.reward_service.combine import ModelReward

    if prompts is None:
        return {}
    ev = evaluate_pool(parts.pool, parts.learners, prompts, eval_sampling(cfg, Seeds.REPORTING), parts.reward)
    rollout = ev.rollout
    rm = next((ev.scored.terms[t.name] for t in parts.reward.terms if isinstance(t.fn, ModelReward)), None)
    vader = vader_score(list(rollout.response_text))
    atomic_write_text(out_file, "".join(json.dumps({
        "prompt_index": rollout.prompt_index[i], "prompt": rollout.prompt_text[i],
        "completion": rollout.response_text[i], "reward": ev.proxy[i],
        "rm_score": None if rm is None else float(rm[i]), "vader": vader[i], "kl": ev.kl[i],
        "weight_version": rollout.weight_version[i]}) + "\n" for i in range(len(rollout))))
    out = {"reward": float(torch.tensor(ev.proxy).mean()), "vader": float(torch.tensor(vader).mean()),
           "kl": float(torch.tensor(ev.kl).mean()), "response_len": float(torch.tensor(ev.response_len).mean()),
           "weight_version": float(rollout.weight_version[0])}
    if rm is not None:
        out["rm_score"] = float(rm.mean())
    return out


def _calibration_rollout(cfg: TidalConfig, pool, prompts_path: Path, policy: str):
    """reward.normalize=reference scales so the initial (reference) policy's samples score ~N(0, 1)
    (docs/implementation.md#d6): these samples, one step's worth of training prompts in a
    separate order, drawn while the pool holds the initial policy."""
    from tidal.common.prompts import PromptDataset
    from tidal.driver.heldout import sample

    ds = PromptDataset.from_config(prompts_path, policy, cfg.data, seed=Seeds(cfg.seed).calibration_order)
    return sample(pool, ds.next_batch(max(cfg.algorithm.prompts_per_step, 8)),
                  eval_sampling(cfg, Seeds.CALIBRATION, n=cfg.rollout.n_samples))


def run_rl(cfg: TidalConfig, run_dir: Path, logger: MetricsLogger, data, policy: str,
           reward_model: str | None, stops: StopRequests = NO_STOPS, reference: str | None = None,
           stage: str = "rl", resume: bool = False) -> dict:
    """The whole RL stage; returns the summary (before/after evaluation, last KL, the monitor's verdicts).
    resume: continue from the newest checkpoint in `run_dir` (a new run never loads one)."""
    from tidal.driver.checkpoint import resume_checkpoint
    from tidal.driver.heldout import heldout_prompts

    if data.prompts is None:
        raise ValueError("the rl stage needs prompts: set data.prompts or data.task")
    _warn_kl_estimator(cfg)
    t0 = time.perf_counter()
    heldout = heldout_prompts(cfg, data.eval_prompts, policy, selection=cfg.logging.gold_every > 0)  # before Ray
    resuming = resume and resume_checkpoint(run_dir) is not None  # the checkpoint RLLoop.restore loads holds the calibration
    run_dir.mkdir(parents=True, exist_ok=True)
    online = _online(cfg, run_dir, stage, reward_model, data)
    placement, parts, calibration = start_parts(cfg, policy, online.path if online else reward_model, data,
                                                calibrate=not resuming, reference=reference)
    ref = "the base with adapters off" if parts.learners.reference_in_policy else "reference"
    print(f"tidal: rl roles up in {time.perf_counter() - t0:.1f} s ({cfg.cluster.placement}: "
          f"{cfg.learner.num_workers} learner(s) + {ref}, {cfg.rollout.num_workers} rollout worker(s))", flush=True)
    summary: dict = {}
    judge = None
    try:
        (run_dir / PLACEMENT_FILE).write_text(json.dumps(placement.where(), indent=2))  # the nodes of each role
        if heldout.selection is not None:
            from tidal.driver.heldout import build_gold, gold_term
            from tidal.driver.monitor import HeldOutJudge

            judge = HeldOutJudge(cfg, heldout.selection, build_gold(cfg, gold_term(cfg.logging.gold_term), policy))
        loop = RLLoop(cfg, run_dir, parts, logger, stops, judge=judge, stage=stage, online=online)
        if not (resuming and loop.restore()) and calibration:
            logger.log(0, calibration, stage=stage)
        if online is not None:  # labeling and the reward learner run beside the loop from here
            online.start(parts, lambda: loop.step)
        summary["before"] = evaluate_before(cfg, parts, heldout.reporting, run_dir)
        t1 = time.perf_counter()
        last = loop.run()
        print(f"tidal: {loop.step - loop.start_step} rl steps in {time.perf_counter() - t1:.1f} s", flush=True)
        if online is not None:  # stopped before the evaluation, which the newest version scores
            summary["online"] = online.close(take_newest=True)
        summary["after"] = evaluate(cfg, parts, heldout.reporting, run_dir / "samples_after.jsonl")
        logger.log(cfg.algorithm.steps, {f"eval/{k}_{when}": v for when in ("before", "after")
                                         for k, v in summary[when].items()}, stage="eval" if stage == "rl" else f"eval-{stage}")
        summary["train_kl_last"] = round(last.get("rl/kl", float("nan")), 4)
        summary["kl_coef_last"] = round(loop.kl_ctl.value, 4)
        if judge is not None:
            summary.update(monitor_summary(loop, run_dir))
        if loop.stopped_early:
            summary["early_stop"] = {"reason": loop.stopped_early, "step": loop.step}
        parts.learners.save_pretrained(run_dir / "policy")
    finally:
        if judge is not None:
            judge.close()
        if online is not None:
            online.close()
        stop_parts(placement, parts.learners, parts.pool, parts.reward)
    return summary


def _warn_kl_estimator(cfg: TidalConfig) -> None:
    a = cfg.algorithm
    if a.kl_estimator != "k1" and a.kl_coef > 0:
        print(f"tidal: warning: algorithm.kl_estimator={a.kl_estimator} in the per-token reward penalty is a biased "
              "estimate of the sequence KL (only k1 is unbiased there); use algorithm.kl_loss for a k3 KL loss term.",
              file=sys.stderr, flush=True)


def evaluate_before(cfg: TidalConfig, parts: RLParts, prompts, run_dir: Path) -> dict[str, float]:
    """The initial policy's evaluation: eval_before.json when a run (being resumed) has it, else
    evaluated now. eval_before.json is written atomically and last, after samples_before.jsonl,
    so a crash between the two only makes the resume evaluate again."""
    done = run_dir / "eval_before.json"
    if done.is_file():
        return json.loads(done.read_text())
    before = evaluate(cfg, parts, prompts, run_dir / "samples_before.jsonl")
    atomic_write_text(done, json.dumps(before))
    return before


def _online(cfg: TidalConfig, run_dir: Path, stage: str, reward_model: str | None, data):
    """feedback.mode=online: the stage's OnlineFeedback (its store and versions in run_dir), else None."""
    if cfg.feedback.mode != "online":
        return None
    from tidal.common.data import read_records
    from tidal.driver.online import OnlineFeedback

    if reward_model is None:
        raise ValueError("feedback.mode=online refits a reward model: run the rm stage first or set model.reward")
    offline = read_records(data.comparisons, "comparisons") if data.comparisons is not None else []
    return OnlineFeedback(cfg, run_dir, stage, reward_model, offline)


def monitor_summary(loop: RLLoop, run_dir: Path) -> dict:
    """The monitor's part of the summary: the warning, the plot, and which policy RUN/policy is
    (the best-gold one after a gold_drop stop; the final one otherwise, with a note when the
    final policy's gold is below the best)."""
    m = loop.monitor
    m.plot(run_dir / "plots" / "overoptimisation.png")
    out: dict = {"overoptimisation_warned": m.warned}
    if m.best_step is None:
        return out
    out["best_gold"] = {"step": m.best_step, "gold": round(m.best_gold, 6), "last_step": int(m.steps[-1]),
                        "last_gold": round(m.gold[-1], 6), "policy": "last"}  # which of the two RUN/policy is
    if loop.restored_best is not None:
        out["best_gold"].update(policy="best", step=loop.restored_best)
    elif (note := m.past_best()) is not None:
        print(f"tidal: note: {note}; {run_dir / 'policy'} is the final policy (algorithm.early_stop=gold_drop "
              f"ends a run on its best-gold policy).", flush=True)
    return out
