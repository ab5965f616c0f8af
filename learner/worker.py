"""One data-parallel learner rank: a DeepSpeed ZeRO engine (plus an optional critic engine).

A plain class. `LearnerGroup` turns it into Ray actors (one per rank); a unit test can use it
in-process with world size 1. Life cycle:

    w = LearnerWorker(cfg, rank, world_size)
    addr, port = rank0.master_address()          # rank 0 picks the rendezvous port
    w.setup(WorkerSpec("policy", path, critic_path), addr, port)   # on all ranks at once

Roles: "policy" (causal LM; optional LoRA; optional critic = value model initialised from the
reward-model folder, docs/implementation.md#d9) and "reward" (value model trained on preferences,
fully fine-tuned; online RLHF's calls: RewardRoleCalls). All ranks run the same forward passes
(ZeRO-3 gathers parameters collectively)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from tidal.actors.devices import enter_device
from tidal.actors.threads import apply_threads, threads_during
from tidal.common.config import TidalConfig
from tidal.common.lora import spec_from_config
from tidal.common.models import response_logits, sequence_logprobs
from tidal.common.ops import logprobs_and_entropy
from tidal.common.precision import autocast, bf16_native
from tidal.learner.engine import (build_policy, build_value, free_port, init_distributed, linear_lr, make_engine,
                                  seed_everything)
from tidal.learner.reward_model import RewardRoleCalls
from tidal.learner.weights_out import PolicyWeightsOut

ROLES = ("policy", "reward")
CKPT_TAG = "state"


@dataclass(frozen=True)
class WorkerSpec:
    """What a learner rank builds."""

    role: str  # "policy" | "reward"
    model_path: str  # HF folder: the policy (policy role) or the backbone/RM folder (reward role)
    critic_path: str | None = None  # policy role: value-model init (RM folder or LM); None: no critic
    rl_total_steps: int = 1  # optimizer steps of the RL stage (the linear LR decay's horizon)
    critic_affine: tuple[float, float] | None = None  # (shift, scale) folded into the critic's head
    autocast: bool = False  # bf16 autocast forwards: the group's one decision (precision.decide_autocast)


@dataclass(frozen=True)
class FitPlan:
    """A window [start_step, start_step + num_steps) of one supervised fit (SFT or RM)."""

    lr: float
    total_steps: int  # the whole fit's optimizer steps: the LR decays to 0 over them
    start_step: int
    num_steps: int
    steps_per_epoch: int
    schedule: str | None = None  # "constant" | "linear"; None: learner.lr_schedule


class LearnerWorker(RewardRoleCalls):
    def __init__(self, cfg: TidalConfig, rank: int, world_size: int, num_threads: int = 0, forward_threads: int = 0):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        apply_threads(num_threads)  # tidal.actors.threads
        self.forward_threads = forward_threads  # while computing beside the reference worker (ThreadPlan)
        self.seed = cfg.seed + rank  # a different stream per data-parallel rank (docs/implementation.md#d10)
        self.use_gpu = cfg.learner.gpus_per_worker > 0
        self._device = enter_device(self.use_gpu, f"learner rank {rank}")  # the plan's device (tidal.actors.devices)
        self.spec: WorkerSpec | None = None
        self.engine = None  # policy LM (policy role) or value model (reward role)
        self.critic = None
        self.tokenizer = None
        self.rl_steps = 0  # optimizer steps taken by update_rl (drives the RL LR schedule)
        self.rl_updates = 0  # update_rl calls (seeds each call's shuffling)
        self.weights_out = PolicyWeightsOut(self)  # the weight push to the rollout workers
        self.checkpoint_loads = 0  # they change the weights without an optimizer step (PolicyWeightsOut.stamp)
        self.autocast = False  # set by setup from WorkerSpec.autocast: decided by the group, not by this rank
        self.lora = spec_from_config(cfg)  # LoRA adapters (tidal.common.lora), None: full fine-tuning

    # ------------------------------------------------------------------ setup

    def bf16_native(self) -> bool:
        """Whether this rank's device multiplies bf16 in hardware (the group's autocast decision asks)."""
        return bf16_native(self.device)

    def master_address(self) -> tuple[str, int]:
        """(address, free port) of this rank's node: rank 0's answer is everyone's rendezvous."""
        try:
            import ray

            addr = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        except ImportError:  # pragma: no cover
            addr = "127.0.0.1"
        return addr, free_port()

    def setup(self, spec: WorkerSpec, master_addr: str, master_port: int) -> dict[str, float]:
        """Join the process group and build the engines. Returns timings in seconds."""
        if spec.role not in ROLES:
            raise ValueError(f"unknown learner role {spec.role!r}; expected one of {ROLES}")
        t0 = time.perf_counter()
        init_distributed(self.rank, self.world_size, master_addr, master_port, self.use_gpu)
        t1 = time.perf_counter()
        seed_everything(self.seed)
        from tidal.common.models import load_tokenizer

        self.spec, self.autocast = spec, spec.autocast
        self.tokenizer = load_tokenizer(spec.model_path)
        cfg, lc, n = self.cfg, self.cfg.learner, self.world_size
        if spec.role == "policy":
            self.engine = make_engine(cfg, build_policy(cfg, spec.model_path, n), lc.lr, n)
            if spec.critic_path is not None:
                self.critic = make_engine(cfg, build_value(cfg, spec.critic_path, n, spec.critic_affine), lc.critic_lr, n)
        else:
            self.engine = make_engine(cfg, build_value(cfg, spec.model_path, n), lc.lr, n)
        return {"dist_init_s": t1 - t0, "engines_s": time.perf_counter() - t1, "autocast_bf16": float(self.autocast)}

    @property
    def device(self) -> torch.device:
        return self._device

    def release_cached_memory(self) -> None:
        """Hand the GPU memory the caching allocator keeps after an update back to the device: a
        colocated vLLM engine wakes into it for the next generation (rollout.sleep)."""
        if self.use_gpu:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ forward passes

    def policy_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                        temperature: float, entropy: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, P+R) inputs -> logprobs (B, R) of the response tokens under logits / temperature
        (tidal.common.models.sequence_logprobs, as the reference worker computes them), and their
        entropy (B, R): entropy="loss" with gradient, "metric" without (no (B, R, V) graph kept
        alive), None not computed."""
        self._need(self.spec.role == "policy", "policy_logprobs", "a policy learner")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        t = temperature if temperature > 0 else 1.0  # greedy rollouts: plain softmax logprobs
        with autocast(self.autocast, self.device):
            if entropy is None:
                return sequence_logprobs(self.engine, input_ids, attention_mask, response_len, t), None
            logits = response_logits(self.engine, input_ids, attention_mask, response_len)  # (B, R, V)
        return logprobs_and_entropy(logits, input_ids[:, -response_len:], t, entropy_grad=entropy == "loss")

    def critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """(B, P+R) -> (B, R): column t is V(state before response token t), read at position P+t-1."""
        self._need(self.critic is not None, "critic_values", "a critic (critic_path)")
        with autocast(self.autocast, self.device):
            values = self.critic(input_ids.to(self.device), attention_mask.to(self.device)).float()  # (B, P+R)
        start = values.shape[1] - response_len - 1
        return values[:, start:start + response_len]

    def reward_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) -> (N,) value-head output at each row's last real token (docs/implementation.md#d1)."""
        self._need(self.spec.role == "reward", "reward_scores", "a reward learner")
        attention_mask = attention_mask.to(self.device)
        with autocast(self.autocast, self.device):
            values = self.engine(input_ids.to(self.device), attention_mask).float()  # (N, T)
        positions = torch.arange(attention_mask.shape[1], device=self.device)
        last = (attention_mask.long() * positions).argmax(-1)  # (N,)
        return values.gather(1, last[:, None]).squeeze(1)

    def _need(self, ok: bool, method: str, what: str) -> None:
        if not ok:
            role = self.spec.role if self.spec else "not set up"
            raise RuntimeError(f"{method} needs {what}; this learner is role={role!r}, critic={self.critic is not None}")

    def _micro(self, n: int) -> list[slice]:
        m = self.cfg.learner.micro_batch_size
        return [slice(i, min(i + m, n)) for i in range(0, n, m)]

    @torch.no_grad()
    def compute_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                         temperature: float) -> torch.Tensor:
        """Policy logprobs (B, R) of this rank's shard, in micro-batches."""
        with threads_during(self.forward_threads):
            return torch.cat([self.policy_logprobs(input_ids[s], attention_mask[s], response_len, temperature)[0].float().cpu()
                              for s in self._micro(len(input_ids))])

    @torch.no_grad()
    def compute_ref_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                             temperature: float) -> torch.Tensor:
        """The frozen reference's logprobs (B, R) as the policy's base with its LoRA adapters off
        (tidal.learner.lora.base_logprobs): no reference worker, no second model."""
        from tidal.learner.lora import base_logprobs

        return base_logprobs(self.engine.module,
                             lambda: self.compute_logprobs(input_ids, attention_mask, response_len, temperature))

    @torch.no_grad()
    def compute_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """Critic values (B, R) of this rank's shard."""
        with threads_during(self.forward_threads):
            return torch.cat([self.critic_values(input_ids[s], attention_mask[s], response_len).float().cpu()
                              for s in self._micro(len(input_ids))])

    @torch.no_grad()
    def compute_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model scores (N,) of this rank's shard."""
        return torch.cat([self.reward_scores(input_ids[s], attention_mask[s]).float().cpu()
                          for s in self._micro(len(input_ids))])

    # ------------------------------------------------------------------ training

    @property
    def mini_per_rank(self) -> int:
        return self.cfg.learner.mini_batch_size // self.world_size

    def set_lr(self, engine, lr: float) -> None:
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

    def run_step(self, micro_batches: list, loss_fn: Callable) -> dict[str, float]:
        """One optimizer step of the main engine over `micro_batches` (DeepSpeed accumulates the
        gradient-accumulation count of micro-batches and steps at the boundary). Each micro-batch's
        loss is a mean over its tokens (SFT: a response_mask) or over its weighted pairs/prompts
        (DPO, RM: `loss_mass`, their total weight); token_scale makes the step's loss that mean
        over the whole minibatch, across micro-batches and ranks, however it is split."""
        sums: dict[str, float] = {}
        counts = [mb.loss_mass if hasattr(mb, "loss_mass") else mb.response_mask.sum().item() for mb in micro_batches]
        total = self.global_sum(sum(counts))
        for mb, count in zip(micro_batches, counts):
            loss, metrics = loss_fn(mb)
            scale = self.token_scale(count, total, len(micro_batches))
            loss = loss * scale
            metrics = {k: v * scale if k.startswith("losses/") else v for k, v in metrics.items()}
            self.engine.backward(loss)
            self.engine.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / len(micro_batches) for k, v in sums.items()}

    def epoch_order(self, n: int, epoch: int, salt: int = 0) -> torch.Tensor:
        """This rank's shuffled row order for `epoch`: a pure function of (seed + rank, salt, epoch),
        so a fit can be split over several calls or resumed and still see the same order."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + salt) * 1_009 + epoch)
        return torch.randperm(n, generator=gen)

    def fit(self, data, plan: FitPlan, loss_fn: Callable) -> list[dict[str, float]]:
        """Optimizer steps plan.start_step .. +num_steps over this rank's shard `data` (anything
        with __len__ and select(idx)). Returns per-step metrics averaged over ranks."""
        mini, m = self.mini_per_rank, self.cfg.learner.micro_batch_size
        if len(data) < mini:
            raise ValueError(f"rank {self.rank} holds {len(data)} examples but one optimizer step needs "
                             f"{mini} per rank (learner.mini_batch_size / num_workers); use more data or a smaller mini_batch_size")
        history = []
        for step in range(plan.start_step, plan.start_step + plan.num_steps):
            epoch, k = divmod(step, plan.steps_per_epoch)
            rows = self.epoch_order(len(data), epoch)[k * mini:(k + 1) * mini]
            lr = linear_lr(plan.lr, step, plan.total_steps, plan.schedule or self.cfg.learner.lr_schedule)
            self.set_lr(self.engine, lr)
            metrics = self.run_step([data.select(rows[i:i + m]) for i in range(0, mini, m)], loss_fn)
            history.append({**self.all_reduce_mean(metrics), "lr": lr, "step": float(step + 1), "epoch": float(epoch)})
        self.release_cached_memory()
        return history

    def fit_sft(self, data, plan: FitPlan) -> list[dict[str, float]]:
        from tidal.learner.sft import sft_micro_loss

        self._need(self.spec.role == "policy", "fit_sft", "a policy learner")
        return self.fit(data, plan, lambda mb: sft_micro_loss(self, mb))

    def fit_reward(self, data, plan: FitPlan, loss: str) -> list[dict[str, float]]:
        from tidal.learner.reward_model import reward_micro_loss

        self._need(self.spec.role == "reward", "fit_reward", "a reward learner")
        return self.fit(data, plan, lambda mb: reward_micro_loss(self, mb, loss))

    def fit_dpo(self, data, plan: FitPlan, beta: float, loss: str, label_smoothing: float) -> list[dict[str, float]]:
        """DPO/IPO steps on this rank's shard of a DPOBatch carrying reference log-probs;
        mini/micro-batch sizes count pairs (each pair = its chosen and its rejected row)."""
        from tidal.learner.dpo import dpo_batch_loss

        self._need(self.spec.role == "policy", "fit_dpo", "a policy learner")

        def micro_loss(mb):
            logprobs, _ = self.policy_logprobs(mb.input_ids, mb.attention_mask, mb.response_len, 1.0)
            return dpo_batch_loss(logprobs, mb, beta, loss, label_smoothing)

        return self.fit(data, plan, micro_loss)

    def update_rl(self, experience, ptx, correction=None):
        from tidal.learner.rl import rl_update

        self._need(self.spec.role == "policy", "update_rl", "a policy learner")
        result = rl_update(self, experience, ptx, correction)  # an UpdateResult; the counters move here only
        self.rl_steps += result.optimizer_steps
        self.rl_updates += 1
        self.release_cached_memory()
        return result

    def global_sum(self, x: float) -> float:
        """x summed over the ranks (one small collective; every rank must call it)."""
        if self.world_size == 1:
            return float(x)
        import torch.distributed as dist

        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def token_scale(self, micro_tokens: float, total_tokens: float, num_micro: int) -> float:
        """Factor turning a micro-batch's token-mean (or weighted-mean) loss into its share of the
        minibatch's mean over all ranks: micro_tokens / total_tokens (tokens, or weights), times
        the micro-batch count and the world size that DeepSpeed divides the gradients by. Weights
        may total less than 1 (pairs of K-wise rankings weigh 1 / C(K, 2)): no floor at 1."""
        return micro_tokens * num_micro * self.world_size / total_tokens if total_tokens > 0 else 0.0

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average each metric over ranks (every rank must pass the same keys)."""
        if self.world_size == 1 or not metrics:
            return dict(metrics)
        import torch.distributed as dist

        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    # ------------------------------------------------------------------ weights out, checkpoints

    def iter_named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, CPU tensor) of the policy: LoRA merged, ZeRO-3 gathered. Rank 0 gets every
        tensor; the other ranks get nothing but MUST exhaust the iterator too (the gathers are
        collective)."""
        from tidal.learner.export import iter_named_weights

        self._need(self.spec.role == "policy", "iter_named_weights", "a policy learner")
        return iter_named_weights(self.engine.module, keep=self.rank == 0)

    # the weight push (tidal.learner.weights_out): Ray calls these on the actor
    def export_weights(self, version: int, bucket_mb: float, transport=None):
        """Publish the policy as `version`; rank 0 returns the WeightHandle (PolicyWeightsOut.export)."""
        return self.weights_out.export(version, bucket_mb, transport)

    def join_weight_sender(self, spec) -> None:
        self.weights_out.join_collective(spec)

    def send_weights(self, handle) -> int:
        return self.weights_out.send_collective(handle)

    def ipc_open(self, handle) -> None:
        self.weights_out.ipc_open(handle)

    def ipc_next(self):
        return self.weights_out.ipc.next()

    def ipc_close(self) -> None:
        self.weights_out.ipc.close()

    def save_pretrained(self, out_dir: str, extra: dict | None = None) -> str | None:
        """HF folder with the tokenizer, written by rank 0: the merged policy, or for the reward
        role a value-model folder (save_value_model) carrying `extra` (e.g. reward_mean/std)."""
        from tidal.learner.export import save_policy, save_reward_model

        if self.spec.role == "policy":
            if self.lora is not None:  # the adapter alone too, beside the merged model (tidal.learner.lora)
                from tidal.learner.lora import save_adapter

                save_adapter(self.engine.module, f"{out_dir}_adapter", self.lora, self.spec.model_path, self.rank == 0)
            return save_policy(self.engine.module, out_dir, self.tokenizer, keep=self.rank == 0)
        return save_reward_model(self.engine.module, out_dir, self.tokenizer, extra, keep=self.rank == 0)

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """Engines (weights, optimizer, ZeRO partitions), counters and this rank's RNG states."""
        from tidal.learner.export import save_rng_state

        d = Path(ckpt_dir)
        client = {"rl_steps": self.rl_steps, "rl_updates": self.rl_updates}
        self.engine.save_checkpoint(str(d / "model"), tag=CKPT_TAG, client_state=client)
        if self.critic is not None:
            self.critic.save_checkpoint(str(d / "critic"), tag=CKPT_TAG)
        save_rng_state(d / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, ckpt_dir: str) -> None:
        from tidal.learner.export import load_rng_state

        self.checkpoint_loads += 1
        d = Path(ckpt_dir)
        for name, engine in (("model", self.engine), ("critic", self.critic)):
            if engine is None:
                continue
            path, client = engine.load_checkpoint(str(d / name), tag=CKPT_TAG)
            if path is None:
                raise FileNotFoundError(f"no {name} checkpoint under {d / name} (tag {CKPT_TAG!r}); "
                                        "was it written by LearnerGroup.checkpoint with the same roles?")
            if name == "model":
                self.rl_steps, self.rl_updates = client["rl_steps"], client["rl_updates"]
        load_rng_state(d / f"rng_rank{self.rank}.pt")

    def parameter_snapshot(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Full copies of the main engine's raw parameters on every rank (tidal.learner.probes)."""
        from tidal.learner.probes import parameter_snapshot

        return parameter_snapshot(self, trainable_only)

    def describe(self) -> dict:
        """Facts tests and logs check: seeds, dropout, parameter counts (tidal.learner.probes)."""
        from tidal.learner.probes import describe

        return describe(self)
