"""`LearnerGroup`: N DeepSpeed learner ranks plus an optional frozen reference worker, on the
one actor layer (tidal.actors.actor_group.ActorGroup), behind named methods.

Data is sliced per rank on the driver BEFORE `ray.put`, so each rank receives only its shard;
the metrics a rank returns are already averaged over ranks. Every wait on an actor has the
deadline cluster.sync_timeout_s; a failed, dead or silent rank raises `LearnerError` naming it
as soon as it fails (fail-fast: its peers may be blocked in a collective). A process group
cannot take back one member, so a run that lost a rank resumes from its last checkpoint.
`local=True` runs one rank (and the reference) in this process, without Ray.

The supervised fits (SFT, DPO, reward model, expert-iteration rounds) live in
tidal.learner.fits.SupervisedFits, which the group owns as `fits`.

One experience path: `forward(rollout, pi_old)` (old-policy, reference and critic forward passes;
where pi_old comes from is the step's tidal.learner.pi_old decision) and `assemble(forward, scores,
kl_coef)` (KL-penalised rewards, advantages) are two calls, so the RL loop times them separately
and evaluation reuses `forward`; the algorithm table's update (tidal.learner.updates) calls
`assemble` and `update_rl`.

Shapes follow tidal.common.types: [left-padded prompt | right-padded response], (B, P+R)
sequences and (B, R) per-token tensors.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.actors.actor_group import ActorGroup
from tidal.actors.threads import run_threads
from tidal.common.config import TidalConfig
from tidal.common.models import load_tokenizer
from tidal.common.precision import decide_autocast
from tidal.common.types import Experience, RolloutBatch
from tidal.learner.algorithms import algorithm_for
from tidal.learner.engine import model_dtype
from tidal.learner.dpo import DPOBatch
from tidal.learner.experience import (ForwardPass, assemble_experience, experience_metrics, pad_response_floats,
                                      max_token_lag, pad_response_versions, pad_rollout)
from tidal.learner.fits import RewardFit, SupervisedFits, train_shards
from tidal.learner.lora import uses_own_base
from tidal.learner.mismatch import Correction
from tidal.learner.pi_old import TRAINER, PiOldStep, forward_planned, has_engine_logprobs
from tidal.learner.reference import ReferenceWorker
from tidal.learner.reward_model import PreferenceBatch
from tidal.learner.rl import UpdateResult
from tidal.learner.sft import SFTBatch
from tidal.learner.worker import ROLES, LearnerWorker, WorkerSpec


class LearnerError(RuntimeError):
    """A learner or reference actor failed, died, or missed its deadline."""


SYNC_HINT = " (cluster.sync_timeout_s); a peer may have died or hung in a collective"


def default_rl_total_steps(cfg: TidalConfig) -> int:
    """Optimizer steps of the RL stage, the horizon of the linear LR decay."""
    rows = cfg.algorithm.prompts_per_step * cfg.rollout.n_samples
    return cfg.algorithm.steps * cfg.algorithm.update_epochs * max(1, rows // cfg.learner.mini_batch_size)


def _check_group_args(role: str, critic_path, local: bool, world_size: int) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown learner role {role!r}; expected one of {ROLES}")
    if role == "reward" and critic_path is not None:
        raise ValueError("a reward-model group trains no critic; pass critic_path only with role='policy'")
    if local and world_size != 1:
        raise ValueError(f"local mode runs one rank in-process; set learner.num_workers=1 (got {world_size})")


class LearnerGroup:
    def __init__(self, cfg: TidalConfig, model_path: str | Path, role: str = "policy",
                 critic_path: str | Path | None = None, reference_path: str | Path | None = None, *,
                 local: bool = False, placement: Any = None, rl_total_steps: int | None = None,
                 critic_affine: tuple[float, float] | None = None):
        """role "policy": causal LM (critic from `critic_path` when given: the reward-model folder,
        docs/implementation.md#d9); role "reward": a value model trained on preferences.
        `reference_path`: start a frozen reference worker (the RL stage's initial policy); with LoRA
        adapters on that very model the ranks compute it instead, as their base with the adapters off.
        `placement`: a tidal.actors.placement.Placement whose "learner" and "reference" slots to
        use; None: the group places itself (its own placement group, freed by shutdown).
        `critic_affine` (shift, scale): the critic's head outputs (raw - shift) / scale, e.g. the
        reward normalisation of the reward model it starts from (see driver/rl_stage.py)."""
        self.cfg, self.role = cfg, role
        self.world_size = cfg.learner.num_workers
        self.timeout = cfg.cluster.sync_timeout_s
        self.algorithm = algorithm_for(cfg)
        _check_group_args(role, critic_path, local, self.world_size)
        self.tokenizer = load_tokenizer(model_path)  # the driver pads and tokenizes with it
        self.spec = WorkerSpec(role, str(model_path), None if critic_path is None else str(critic_path),
                               rl_total_steps or default_rl_total_steps(cfg), critic_affine)
        self.ranks: ActorGroup | None = None
        self.reference: ActorGroup | None = None
        # LoRA on the reference model itself: the ranks compute the reference as their base with the
        # adapters off (tidal.learner.lora), and no reference worker is started
        self.reference_in_policy = uses_own_base(cfg.learner.lora_rank, model_path, reference_path)
        if self.reference_in_policy:
            reference_path = None
        self._own_placement = None
        t0 = time.perf_counter()
        try:
            if placement is None and not local:
                placement = self._own_placement = self._make_placement(reference_path is not None)
            lc, n = cfg.learner, self.world_size
            opts = {"num_cpus": lc.cpus_per_worker, "num_gpus": lc.gpus_per_worker}
            self.threads = run_threads(cfg, reference_alone=not (forward_planned(cfg) or self.algorithm.uses_critic))
            # a rank's old-logprob / critic forwards run beside the reference worker's: share the cores
            fwd_threads = self.threads.learner_forward if reference_path is not None else self.threads.learner
            self.ranks = ActorGroup(LearnerWorker, n, args=lambda r: (cfg, r, n, self.threads.learner, fwd_threads),
                                    options=opts, options_fn=placement.actor_options("learner") if placement else None,
                                    local=local, name="learner", label=lambda r: f"learner rank {r}/{n}",
                                    call_timeout_s=self.timeout)
            self.spec = dataclasses.replace(self.spec, autocast=self._decide_autocast())
            if reference_path is not None:
                self.reference = ActorGroup(
                    ReferenceWorker, 1, args=(cfg, str(reference_path), self.threads.reference, self.spec.autocast),
                    options=opts,
                    options_fn=placement.actor_options("reference") if placement else None,
                    local=local, name="reference", label=lambda i: "reference worker", call_timeout_s=self.timeout)
            self.timings = self._setup()
            self.fits = SupervisedFits(cfg, n, self._call, self.ranks.put, self.compute_logprobs, self.compute_scores)
        except BaseException:
            self.shutdown()  # no half-built group keeps its actors or placement group
            raise
        self.timings["total_s"] = time.perf_counter() - t0
        if self.timings["autocast_bf16"]:
            print(f"tidal: {role} learner forward passes in bf16 autocast (learner.autocast={cfg.learner.autocast})",
                  flush=True)

    def _make_placement(self, with_reference: bool) -> Any:
        """The group's own placement group (freed by shutdown): its ranks, and the reference worker."""
        from tidal.actors.placement import Placement, plan_placement

        counts = {"learner": self.world_size, "reference": int(with_reference)}
        return Placement(plan_placement(self.cfg, counts), self.timeout,
                         name_prefix=f"tidal-{self.role}-{uuid.uuid4().hex[:8]}")

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

    def _collect(self, method: str, group: ActorGroup, started: dict[int, Any]) -> list:
        """Values in rank order, or LearnerError naming the first rank that failed (fail-fast)."""
        return group.collect_or_raise(started, method, LearnerError, self.timeout, fail_fast=True,
                                      timeout_hint=SYNC_HINT)

    def _call(self, method: str, fn: Callable | dict[int, Callable], ranks: list[int] | None = None) -> list:
        """fn(handle) on every rank (or a dict: one call per rank), waited for fail-fast."""
        calls = fn if isinstance(fn, dict) else {r: fn for r in (ranks if ranks is not None else self.ranks.actor_ids)}
        return self._collect(method, self.ranks, self.ranks.start_each(calls))

    # ------------------------------------------------------------------ sharded forward passes

    def _start_infer(self, method_of: Callable[[Any], Any], tensors: tuple[torch.Tensor, ...], extra: tuple) -> dict:
        """Start a forward pass over all rows: equal row ranges per rank (the last rows repeat to
        fill the last shard: under ZeRO-3 every rank must run the same number of forwards)."""
        n = tensors[0].shape[0]
        k = -(-n // self.world_size)
        shards = torch.arange(k * self.world_size).clamp(max=n - 1).view(self.world_size, k)
        calls = {}
        for r, s in enumerate(shards):
            args = tuple(self.ranks.put(t[s]) for t in tensors) + extra
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

    def compute_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model trunk features (N, H) at each row's last real token (reward role)."""
        return self._infer("compute_features", lambda a: a.compute_features, (input_ids, attention_mask), ())

    def _start_ref(self, input_ids, attention_mask, response_len: int, temperature: float) -> tuple[bool, dict]:
        """Start the reference forward: on the ranks (LoRA base with adapters off) or the reference worker."""
        if self.reference_in_policy:
            return True, self._start_infer(lambda a: a.compute_ref_logprobs, (input_ids, attention_mask),
                                           (response_len, temperature))
        if self.reference is None:
            raise LearnerError("compute_ref_logprobs: this group has no reference worker; pass reference_path")
        args = (self.reference.put(input_ids), self.reference.put(attention_mask), response_len, temperature)
        return False, self.reference.start(lambda a: a.compute_logprobs.remote(*args))

    def _finish_ref(self, started: tuple[bool, dict], n: int) -> torch.Tensor:
        on_ranks, calls = started
        if on_ranks:
            return self._finish_infer("compute_ref_logprobs", calls, n)
        return self._collect("compute_ref_logprobs", self.reference, calls)[0].clone()  # zero-copy: read-only

    def compute_ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                             temperature: float) -> torch.Tensor:
        """Frozen reference logprobs (B, R), same temperature and position ids as the policy."""
        return self._finish_ref(self._start_ref(input_ids, attention_mask, response_len, temperature), len(input_ids))

    # ------------------------------------------------------------------ supervised fits (self.fits)

    def fit_sft(self, data: SFTBatch, **options) -> list[dict[str, float]]:
        """Supervised fine-tuning: SupervisedFits.fit_sft (epochs, max_steps, lr, on_progress)."""
        return self.fits.fit_sft(data, **options)

    def fit_dpo(self, data: DPOBatch, **options) -> list[dict[str, float]]:
        """Direct preference optimisation: SupervisedFits.fit_dpo (epochs, max_steps, lr, on_progress)."""
        return self.fits.fit_dpo(data, **options)

    def fit_reward(self, train: PreferenceBatch, held_out: PreferenceBatch | None = None, **options) -> RewardFit:
        """Reward-model training: SupervisedFits.fit_reward (loss, epochs, max_steps, lr, on_progress)."""
        return self.fits.fit_reward(train, held_out, **options)

    def update_sft(self, data: SFTBatch, epochs: int, lr: float) -> dict[str, float]:
        """One expert-iteration round: SupervisedFits.update_sft."""
        return self.fits.update_sft(data, epochs, lr)

    def dpo_reference(self, data: DPOBatch) -> DPOBatch:
        """`data` with the current policy's reference log-probs: SupervisedFits.dpo_reference."""
        return self.fits.dpo_reference(data)

    # ------------------------------------------------------------------ RL: one experience path

    def forward(self, rollout: RolloutBatch, pi_old: PiOldStep = TRAINER,
                with_values: bool | None = None) -> ForwardPass:
        """Pad a rollout (tokens after the first EOS cut) and run the forward passes on it at
        once: old-policy logprobs on the ranks, reference logprobs on the reference worker, and
        critic values when the algorithm uses a critic (with_values None) or when asked.
        `pi_old`: the step's decision (tidal.learner.pi_old.PiOld.decide): the ranks' forward
        (trainer), the engine's logprobs of the sampled tokens (engine), or none (update: the
        update takes it)."""
        ids, mask, resp = pad_rollout(rollout, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        R, temperature, n = resp.shape[1], self.cfg.rollout.temperature, len(rollout)
        engine_lp = pad_response_floats(rollout.response_logprobs, R) * resp if has_engine_logprobs(rollout) else None
        if pi_old.source == "engine" and engine_lp is None:
            raise ValueError("pi_old from the engine, but the rollout carries no engine log-probs (PiOld.decide "
                             "never asks for that)")
        trainer, from_engine = pi_old.source == "trainer", pi_old.source == "engine"
        old = self._start_infer(lambda a: a.compute_logprobs, (ids, mask), (R, temperature)) if trainer else None
        ref = self._start_ref(ids, mask, R, temperature)
        want_values = self.algorithm.uses_critic if with_values is None else with_values
        values = self._start_infer(lambda a: a.compute_values, (ids, mask), (R,)) if want_values else None
        old_logprobs = self._finish_infer("compute_logprobs", old, n) if trainer else engine_lp if from_engine else None
        return ForwardPass(
            input_ids=ids, attention_mask=mask, response_mask=resp, old_logprobs=old_logprobs,
            ref_logprobs=self._finish_ref(ref, n),
            values=None if values is None else self._finish_infer("compute_values", values, n),
            rollout_logprobs=None if from_engine else engine_lp,  # nothing to compare when they ARE pi_old
            weight_version=torch.tensor(rollout.weight_version, dtype=torch.long) if rollout.weight_version else None,
            pi_old=pi_old.source,
            truncated=torch.tensor([f != "stop" for f in rollout.finish_reason]) if rollout.finish_reason else None,
            token_versions=pad_response_versions(rollout, R))

    def assemble(self, fwd: ForwardPass, scores: torch.Tensor, kl_coef: float,
                 step: int | None = None) -> tuple[Experience, dict[str, float]]:
        """KL-penalised rewards and advantages of the algorithm's table entry, and the batch's
        experience metrics (KL per sequence, lengths, engine-vs-trainer logprob gap). `step`: the
        version trained; tokens lagging it by more than learner.experience.max_token_lag are left out of the loss."""
        a = self.cfg.algorithm
        oldest = None if step is None else step - max_token_lag(self.cfg)
        exp = assemble_experience(fwd, scores.float(), algorithm=self.algorithm, group_size=self.cfg.rollout.n_samples,
                                  kl_coef=kl_coef, kl_estimator=a.kl_estimator, gamma=a.gamma, lam=a.lam,
                                  whiten=a.whiten_advantages, overlong_filter=a.overlong_filter, oldest_version=oldest)
        return exp, experience_metrics(exp, a.kl_estimator)

    def update_rl(self, experience: Experience, ptx: SFTBatch | None = None,
                  correction: Correction | None = None) -> UpdateResult:
        """algorithm.update_epochs passes of minibatch updates on `experience`, plus ptx_coef x SFT
        loss on `ptx` (PPO-ptx). With `correction` (tidal.learner.mismatch), each token's policy
        loss is weighted for the engine/trainer mismatch (where the rows carry engine log-probs).
        Metrics averaged over minibatches and ranks; with experience.old_logprobs None, pi_old's
        KL and engine gap taken in the update."""
        shards = train_shards(len(experience), self.world_size)
        ptx_refs = [None] * self.world_size
        if ptx is not None:
            ptx_refs = [self.ranks.put(ptx.select(s)) for s in train_shards(len(ptx), self.world_size)]
        calls = {}
        for r, (s, p) in enumerate(zip(shards, ptx_refs)):
            exp_ref = self.ranks.put(experience.select(s))
            calls[r] = lambda a, e=exp_ref, p=p: a.update_rl.remote(e, p, correction)
        result = self._call("update_rl", calls)[0]
        unused = float(len(experience) % self.world_size)
        return replace(result, metrics={**result.metrics, "learner/rows_unused": unused})

    # ------------------------------------------------------------------ weights and checkpoints

    def export_weights(self, version: int, bucket_mb: float | None = None, transport=None):
        """Publish the policy weights as `version`: HF names, LoRA merged, ZeRO-3 gathered (every
        rank takes part), sent by rank 0 through `transport` (default by rollout.weight_transport:
        the object store in ~bucket_mb buckets, rollout.weight_bucket_mb, no driver in the data
        path; or the collective / ipc push, tidal.learner.weights_out: a live version that the ranks
        send from their devices when the pool syncs, or in async mode a copy rank 0 staged). Returns
        the tidal.actors.weights.WeightHandle that rollout workers load. Needs Ray up, also locally."""
        from tidal.actors.weights import ObjectStoreTransport

        if transport is None and self.cfg.rollout.weight_transport == "object_store":
            transport = ObjectStoreTransport(get_timeout_s=self.timeout)
        bucket_mb = bucket_mb or self.cfg.rollout.weight_bucket_mb
        return self._call("export_weights", lambda a: a.export_weights.remote(version, bucket_mb, transport))[0]

    def export_reward_weights(self, version: int):
        """Publish the reward model (role reward) as `version` through the object store, as the
        policy's weights travel; returns the WeightHandle reward workers hot-swap to."""
        from tidal.actors.weights import ObjectStoreTransport

        transport = ObjectStoreTransport(get_timeout_s=self.timeout)
        return self._call("export_reward_weights", lambda a: a.export_reward_weights.remote(
            version, self.cfg.rollout.weight_bucket_mb, transport))[0]

    def save_pretrained(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """HF folder + tokenizer: the policy (merged LoRA), or the reward model with `extra`
        metadata (default: the reward_mean/std measured by fit_reward)."""
        extra = extra if extra is not None else (self.fits.reward_stats or None)
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
