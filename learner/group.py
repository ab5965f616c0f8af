"""`LearnerGroup`: N DeepSpeed learner ranks as Ray actors in a placement group, plus an
optional frozen reference worker, behind named methods.

Data is sliced per rank on the driver BEFORE `ray.put`, so each rank receives only its shard;
the metrics a rank returns are already averaged over ranks. Every wait on an actor has the
deadline cluster.sync_timeout_s, and a failed, dead or silent actor raises `LearnerError`
naming it. `local=True` runs one rank (and the reference) in this process, without Ray.

Shapes follow tidal.common.types: [left-padded prompt | right-padded response], (B, P+R)
sequences and (B, R) per-token tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.common.config import TidalConfig
from tidal.common.models import load_tokenizer
from tidal.common.types import Experience, ScoredBatch
from tidal.learner.experience import (assemble_experience, pad_response_floats, pad_rollout, select_rollout,
                                      valid_rows)
from tidal.learner.reference import ReferenceWorker
from tidal.learner.reward_model import PreferenceBatch, pair_accuracy
from tidal.learner.sft import SFTBatch
from tidal.learner.worker import ROLES, FitPlan, LearnerWorker, WorkerSpec

STEPS_PER_CALL = 32  # optimizer steps per remote fit call: each call is bounded by the sync timeout


class LearnerError(RuntimeError):
    """A learner or reference actor failed, died, or missed its deadline."""


@dataclass(frozen=True)
class RewardFit:
    history: list[dict[str, float]]  # per optimizer step
    eval_accuracy: float | None  # held-out pair accuracy (None without held-out data)
    reward_mean: float  # score statistics over the training (+ held-out) responses,
    reward_std: float  # saved with the model for reward normalization


def default_rl_total_steps(cfg: TidalConfig) -> int:
    """Optimizer steps of the RL stage, the horizon of the linear LR decay."""
    rows = cfg.algorithm.prompts_per_step * cfg.rollout.n_samples
    return cfg.algorithm.steps * cfg.algorithm.ppo_epochs * max(1, rows // cfg.learner.mini_batch_size)


class LearnerGroup:
    def __init__(self, cfg: TidalConfig, model_path: str | Path, role: str = "policy",
                 critic_path: str | Path | None = None, reference_path: str | Path | None = None, *,
                 local: bool = False, placement: Any = None, rl_total_steps: int | None = None):
        """role "policy": causal LM (critic from `critic_path` when given: the reward-model folder,
        ANCHORS 9); role "reward": a value model trained on preferences. `reference_path`: start a
        frozen reference worker (the RL stage's initial policy). `placement`: a
        tidal.cluster.placement.Placement whose "learner" and "reference" slots to use; None: the
        group creates its own placement group of num_workers (+1) bundles."""
        self.cfg, self.role, self.local = cfg, role, local
        self.world_size = cfg.learner.num_workers
        self.timeout = cfg.cluster.sync_timeout_s
        if role not in ROLES:
            raise ValueError(f"unknown learner role {role!r}; expected one of {ROLES}")
        if role == "reward" and critic_path is not None:
            raise ValueError("a reward-model group trains no critic; pass critic_path only with role='policy'")
        if local and self.world_size != 1:
            raise ValueError(f"local mode runs one rank in-process; set learner.num_workers=1 (got {self.world_size})")
        self.tokenizer = load_tokenizer(model_path)  # the driver pads and tokenizes with it
        spec = WorkerSpec(role, str(model_path), None if critic_path is None else str(critic_path),
                          rl_total_steps or default_rl_total_steps(cfg))
        self._pg = None
        self.reference = None
        self.reward_stats: dict[str, float] = {}
        t0 = time.perf_counter()
        if local:
            self.workers = [LearnerWorker(cfg, 0, 1)]
            addr, port = self.workers[0].master_address()
            setup = self.workers[0].setup(spec, addr, port)
            if reference_path is not None:
                self.reference = ReferenceWorker(cfg, str(reference_path))
            self.timings = {**setup, "total_s": time.perf_counter() - t0}
        else:
            self.workers = []
            try:
                self._start_actors(spec, reference_path, placement)
            except BaseException:
                self.shutdown()  # no half-built group keeps its actors or placement group
                raise
            self.timings["total_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ actors

    def _start_actors(self, spec: WorkerSpec, reference_path, placement) -> None:
        import ray

        lc = self.cfg.learner
        t0 = time.perf_counter()
        if placement is None:
            from ray.util.placement_group import placement_group

            bundle = {"CPU": lc.cpus_per_worker, **({"GPU": lc.gpus_per_worker} if lc.gpus_per_worker > 0 else {})}
            n_bundles = self.world_size + (reference_path is not None)
            self._pg = placement_group([dict(bundle) for _ in range(n_bundles)], strategy="PACK")
            if not ray.wait([self._pg.ready()], timeout=self.timeout)[0]:
                raise LearnerError(f"placement group of {n_bundles} x {bundle} not scheduled within {self.timeout:.0f} s; "
                                   "the cluster lacks the resources (lower learner.num_workers / cpus_per_worker)")
        t1 = time.perf_counter()
        actor = ray.remote(LearnerWorker)
        self.workers = [actor.options(**self._options(placement, "learner", 0)).remote(self.cfg, 0, self.world_size)]
        addr, port = self._get("master_address", [self.workers[0].master_address.remote()])[0]
        self.workers += [actor.options(**self._options(placement, "learner", r)).remote(self.cfg, r, self.world_size)
                         for r in range(1, self.world_size)]
        refs = [w.setup.remote(spec, addr, port) for w in self.workers]
        if reference_path is not None:
            ref_opts = self._options(placement, "reference", 0 if placement else self.world_size)
            self.reference = ray.remote(ReferenceWorker).options(**ref_opts).remote(self.cfg, str(reference_path))
            refs.append(self.reference.ready.remote())
        setup = self._get("setup", refs)
        self.timings = {"placement_s": t1 - t0, "actors_and_setup_s": time.perf_counter() - t1,
                        "dist_init_s": max(s["dist_init_s"] for s in setup[:self.world_size]),
                        "engines_s": max(s["engines_s"] for s in setup[:self.world_size])}

    def _options(self, placement, role: str, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if placement is not None:
            return placement.options(role, index)
        lc = self.cfg.learner
        return {"num_cpus": lc.cpus_per_worker, "num_gpus": lc.gpus_per_worker,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index)}

    def _label(self, i: int) -> str:
        return f"learner rank {i}/{self.world_size}" if i < self.world_size else "reference worker"

    def _get(self, method: str, refs: list, labels: list[str] | None = None) -> list:
        """Results of `refs` in order (ref i from rank i unless `labels` names the actors).
        Errors surface as soon as any actor fails, so a crashed rank is named even while its
        peers are still blocked in a collective waiting for it."""
        import ray
        from ray.exceptions import RayActorError, RayError

        labels = labels or [self._label(i) for i in range(len(refs))]
        deadline = time.monotonic() + self.timeout
        results: list = [None] * len(refs)
        pending = {ref: i for i, ref in enumerate(refs)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = ", ".join(labels[i] for i in sorted(pending.values()))
                raise LearnerError(f"{method}: {late} did not answer within {self.timeout:.0f} s "
                                   "(cluster.sync_timeout_s); a peer may have died or hung in a collective")
            i = pending.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except RayActorError as e:
                raise LearnerError(f"{method}: {labels[i]} died: {e}") from e
            except RayError as e:
                raise LearnerError(f"{method} failed on {labels[i]}: {e}") from e
        return results

    def _run(self, method: str, calls: list[Callable], args: list[tuple]) -> list:
        """calls[i](*args[i]) on every rank: actor methods remotely, or plain methods in local mode."""
        if self.local:
            return [call(*a) for call, a in zip(calls, args)]
        return self._get(method, [call.remote(*a) for call, a in zip(calls, args)])

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

    def _infer_shards(self, n: int) -> list[torch.Tensor]:
        """Equal row ranges covering all n rows; the last rows repeat to fill the last shard, because
        under ZeRO-3 every rank must run the same number of forward passes."""
        k = -(-n // self.world_size)
        idx = torch.arange(k * self.world_size).clamp(max=n - 1)
        return list(idx.view(self.world_size, k))

    def _infer(self, method: str, calls: list[Callable], tensors: tuple[torch.Tensor, ...], extra: tuple) -> torch.Tensor:
        n = tensors[0].shape[0]
        shards = self._infer_shards(n)
        out = self._run(method, calls, [tuple(self._put(t[s]) for t in tensors) + extra for s in shards])
        return torch.cat(out)[:n]

    # ------------------------------------------------------------------ inference

    def compute_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                         temperature: float) -> torch.Tensor:
        """Policy logprobs (B, R) of the response tokens (logits / temperature, ANCHORS 3)."""
        return self._infer("compute_logprobs", [w.compute_logprobs for w in self.workers],
                           (input_ids, attention_mask), (response_len, temperature))

    def compute_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """Critic values (B, R); column t = V(state before response token t)."""
        return self._infer("compute_values", [w.compute_values for w in self.workers],
                           (input_ids, attention_mask), (response_len,))

    def compute_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model scores (N,) at each row's last real token (reward role)."""
        return self._infer("compute_scores", [w.compute_scores for w in self.workers], (input_ids, attention_mask), ())

    def compute_ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                             temperature: float) -> torch.Tensor:
        """Frozen reference logprobs (B, R), same temperature and position ids as the policy."""
        if self.reference is None:
            raise LearnerError("compute_ref_logprobs: this group has no reference worker; pass reference_path")
        args = (input_ids, attention_mask, response_len, temperature)
        if self.local:
            return self.reference.compute_logprobs(*args)
        out = self._get("compute_ref_logprobs", [self.reference.compute_logprobs.remote(*args)], ["reference worker"])[0]
        return out.clone()  # a zero-copy result lives in read-only shared memory

    # ------------------------------------------------------------------ RL

    def make_experience(self, scored: ScoredBatch, kl_coef: float) -> Experience:
        """Pad a scored rollout and turn it into training experience: old logprobs (policy),
        ref logprobs (reference), values (critic, PPO), KL-penalised rewards, advantages.
        Rows whose reward was invalid are dropped (whole groups for group baselines)."""
        algo, n = self.cfg.algorithm, self.cfg.rollout.n_samples
        keep = valid_rows(scored, n, whole_groups=algo.name != "ppo")
        if len(keep) == 0:
            raise LearnerError("make_experience: every sample of the batch has an invalid reward; nothing to train on")
        rollout = select_rollout(scored.rollout, keep.tolist())
        input_ids, attention_mask, response_mask = pad_rollout(rollout, self.tokenizer.pad_token_id,
                                                               self.tokenizer.eos_token_id)
        R, temperature = response_mask.shape[1], self.cfg.rollout.temperature
        old = self.compute_logprobs(input_ids, attention_mask, R, temperature)
        ref = self.compute_ref_logprobs(input_ids, attention_mask, R, temperature)
        values = self.compute_values(input_ids, attention_mask, R) if algo.name == "ppo" else None
        has_engine_lp = all(len(lp) > 0 for lp in rollout.response_logprobs)
        return assemble_experience(
            input_ids, attention_mask, response_mask, old, ref, values, scored.scores[keep].float(),
            algorithm=algo.name, group_size=n, kl_coef=kl_coef, kl_estimator=algo.kl_estimator,
            gamma=algo.gamma, lam=algo.lam, whiten=algo.whiten_advantages,
            rollout_logprobs=pad_response_floats(rollout.response_logprobs, R) if has_engine_lp else None,
            weight_version=torch.tensor(rollout.weight_version, dtype=torch.long) if rollout.weight_version else None)

    def update_rl(self, experience: Experience, ptx: SFTBatch | None = None,
                  is_weight_cap: float | None = None) -> dict[str, float]:
        """algorithm.ppo_epochs passes of minibatch updates on `experience` (PPO with the critic,
        or critic-free grpo/rloo/reinforce), plus ptx_coef x SFT loss on `ptx` (PPO-ptx). With
        `is_weight_cap`, tokens are weighted by min(pi_old / pi_rollout, cap) (off-policy samples).
        Returns metrics averaged over minibatches and ranks (ppo/early_stopped, ppo/minibatches...)."""
        shards = self._train_shards(len(experience))
        ptx_refs = [None] * self.world_size
        if ptx is not None:
            ptx_refs = [self._put(ptx.select(s)) for s in self._train_shards(len(ptx))]
        args = [(self._put(experience.select(s)), p, is_weight_cap) for s, p in zip(shards, ptx_refs)]
        metrics = self._run("update_rl", [w.update_rl for w in self.workers], args)[0]
        metrics["learner/rows_unused"] = float(len(experience) % self.world_size)
        return metrics

    # ------------------------------------------------------------------ supervised fits

    def _fit(self, method: str, calls: list[Callable], data, epochs: int, max_steps: int | None, lr: float,
             extra: tuple = ()) -> list[dict[str, float]]:
        """Shard `data` (SFTBatch or PreferenceBatch) once, then run the fit in windows of
        STEPS_PER_CALL optimizer steps, each window one remote call under the sync timeout."""
        shards = self._train_shards(len(data))
        mini = self.cfg.learner.mini_batch_size // self.world_size
        steps_per_epoch = len(shards[0]) // mini
        if steps_per_epoch == 0:
            raise ValueError(f"{method}: {len(data)} examples give {len(shards[0])} per rank, fewer than one minibatch "
                             f"({mini} per rank = learner.mini_batch_size / num_workers); add data or lower mini_batch_size")
        total = epochs * steps_per_epoch if max_steps is None else min(epochs * steps_per_epoch, max_steps)
        refs = [self._put(data.select(s)) for s in shards]
        history: list[dict[str, float]] = []
        for start in range(0, total, STEPS_PER_CALL):
            plan = FitPlan(lr, total, start, min(STEPS_PER_CALL, total - start), steps_per_epoch)
            history += self._run(method, calls, [(r, plan) + extra for r in refs])[0]  # rank 0 holds the averages
        return history

    def fit_sft(self, data: SFTBatch, epochs: int | None = None, max_steps: int | None = None,
                lr: float | None = None) -> list[dict[str, float]]:
        """Supervised fine-tuning on demonstrations (prompt tokens masked out). Defaults from
        stages.sft; lr None -> stages.sft.lr or learner.lr. Returns per-step metrics."""
        st = self.cfg.stages.sft
        return self._fit("fit_sft", [w.fit_sft for w in self.workers], data, epochs or st.epochs,
                         max_steps or st.max_steps, lr or st.lr or self.cfg.learner.lr)

    def fit_reward(self, train: PreferenceBatch, held_out: PreferenceBatch | None = None, loss: str | None = None,
                   epochs: int | None = None, max_steps: int | None = None, lr: float | None = None) -> RewardFit:
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
        history = self._fit("fit_reward", [w.fit_reward for w in self.workers], train, epochs or st.epochs,
                            max_steps or st.max_steps, lr or st.lr or self.cfg.learner.lr, (loss,))
        train_scores = self.compute_scores(train.input_ids, train.attention_mask)
        accuracy, scores = None, [train_scores]
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

    # ------------------------------------------------------------------ weights and checkpoints

    def export_weights(self, version: int, bucket_mb: float | None = None, transport=None):
        """Publish the policy weights as `version`: HF names, LoRA merged, ZeRO-3 gathered (every
        rank takes part), sent by rank 0 through `transport` (default: the object store in
        ~bucket_mb buckets, rollout.weight_bucket_mb; no driver in the data path). Returns the
        tidal.cluster.weights.WeightHandle that rollout workers load. Needs Ray up, also locally."""
        from tidal.cluster.weights import ObjectStoreTransport

        transport = transport or ObjectStoreTransport(get_timeout_s=self.timeout)
        bucket_mb = bucket_mb or self.cfg.rollout.weight_bucket_mb
        return self._run("export_weights", [w.export_weights for w in self.workers],
                         [(version, bucket_mb, transport)] * self.world_size)[0]

    def join_weight_transport(self, transport) -> None:
        """Give rank 0 (the sender) a stateful transport, e.g. a collective group with the rollout pool."""
        self._run("join_weight_transport", [self.workers[0].join_weight_transport], [(transport,)])

    def save_pretrained(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """HF folder + tokenizer: the policy (merged LoRA), or the reward model with `extra`
        metadata (default: the reward_mean/std measured by fit_reward)."""
        extra = extra if extra is not None else (self.reward_stats or None)
        results = self._run("save_pretrained", [w.save_pretrained for w in self.workers],
                            [(str(out_dir), extra)] * self.world_size)
        return Path(results[0])

    def checkpoint(self, ckpt_dir: str | Path) -> Path:
        """Weights, optimizer state (per-rank ZeRO partitions), counters and RNG states of every rank."""
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        self._run("checkpoint", [w.save_checkpoint for w in self.workers], [(str(ckpt_dir),)] * self.world_size)
        return Path(ckpt_dir)

    def load_checkpoint(self, ckpt_dir: str | Path) -> None:
        """Restore what `checkpoint` wrote (same num_workers and ZeRO stage)."""
        self._run("load_checkpoint", [w.load_checkpoint for w in self.workers], [(str(ckpt_dir),)] * self.world_size)

    def describe(self) -> list[dict]:
        """Per-rank facts: seed, rng probe, dropout, parameter counts."""
        return self._run("describe", [w.describe for w in self.workers], [()] * self.world_size)

    def parameter_snapshots(self, trainable_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """Every rank's full copy of its parameters (gathered under ZeRO-3); tests and debugging."""
        return self._run("parameter_snapshot", [w.parameter_snapshot for w in self.workers],
                         [(trainable_only,)] * self.world_size)

    def shutdown(self) -> None:
        """Kill the actors and free the placement group (idempotent)."""
        if not self.local:
            import ray

            for actor in self.workers + ([self.reference] if self.reference is not None else []):
                try:
                    ray.kill(actor)
                except Exception:  # already dead
                    pass
            if self._pg is not None:
                from ray.util.placement_group import remove_placement_group

                try:
                    remove_placement_group(self._pg)
                except Exception:
                    pass
        self.workers, self.reference, self._pg = [], None, None
