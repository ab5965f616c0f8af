"""The RL stage: generate -> score -> reference/critic forward -> advantages -> update -> sync.

One step reads as timed blocks (metrics `time/<block>_s`):
    generate  the rollout pool samples rollout.n_samples completions per prompt
    score     the configured reward (rules, reward-model workers, HTTP) scores them
    forward   policy (old logprobs), frozen reference and critic forward passes
    advantages KL-penalised per-token rewards, GAE or group baselines, whitening
    update    the algorithm table's update: algorithm.update_epochs of minibatch updates on the
              DeepSpeed learners (or expert iteration's select + SFT; tidal.learner.updates)
    sync      export the new weights (bucketed through the object store) to the pool
Each role's idle fraction over the step (`idle/rollout`, `idle/learner`, `idle/reward`) is
1 - busy / step wall time. Rows with an invalid reward (reward.on_invalid: drop) are left out of
the step (`update/rows_dropped`; whole groups for group baselines); the update trains on the rest.

Sync and async modes (algorithm.mode) share this code; `tidal.driver.pipeline` schedules the
rollout side. In async mode step t+1 is generated while step t trains, so a sample trained at
step s may come from weight version s - k, k <= algorithm.max_staleness (metric
`rl/staleness_max`). Its PPO ratio is taken against pi_old, the policy at training time (the
trainer recomputes old logprobs), and each token's loss is weighted by
algorithm.mismatch_correction (tidal.learner.mismatch; `auto`: the truncated importance weight
min(pi_old / pi_rollout, algorithm.mismatch_threshold), pi_rollout being the engine's logprob of
the sampled token): the correction for sampling from an older (or numerically different) policy.
`auto` skips it in sync mode with unfiltered sampling (the engine and the trainer hold the same
version); any correction can be chosen in either mode. With algorithm.dynamic_sampling the
rollout side samples more prompts until the step holds prompts_per_step informative groups
(tidal.driver.dynamic_sampling; metrics `sampling/*`); with rollout.partial a step takes the first
groups to finish, generated in slices, the rest go on across the weight push (tidal.driver.partial). Where pi_old
comes from each step - the learners' forward, the engine's own log-probs, or the update's first
minibatch - is tidal.learner.pi_old's decision (algorithm.old_logprobs; metrics
`rl/old_logprobs_engine`, `rl/old_logprobs_in_update`, `rollout/logprob_gap`).

Determinism: generation is seeded per step and round (`step_sampling`) and per prompt (the pool derives
each prompt's seed from the step seed and the prompt index), learners reseed their shuffles
from their step counters, and the prompt order is a function of (seed, epoch); with a
checkpoint holding learner/optimizer state, KL controller, reward normalizer, data position,
RNG states and any generated-but-untrained steps, a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tidal.driver.checkpoint import DriverState, resume_checkpoint, write_checkpoint
from tidal.driver.dynamic_sampling import Round, fill_step, shape_overlong
from tidal.driver.interrupt import NO_STOPS, Interrupted, StopRequests
from tidal.driver.partial import PartialRollouts, token_metrics
from tidal.driver.pipeline import Produced, RolloutPipeline, load_or_restart
from tidal.common.config import TidalConfig
from tidal.common.metrics import METRICS_FILE, MetricsLogger, Timer
from tidal.common.scoreboard import degenerate_share
from tidal.driver.preflight import check_algorithm
from tidal.driver.run_folder import config_record
from tidal.learner.experience import max_token_lag, usable_rows
from tidal.learner.kl import AdaptiveKLController, FixedKLController
from tidal.learner.mismatch import correction_for
from tidal.learner.pi_old import PiOld, PiOldStep
from tidal.learner.updates import StepBatch, StepUpdate
from tidal.rollout.sampling import Sampling

if TYPE_CHECKING:
    from tidal.common.prompts import PromptDataset
    from tidal.common.types import RolloutBatch
    from tidal.learner.group import LearnerGroup
    from tidal.learner.sft import PtxSource
    from tidal.reward_service.combine import CombinedReward
    from tidal.rollout.pool import RolloutPool

ROLLOUTS_FILE = "rollouts.jsonl"  # per step: prompt indices, weight versions, scores


def step_sampling(cfg: TidalConfig, step: int, round_: int = 0) -> Sampling:
    """Sampling of RL step `step` (and of its extra dynamic-sampling round `round_`): the pool
    seeds each prompt from this seed and its index."""
    return Sampling.from_config(cfg.rollout, seed=(cfg.seed * 1_000_003 + step * 7_919 + 1 + round_ * 104_729)
                                & 0x7FFFFFFF)


def make_kl_controller(cfg: TidalConfig):
    a = cfg.algorithm
    if a.adaptive_kl:
        return AdaptiveKLController(a.kl_coef, a.kl_target, a.kl_horizon)
    return FixedKLController(a.kl_coef)


@dataclass
class RLParts:
    """The live pieces the RL loop drives (built by the driver)."""

    learners: "LearnerGroup"  # policy (+ critic) ranks and the frozen reference
    pool: "RolloutPool"
    reward: "CombinedReward"
    dataset: "PromptDataset"  # the RL prompts
    ptx: "PtxSource | None" = None  # PPO-ptx demonstrations (algorithm.ptx_coef > 0)
    calibration: "RolloutBatch | None" = None  # the initial policy's samples reference normalisation is measured on


class RLLoop:
    """Runs RL steps [start, algorithm.steps) with checkpoints; see the module docstring."""

    def __init__(self, cfg: TidalConfig, run_dir: Path, parts: RLParts, logger: MetricsLogger,
                 stops: StopRequests = NO_STOPS, judge=None, stage: str = "rl", online=None):
        """`judge`: a tidal.driver.monitor.HeldOutJudge for the over-optimisation monitor
        (logging.gold_every > 0), or None. `online`: feedback.mode=online's
        tidal.driver.online.OnlineFeedback, whose hot swaps and queries run on the rollout thread."""
        from tidal.driver.monitor import CollapseWatch, GoldMonitor

        self.cfg, self.run_dir, self.parts, self.logger, self.stops = cfg, Path(run_dir), parts, logger, stops
        self.stage = stage  # the records' stage field: 'rl', or 'rl2' for a second round
        self.judge, self.online = judge, online
        self.monitor = GoldMonitor.from_config(cfg)
        self.collapse = CollapseWatch.from_config(cfg)
        # early_stop=gold_drop ends on the best-gold policy: each new best is a checkpoint kept aside
        self.keep_best = judge is not None and cfg.algorithm.early_stop == "gold_drop"
        self.stopped_early: str | None = None
        self.restored_best: int | None = None  # the best-gold step the final policy was restored to
        self._checkpointed = -1  # the step of the newest checkpoint this loop wrote
        self.kl_ctl = make_kl_controller(cfg)
        self.async_mode = cfg.algorithm.mode == "async"
        self.max_staleness = cfg.algorithm.max_staleness if self.async_mode else 0
        # Off-policy samples (async), and samples of a truncated distribution (top-k / top-p:
        # the engine's logprobs are those of the filtered distribution, the trainer's are the
        # full softmax), get algorithm.mismatch_correction's weights (auto: truncated importance sampling).
        filtered = Sampling.from_config(cfg.rollout).filtered
        self.correction = correction_for(cfg, off_policy=self.async_mode or filtered)
        check_algorithm(cfg)  # what preflight refuses, for a loop built without it
        self.pi_old = PiOld(cfg)  # where each step's pi_old comes from
        self.step = self.start_step = 0
        self.pipeline: RolloutPipeline | None = None
        self._preloaded: list[Produced] = []
        self._load_times: list[float] = []  # seconds of each weight load into the pool
        self._sync_failed = 0  # rollout workers that failed a weight load (restarted with it) so far
        # rollout.partial: the groups in flight between steps (tidal.driver.partial)
        self.partial = None if cfg.rollout.partial == "off" else PartialRollouts(cfg, parts.dataset, parts.pool)

    # ------------------------------------------------------------------ resume

    def restore(self) -> bool:
        """Load the newest readable checkpoint of the run, if any; a newer unreadable one is skipped
        with a warning naming its file (tidal.driver.checkpoint.resume_checkpoint). Returns
        whether one was loaded."""
        ckpt = resume_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        state = DriverState.load(ckpt)
        self.parts.learners.load_checkpoint(ckpt / "learner")
        self.kl_ctl.load_state_dict(state.kl_controller)
        self.parts.reward.load_state_dict(state.reward_state)
        from tidal.common.prompts import DataState

        self.parts.dataset.state = DataState(**state.data_state)
        if "pi_old" in state.extra:
            self.pi_old.load_state_dict(state.extra["pi_old"])
        self.step = state.step
        if "monitor" in state.extra:  # the window and the best go on where the checkpoint left them
            from tidal.driver.best_checkpoint import usable_best

            self.monitor.load_state_dict(state.extra["monitor"])
            if self.keep_best and self.monitor.best_step is not None and not usable_best(self.run_dir,
                                                                                         self.monitor.best_step):
                self.monitor.forget_best()
        pending = ckpt / "pending.pt"
        self._preloaded = torch.load(pending, weights_only=False) if pending.is_file() else []
        if self.partial is not None and (ckpt / "partial.pt").is_file():
            self.partial.load_state_dict(torch.load(ckpt / "partial.pt", weights_only=False))
        if self.step > 0:  # the pool starts from the initial policy: give it the checkpoint's
            handle = self.parts.learners.export_weights(self.step)
            self.parts.pool.load_weights(handle)
        return True

    # ------------------------------------------------------------------ the loop

    def _produce(self, step: int) -> Produced:
        """Rollout side of one step (runs on the pipeline's thread): prompts, generate, score, in
        as many rounds as dynamic sampling takes (tidal.driver.dynamic_sampling)."""
        timer, a = Timer(), self.cfg.algorithm
        if self.online is not None:  # a new reward-model version swaps in between two steps: one scores a step
            with timer("score"):
                self.online.swap()
        scored, metrics = fill_step(lambda n, r: self._sample(step, n, r, timer), a.prompts_per_step,
                                    self.cfg.rollout.n_samples, a.dynamic_sampling, a.dynamic_sampling_max_rounds)
        if self.online is not None:
            with timer("queries"):  # this step's labeling tasks, from samples of the step's weights
                metrics.update(self.online.queries(step, *self._first_round))
        return Produced(step, scored, list(scored.rollout.weight_version), dict(timer.totals), metrics)

    def _sample(self, step: int, prompts: int, round_: int, timer: Timer) -> Round:
        """One sampling round: the next `prompts` prompts, generated and scored (with the soft
        overlong punishment, algorithm.overlong_buffer)."""
        a = self.cfg.algorithm
        with timer("generate"):
            if self.partial is not None:  # the first groups to finish, in slices (tidal.driver.partial)
                batch, rollout = None, self.partial.next_batch(step, prompts)
            else:
                batch = self.parts.dataset.next_batch(prompts)
                rollout = self.parts.pool.generate(batch, step_sampling(self.cfg, step, round_))
        stats = self.parts.pool.last_stats
        with timer("score"):
            scored = self.parts.reward.score(rollout)
        reward_metrics = {k: float(v) for k, v in self.parts.reward.last_metrics.items()}
        if a.overlong_buffer:
            scored, reward_metrics["reward/overlong_penalty"] = shape_overlong(
                scored, self.cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
        if round_ == 0:  # online queries sample the first round's prompts
            self._first_round = (batch, rollout)
        partial = {} if self.partial is None else self.partial.stats
        return Round(scored, reward_metrics, {"rollout/requeued_chunks": float(stats.requeued_chunks),
                                              "rollout/restarted_workers": float(len(stats.restarted_workers)),
                                              **partial})

    def _push(self, handle: Any, version: int) -> None:
        """Runs on the rollout thread, in order with the generations around it."""
        t0 = time.perf_counter()
        self._sync_failed += load_or_restart(self.parts.pool, handle, version)  # a lost worker: warned, restarted
        self._load_times.append(time.perf_counter() - t0)

    def run(self) -> dict[str, float]:
        """Train to algorithm.steps; returns the last step's metrics."""
        a, lc = self.cfg.algorithm, self.cfg.logging
        self.start_step = self.step
        self.pipeline = RolloutPipeline(self._produce, self._push, self.step, a.steps, self.max_staleness,
                                        pool_version=self.parts.pool.weight_version, max_lag=max_token_lag(self.cfg))
        self.pipeline.preload(self._preloaded)
        self.logger.progress(self.step, a.steps, stage=self.stage)
        try:
            with self.stops.safe_points():
                last = self._steps()
            if self.stops.requested:
                if lc.checkpoint_on_interrupt:
                    self.checkpoint()
                raise Interrupted(self.stops.requested, self.step, a.steps, lc.checkpoint_on_interrupt)
            self.pipeline.drain()  # the last weight push lands before anyone reads the pool
            if self._checkpointed != self.step:  # a best-gold step has its checkpoint already
                self.checkpoint()  # the final one (logging.checkpoint_every=0: the only one)
            if self.stopped_early == "gold_drop":  # the final policy is the best-gold one
                from tidal.driver.best_checkpoint import restore_best

                self.restored_best = restore_best(self.run_dir, self.parts.learners, self.parts.pool, self.step)
        except BaseException:
            self.pipeline.shutdown(wait=False)  # a rollout job stuck in a call must not hold the stop
            raise
        self.pipeline.shutdown()
        return last

    def _steps(self) -> dict[str, float]:
        """Train steps until algorithm.steps, or until a stop was requested (checked between
        steps); returns the last step's metrics."""
        a, lc = self.cfg.algorithm, self.cfg.logging
        last: dict[str, float] = {}
        while self.step < a.steps and not self.stops.requested and self.stopped_early is None:
            last = self._train_step(self.step)
            self.step += 1
            last.update(self._watch(last))
            if self.step % lc.log_every == 0 or self.step == a.steps:
                self.logger.log(self.step, last, stage=self.stage)
            self.logger.progress(self.step, a.steps, stage=self.stage, reward=last["rl/score_mean"],
                                 kl=last["rl/kl"], kl_coef=last["rl/kl_coef"])
            if lc.checkpoint_every and self.step % lc.checkpoint_every == 0 and self.step < a.steps \
                    and self._checkpointed != self.step:
                self.checkpoint()
        return last

    def _train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        timer = Timer()
        with timer("wait_rollout"):  # the pipeline checks the staleness bound of what it hands out
            produced = self.pipeline.get(step, timeout_s=self.cfg.cluster.sync_timeout_s * 4)
        learners = self.parts.learners
        rollout, scores = usable_rows(produced.batch, learners.algorithm, self.cfg.rollout.n_samples)
        pi_old = self.pi_old.decide(step, rollout)
        with timer("forward"):
            fwd = learners.forward(rollout, pi_old)
        if pi_old.check:
            self.pi_old.observe(step, fwd.logprob_gap())
        batch = StepBatch(step, produced.batch, scores, fwd, self.kl_ctl.value, self.parts.ptx, self.correction)
        result = learners.algorithm.update(learners, batch, timer)
        with timer("sync"):
            handle = learners.export_weights(step + 1)
            self.pipeline.push(handle, step + 1)
        push = {"rollout/push_mb": handle.num_bytes / 2**20} if handle.num_bytes else {}  # LoRA: adapters only
        if not self.async_mode:  # sync mode: the new weights are in the pool before the next step
            with timer("sync"):
                self.pipeline.drain()
        self.kl_ctl.update(result.kl_per_seq, len(rollout))
        wall = time.perf_counter() - t0
        self._record_rollout(step, produced)
        return {**self._step_metrics(produced, batch, pi_old, result, timer, wall), **push}

    def _watch(self, last: dict[str, float]) -> dict[str, float]:
        """The monitors after a step: collapse warnings (degenerate share, KL per token) and the
        KL bound every step, the held-out proxy/gold evaluation every logging.gold_every steps.
        Returns metrics to log."""
        from tidal.driver.monitor import print_warning

        for warning in self.collapse.observe(self.step, last):
            print_warning(warning)
        verdicts = [self.monitor.observe_kl(last["rl/kl"])]
        metrics: dict[str, float] = {}
        every = self.cfg.logging.gold_every
        if self.judge is not None and every and (self.step % every == 0 or self.step == self.cfg.algorithm.steps):
            metrics, verdict = self._judge_gold()
            verdicts.append(verdict)
        why = next((v.stop for v in verdicts if v.stop), None)
        if why is not None:
            self.stopped_early = why
            metrics["rl/early_stop"] = float(self.step)
            print(f"tidal: early stop ({why}, algorithm.early_stop) after rl step {self.step}", flush=True)
        return metrics

    def _judge_gold(self):
        """One selection-prompt evaluation fed to the monitor; a new best is checkpointed (keep_best)."""
        from tidal.driver.best_checkpoint import publish_best
        from tidal.driver.monitor import print_warning

        if self.pipeline is not None:
            self.pipeline.drain()  # the pool is idle (and holds the newest weights) while we sample
        metrics, gold = self.judge(self.parts.pool, self.parts.reward, self.parts.learners)
        v = self.monitor.observe_eval(self.step, metrics["eval/proxy"], gold, metrics["eval/kl"])
        if v.warn:
            print_warning(self.monitor.warning(self.step, v.check, self.cfg.logging.gold_term))
        metrics.update(self.monitor.metrics(v))
        if v.best and self.keep_best:
            publish_best(self.run_dir, self.checkpoint(), self.step, self.monitor.best_gold)
        return metrics, v

    def _step_metrics(self, produced: Produced, batch: StepBatch, pi_old: PiOldStep, result: StepUpdate,
                      timer: Timer, wall: float) -> dict[str, float]:
        scored = produced.batch
        gap = batch.fwd.logprob_gap()  # trainer vs engine, where the forward computed both
        pi_old_m = {"rl/old_logprobs_engine": float(pi_old.source == "engine"),
                    "rl/old_logprobs_in_update": float(pi_old.source == "update"),
                    "update/rows_dropped": float(len(scored.rollout) - len(batch.scores)),
                    **({} if gap is None else {"rollout/logprob_gap": gap})}
        t = {**produced.timings, **timer.totals}
        versions = torch.tensor(produced.weight_versions, dtype=torch.float32)
        tokens = sum(len(r) for r in scored.rollout.response_ids)
        mean_len = max(tokens / max(len(scored.rollout), 1), 1.0)
        learner_busy = t.get("forward", 0) + t.get("advantages", 0) + t.get("update", 0) + t.get("sync", 0)
        m = {
            "rl/score_mean": scored.scores.mean().item(),
            "rl/kl": result.kl_per_seq,
            "rl/kl_per_token": result.kl_per_seq / mean_len,  # what logging.warn_kl watches
            "rollout/degenerate": degenerate_share(list(scored.rollout.response_text)),  # and warn_degenerate
            "rl/kl_coef": self.kl_ctl.value,
            "rl/staleness_max": float(produced.step - min(produced.weight_versions)),
            "rl/staleness_mean": float(produced.step - versions.mean().item()),
            "rl/weight_version": float(produced.step + 1),
            "rl/tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "rl/samples": float(len(scored.rollout)),
            "idle/rollout": max(0.0, 1.0 - t.get("generate", 0.0) / wall),
            "idle/reward": max(0.0, 1.0 - t.get("score", 0.0) / wall),
            "idle/learner": max(0.0, 1.0 - learner_busy / wall),
            **{f"time/{k}_s": v for k, v in t.items()},
            "time/step_s": wall,
            "time/load_weights_s": self._load_times[-1] if self._load_times else 0.0,
            "rollout/sync_failed_workers": float(self._sync_failed),
            **result.metrics, **pi_old_m, **produced.metrics,
            **token_metrics(produced.step, scored.rollout, max_token_lag(self.cfg)),
        }
        return m

    def _record_rollout(self, step: int, produced: Produced) -> None:
        scored = produced.batch
        r = scored.rollout
        rec = {"step": step + 1, "prompt_index": list(r.prompt_index), "weight_version": list(r.weight_version),
               "score": [round(float(s), 6) for s in scored.scores.tolist()]}
        if "online/reward_version" in produced.metrics:  # the reward-model version that scored each sample
            rec["reward_version"] = [int(produced.metrics["online/reward_version"])] * len(r)
        with open(self.run_dir / ROLLOUTS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> Path:
        """Atomic checkpoint after `self.step` steps. Async: waits for the queued rollouts and
        stores the generated-but-untrained steps, so a resume replays them exactly."""
        pending = self.pipeline.drain() if self.pipeline is not None else []
        in_flight = None if self.partial is None else self.partial.state_dict()  # after drain: no slice runs
        state = DriverState(step=self.step, weight_version=self.step, kl_controller=self.kl_ctl.state_dict(),
                            reward_state=self.parts.reward.state_dict(),
                            data_state=dataclasses.asdict(self.parts.dataset.state),
                            extra={"monitor": self.monitor.state_dict(), "pi_old": self.pi_old.state_dict(),
                                   "config": config_record(self.cfg)})  # a resume refuses a changed config
        self._checkpointed = self.step

        def write(d: Path) -> None:
            self.parts.learners.checkpoint(d / "learner")
            state.save(d)
            if pending:
                torch.save(pending, d / "pending.pt")
            if in_flight is not None:
                torch.save(in_flight, d / "partial.pt")

        logs = (self.logger.run_dir / METRICS_FILE, self.run_dir / ROLLOUTS_FILE)  # on disk before the checkpoint
        return write_checkpoint(self.run_dir, self.step, write, logs=logs)
