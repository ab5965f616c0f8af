"""`LearnerGroup`: N DeepSpeed learner ranks plus an optional frozen reference worker, on the
one actor layer (tidal.actors.actor_group.ActorGroup), behind named methods.

Data is sliced per rank on the driver BEFORE `ray.put`, so each rank receives only its shard;
the metrics a rank returns are already averaged over ranks. Every wait on an actor has the
deadline cluster.sync_timeout_s; a failed, dead or silent rank raises `LearnerError` naming it
as soon as it fails (fail-fast: its peers may be blocked in a collective). A process group
cannot take back one member, so `restart()` replaces every rank (the caller reloads a
checkpoint). `local=True` runs one rank (and the reference) in this process, without Ray.

One experience path: `forward(rollout)` (old-policy, reference and critic forward passes) and
`assemble(forward, scores, kl_coef)` (KL-penalised rewards, advantages) are two calls, so the
RL loop times them separately and evaluation reuses `forward`.

Shapes follow tidal.common.types: [left-padded prompt | right-padded response], (B, P+R)
sequences and (B, R) per-token tensors.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.actors.actor_group import ActorCallAborted, ActorCallTimeout, ActorGroup, is_actor_death
from tidal.actors.threads import run_threads
from tidal.common.config import TidalConfig
from tidal.common.models import load_tokenizer
from tidal.common.precision import decide_autocast
from tidal.common.types import Experience, RolloutBatch
from tidal.learner.algorithms import algorithm_for
from tidal.learner.engine import model_dtype
from tidal.learner.experience import (ForwardPass, assemble_experience, engine_old_logprobs, experience_metrics,
                                      old_in_update, pad_response_floats, pad_rollout)
from tidal.learner.reference import ReferenceWorker
from tidal.learner.fits import SupervisedFits
from tidal.learner.sft import SFTBatch
from tidal.learner.worker import ROLES, LearnerWorker, WorkerSpec


class LearnerError(RuntimeError):
    """A learner or reference actor failed, died, or missed its deadline."""


def default_rl_total_steps(cfg: TidalConfig) -> int:
    """Optimizer steps of the RL stage, the horizon of the linear LR decay."""
    rows = cfg.algorithm.prompts_per_step * cfg.rollout.n_samples
    return cfg.algorithm.steps * cfg.algorithm.ppo_epochs * max(1, rows // cfg.learner.mini_batch_size)


class LearnerGroup(SupervisedFits):
    def __init__(self, cfg: TidalConfig, model_path: str | Path, role: str = "policy",
                 critic_path: str | Path | None = None, reference_path: str | Path | None = None, *,
                 local: bool = False, placement: Any = None, rl_total_steps: int | None = None,
                 critic_affine: tuple[float, float] | None = None):
        """role "policy": causal LM (critic from `critic_path` when given: the reward-model folder,
        docs/implementation.md#d9); role "reward": a value model trained on preferences.
        `reference_path`: start a frozen reference worker (the RL stage's initial policy).
        `placement`: a tidal.actors.placement.Placement whose "learner" and "reference" slots to
        use; None: the group places itself (its own placement group, freed by shutdown).
        `critic_affine` (shift, scale): the critic's head outputs (raw - shift) / scale, e.g. the
        reward normalisation of the reward model it starts from (see driver/rl_stage.py)."""
        self.cfg, self.role, self.local = cfg, role, local
        self.world_size = cfg.learner.num_workers
        self.timeout = cfg.cluster.sync_timeout_s
        self.algorithm = algorithm_for(cfg)
        if role not in ROLES:
            raise ValueError(f"unknown learner role {role!r}; expected one of {ROLES}")
        if role == "reward" and critic_path is not None:
            raise ValueError("a reward-model group trains no critic; pass critic_path only with role='policy'")
        if local and self.world_size != 1:
            raise ValueError(f"local mode runs one rank in-process; set learner.num_workers=1 (got {self.world_size})")
        self.tokenizer = load_tokenizer(model_path)  # the driver pads and tokenizes with it
        self.spec = WorkerSpec(role, str(model_path), None if critic_path is None else str(critic_path),
                               rl_total_steps or default_rl_total_steps(cfg), critic_affine)
        self.reward_stats: dict[str, float] = {}
        self.ranks: ActorGroup | None = None
        self.reference: ActorGroup | None = None
        self._own_placement = None
        t0 = time.perf_counter()
        try:
            if placement is None and not local:
                from tidal.actors.placement import Placement, plan_placement

                counts = {"learner": self.world_size, "reference": int(reference_path is not None)}
                placement = self._own_placement = Placement(plan_placement(cfg, counts), self.timeout,
                                                            name_prefix=f"tidal-{role}-{uuid.uuid4().hex[:8]}")
            lc, n = cfg.learner, self.world_size
            opts = {"num_cpus": lc.cpus_per_worker, "num_gpus": lc.gpus_per_worker}
            no_old_forward = engine_old_logprobs(cfg) or old_in_update(cfg)
            self.threads = run_threads(cfg, reference_alone=no_old_forward and not self.algorithm.uses_critic)
            # a rank's old-logprob / critic forwards run beside the reference worker's: share the cores
            fwd_threads = self.threads.learner_forward if reference_path is not None else self.threads.learner
            self.ranks = ActorGroup(LearnerWorker, n, args=lambda r: (cfg, r, n, self.threads.learner, fwd_threads),
                                    options=opts,
                                    options_fn=placement.actor_options("learner") if placement else None,
                                    local=local, name="learner", call_timeout_s=self.timeout)
            self.spec = dataclasses.replace(self.spec, autocast=self._decide_autocast())
            if reference_path is not None:
                self.reference = ActorGroup(
                    ReferenceWorker, 1, args=(cfg, str(reference_path), self.threads.reference, self.spec.autocast),
                    options=opts,
                    options_fn=placement.actor_options("reference") if placement else None,
                    local=local, name="reference", call_timeout_s=self.timeout)
            self.timings = self._setup()
        except BaseException:
            self.shutdown()  # no half-built group keeps its actors or placement group
            raise
        self.timings["total_s"] = time.perf_counter() - t0
        if self.timings["autocast_bf16"]:
            print(f"tidal: {role} learner forward passes in bf16 autocast (learner.autocast={cfg.learner.autocast})",
                  flush=True)

    # ------------------------------------------------------------------ actors

    def _decide_autocast(self) -> bool:
        """learner.autocast decided once for every rank and the reference worker, from the ranks'
        hardware (each says whether its device multiplies bf16 natively): processes that decided
        for themselves could disagree on mixed hardware (tidal.common.precision.decide_autocast)."""
        setting = self.cfg.learner.autocast
        native = [] if setting == "none" else self._call("bf16_native", lambda a: a.bf16_native.remote())
        return decide_autocast(setting, model_dtype(self.cfg), native)

    def _setup(self) -> dict[str, float]:
        """Rendezvous at rank 0's address, build every rank's engines, wait for the reference."""
        t0 = time.perf_counter()
        addr, port = self._call("master_address", lambda a: a.master_address.remote(), ranks=[0])[0]
        started = self.ranks.start(lambda a: a.setup.remote(self.spec, addr, port))
        ref_started = self.reference.start(lambda a: a.ready.remote()) if self.reference else {}
        setup = self._collect("setup", self.ranks, started)
        if self.reference:
            self._collect("setup", self.reference, ref_started)
        return {"actors_and_setup_s": time.perf_counter() - t0,
                "dist_init_s": max(s["dist_init_s"] for s in setup), "engines_s": max(s["engines_s"] for s in setup),
                "autocast_bf16": setup[0]["autocast_bf16"]}

    def restart(self) -> None:
        """Replace every rank and the reference by fresh processes on the same placement slots,
        set up as before (initial weights: reload a checkpoint to continue)."""
        for group in (self.ranks, self.reference):
            if group is not None:
                for i in group.actor_ids:
                    group.mark_unhealthy(i)
                group.restore()
        self.timings = self._setup()

    def _label(self, group: ActorGroup, i: int) -> str:
        return f"learner rank {i}/{self.world_size}" if group is self.ranks else "reference worker"

    def _collect(self, method: str, group: ActorGroup, started: dict[int, Any]) -> list:
        """Values in rank order, or LearnerError naming the first rank that failed."""
        results = group.collect(started, timeout_s=self.timeout, fail_fast=True)
        bad = [r for r in results if not r.ok and not isinstance(r.error, ActorCallAborted)]
        if not bad:
            return [r.value for r in results]
        late = [r for r in bad if isinstance(r.error, ActorCallTimeout)]
        if len(late) == len(bad):
            names = ", ".join(self._label(group, r.actor_id) for r in late)
            raise LearnerError(f"{method}: {names} did not answer within {self.timeout:.0f} s "
                               "(cluster.sync_timeout_s); a peer may have died or hung in a collective")
        r = next(r for r in bad if not isinstance(r.error, ActorCallTimeout))
        what = "died" if is_actor_death(r.error) else "failed"
        raise LearnerError(f"{method}: {self._label(group, r.actor_id)} {what}: {r.error}") from r.error

    def _call(self, method: str, fn: Callable | dict[int, Callable], ranks: list[int] | None = None) -> list:
        """fn(handle) on every rank (or a dict: one call per rank), waited for fail-fast."""
        calls = fn if isinstance(fn, dict) else {r: fn for r in (ranks if ranks is not None else self.ranks.actor_ids)}
        return self._collect(method, self.ranks, self.ranks.start_each(calls))

    def _put(self, value):
        if self.local:
            return value
        import ray

        return ray.put(value)

    # ------------------------------------------------------------------ sharding

    def _train_shards(self, n: int) -> list[torch.Tensor]:
        """Equal contiguous row ranges per rank; the n % world_size trailing rows are left out."""
        k = n // self.world_size
        if k == 0:
            raise ValueError(f"{n} rows cannot feed {self.world_size} learner ranks; need at least one row per rank")
        return [torch.arange(r * k, (r + 1) * k) for r in range(self.world_size)]

    def _start_infer(self, method_of: Callable[[Any], Any], tensors: tuple[torch.Tensor, ...], extra: tuple) -> dict:
        """Start a forward pass over all rows: equal row ranges per rank (the last rows repeat to
        fill the last shard: under ZeRO-3 every rank must run the same number of forwards)."""
        n = tensors[0].shape[0]
        k = -(-n // self.world_size)
        shards = torch.arange(k * self.world_size).clamp(max=n - 1).view(self.world_size, k)
        calls = {}
        for r, s in enumerate(shards):
            args = tuple(self._put(t[s]) for t in tensors) + extra
            calls[r] = lambda a, args=args: method_of(a).remote(*args)
        return self.ranks.start_each(calls)

    def _infer(self, method: str, method_of: Callable[[Any], Any], tensors: tuple, extra: tuple) -> torch.Tensor:
        return self._finish_infer(method, self._start_infer(method_of, tensors, extra), tensors[0].shape[0])

    def _finish_infer(self, method: str, started: dict, n: int) -> torch.Tensor:
        return torch.cat(self._collect(method, self.ranks, started))[:n]

    # ------------------------------------------------------------------ inference

    def compute_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                         temperature: float) -> torch.Tensor:
        """Policy logprobs (B, R) of the response tokens (logits / temperature, docs/implementation.md#d3)."""
        return self._infer("compute_logprobs", lambda a: a.compute_logprobs, (input_ids, attention_mask),
                           (response_len, temperature))

    def compute_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """Critic values (B, R); column t = V(state before response token t)."""
        return self._infer("compute_values", lambda a: a.compute_values, (input_ids, attention_mask), (response_len,))

    def compute_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model scores (N,) at each row's last real token (reward role)."""
        return self._infer("compute_scores", lambda a: a.compute_scores, (input_ids, attention_mask), ())

    def _start_ref(self, input_ids, attention_mask, response_len: int, temperature: float) -> dict:
        if self.reference is None:
            raise LearnerError("compute_ref_logprobs: this group has no reference worker; pass reference_path")
        args = (self._put(input_ids), self._put(attention_mask), response_len, temperature)
        return self.reference.start(lambda a: a.compute_logprobs.remote(*args))

    def _finish_ref(self, started: dict) -> torch.Tensor:
        return self._collect("compute_ref_logprobs", self.reference, started)[0].clone()  # zero-copy: read-only

    def compute_ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                             temperature: float) -> torch.Tensor:
        """Frozen reference logprobs (B, R), same temperature and position ids as the policy."""
        return self._finish_ref(self._start_ref(input_ids, attention_mask, response_len, temperature))

    # ------------------------------------------------------------------ RL: one experience path

    def forward(self, rollout: RolloutBatch, with_values: bool | None = None,
                old_from_engine: bool = False, old_in_update: bool = False) -> ForwardPass:
        """Pad a rollout (tokens after the first EOS cut) and run the forward passes on it at
        once: old-policy logprobs on the ranks, reference logprobs on the reference worker, and
        critic values when the algorithm uses a critic (with_values None) or when asked.
        `old_from_engine`: take the engine's logprobs of the sampled tokens as pi_old instead of
        a forward pass of the ranks (only where they are the same policy's: see
        tidal.learner.experience.engine_old_logprobs); ignored when the rollout has none.
        `old_in_update`: no pi_old here; the update takes it (tidal.learner.experience.old_in_update)."""
        ids, mask, resp = pad_rollout(rollout, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        R, temperature, n = resp.shape[1], self.cfg.rollout.temperature, len(rollout)
        has_engine_lp = len(rollout) > 0 and all(len(lp) > 0 for lp in rollout.response_logprobs)
        engine_lp = pad_response_floats(rollout.response_logprobs, R) * resp if has_engine_lp else None
        from_engine = old_from_engine and engine_lp is not None and not old_in_update
        trainer_old = not (from_engine or old_in_update)
        old = self._start_infer(lambda a: a.compute_logprobs, (ids, mask), (R, temperature)) if trainer_old else None
        ref = self._start_ref(ids, mask, R, temperature)
        want_values = self.algorithm.uses_critic if with_values is None else with_values
        values = self._start_infer(lambda a: a.compute_values, (ids, mask), (R,)) if want_values else None
        return ForwardPass(
            input_ids=ids, attention_mask=mask, response_mask=resp,
            old_logprobs=self._finish_infer("compute_logprobs", old, n) if trainer_old else engine_lp if from_engine else None,
            ref_logprobs=self._finish_ref(ref),
            values=None if values is None else self._finish_infer("compute_values", values, n),
            rollout_logprobs=None if from_engine else engine_lp,
            weight_version=torch.tensor(rollout.weight_version, dtype=torch.long) if rollout.weight_version else None,
            old_from_engine=from_engine)

    def assemble(self, fwd: ForwardPass, scores: torch.Tensor, kl_coef: float) -> tuple[Experience, dict[str, float]]:
        """KL-penalised rewards and advantages of the algorithm's table entry, and the batch's
        experience metrics (KL per sequence, lengths, engine-vs-trainer logprob gap)."""
        a = self.cfg.algorithm
        exp = assemble_experience(fwd, scores.float(), algorithm=self.algorithm, group_size=self.cfg.rollout.n_samples,
                                  kl_coef=kl_coef, kl_estimator=a.kl_estimator, gamma=a.gamma, lam=a.lam,
                                  whiten=a.whiten_advantages)
        return exp, experience_metrics(exp, a.kl_estimator)

    def update_rl(self, experience: Experience, ptx: SFTBatch | None = None,
                  is_weight_cap: float | None = None) -> dict[str, float]:
        """algorithm.ppo_epochs passes of minibatch updates on `experience`, plus ptx_coef x SFT
        loss on `ptx` (PPO-ptx). With `is_weight_cap`, tokens are weighted by
        min(pi_old / pi_rollout, cap) (off-policy samples). Metrics averaged over minibatches and ranks."""
        shards = self._train_shards(len(experience))
        ptx_refs = [None] * self.world_size
        if ptx is not None:
            ptx_refs = [self._put(ptx.select(s)) for s in self._train_shards(len(ptx))]
        calls = {}
        for r, (s, p) in enumerate(zip(shards, ptx_refs)):
            exp_ref = self._put(experience.select(s))
            calls[r] = lambda a, e=exp_ref, p=p: a.update_rl.remote(e, p, is_weight_cap)
        metrics = self._call("update_rl", calls)[0]
        metrics["learner/rows_unused"] = float(len(experience) % self.world_size)
        return metrics

    # ------------------------------------------------------------------ weights and checkpoints

    def export_weights(self, version: int, bucket_mb: float | None = None, transport=None):
        """Publish the policy weights as `version`: HF names, LoRA merged, ZeRO-3 gathered (every
        rank takes part), sent by rank 0 through `transport` (default by rollout.weight_transport:
        the object store in ~bucket_mb buckets, rollout.weight_bucket_mb, no driver in the data
        path; or rank 0's collective sender, tidal.actors.collective.CollectiveWeights). Returns
        the tidal.actors.weights.WeightHandle that rollout workers load. Needs Ray up, also locally."""
        from tidal.actors.weights import ObjectStoreTransport

        if transport is None and self.cfg.rollout.weight_transport == "object_store":
            transport = ObjectStoreTransport(get_timeout_s=self.timeout)
        bucket_mb = bucket_mb or self.cfg.rollout.weight_bucket_mb
        return self._call("export_weights", lambda a: a.export_weights.remote(version, bucket_mb, transport))[0]

    def save_pretrained(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """HF folder + tokenizer: the policy (merged LoRA), or the reward model with `extra`
        metadata (default: the reward_mean/std measured by fit_reward)."""
        extra = extra if extra is not None else (self.reward_stats or None)
        return Path(self._call("save_pretrained", lambda a: a.save_pretrained.remote(str(out_dir), extra))[0])

    def checkpoint(self, ckpt_dir: str | Path) -> Path:
        """Weights, optimizer state (per-rank ZeRO partitions), counters and RNG states of every rank."""
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        self._call("checkpoint", lambda a: a.save_checkpoint.remote(str(ckpt_dir)))
        return Path(ckpt_dir)

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        """Restore what `checkpoint` wrote (same num_workers and ZeRO stage)."""
        self._call("load_checkpoint", lambda a: a.load_checkpoint.remote(str(ckpt_dir)))

    def describe(self) -> list[dict]:
        """Per-rank facts: seed, rng probe, dropout, parameter counts, pid."""
        return self._call("describe", lambda a: a.describe.remote())

    def parameter_snapshots(self, trainable_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """Every rank's full copy of its parameters (gathered under ZeRO-3); tests and debugging."""
        return self._call("parameter_snapshot", lambda a: a.parameter_snapshot.remote(trainable_only))

    def shutdown(self) -> None:
        """Kill the actors and free the group's own placement (idempotent)."""
        for group in (self.ranks, self.reference):
            if group is not None:
                group.shutdown()
        if self._own_placement is not None:
            self._own_placement.shutdown()
        self.ranks, self.reference, self._own_placement = None, None, None
