"""The memory arithmetic of a GPU run: what each GPU holds before activations, checked before Ray starts.

Per placement bundle (tidal.actors.placement: what lands on one GPU), in GB:

* a learner rank: its trainable models' weights, gradients and AdamW states. Mixed-precision Adam
  holds 16 bytes per parameter (2 weights + 2 gradients + 12 for the fp32 master copy and the two
  moments; float32 weights: 4 + 4 + 8), ZeRO's accounting (Rajbhandari et al. 2020, "ZeRO: Memory
  Optimizations Toward Training Trillion Parameter Models"): stage 1 divides the optimizer states
  by the ranks, stage 2 the gradients too, stage 3 the weights too; learner.offload moves the
  optimizer states to host memory; LoRA trains adapters only (the frozen base: weights alone).
  PPO's critic is a second such model in the same rank.
* the reference worker and each reward-model worker: their weights.
* a vLLM engine: colocated, its whole share rollout.gpu_memory_utilization x the GPU (while it
  sleeps the learners may use that share for activations, but it must be free again when it wakes);
  alone on its GPUs, the check is that its weights leave room for a KV cache in its share.

Activations come on top and depend on the batch; a plan that needs more than the GPU before them
cannot run, which is what `check_gpu_memory` refuses (one line naming the bundle and the fixes).
Model sizes are parameter counts the caller knows (config.json of a folder, `count_params`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tidal.actors.placement import plan_placement, role_counts
from tidal.common.config import ConfigError, TidalConfig

GB = 1e9


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of the models a run loads (None: not loaded, or not known)."""

    policy: int | None
    critic: int | None = None  # PPO's value model in the learner ranks
    reward: int | None = None  # each reward-model worker's model


def count_params(config: dict) -> int | None:
    """Parameters of a decoder-only transformer from its HF config.json (the llama/qwen/mistral layout:
    attention with grouped KV heads, a gated MLP, an input embedding and an output head unless tied).
    None when the config lacks the fields."""
    config = config.get("text_config", config)
    try:
        h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        inter = config.get("intermediate_size", 4 * h)
        heads = config.get("num_attention_heads", 1)
        kv = config.get("num_key_value_heads", heads)
    except KeyError:
        return None
    head_dim = config.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q, o and k, v projections
    per_layer = attention + 3 * h * inter + 2 * h  # gate/up/down and two norms
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings + h


def dtype_bytes(cfg: TidalConfig) -> int:
    return 2 if cfg.model.dtype == "bfloat16" else 4


def trainable_bytes(cfg: TidalConfig, params: int) -> float:
    """Bytes one learner rank holds for a trainable model of `params` parameters (module docstring)."""
    lc, w = cfg.learner, dtype_bytes(cfg)
    if lc.lora_rank > 0:
        return params * w  # the adapters are a rounding error next to the frozen base
    grads, optim = float(w), 12.0 if w == 2 else 8.0
    if lc.offload and lc.zero_stage > 0:
        optim = 0.0
    n, stage = lc.num_workers, lc.zero_stage
    per_param = {0: w + grads + optim, 1: w + grads + optim / n, 2: w + (grads + optim) / n,
                 3: (w + grads + optim) / n}[stage]
    return params * per_param


def actor_gb(cfg: TidalConfig, role: str, sizes: ModelSizes) -> tuple[float, str]:
    """GB one actor of `role` holds on its GPU, and what it is."""
    w, policy = dtype_bytes(cfg), sizes.policy or 0
    if role == "learner":
        gb = (trainable_bytes(cfg, policy) + (trainable_bytes(cfg, sizes.critic) if sizes.critic else 0.0)) / GB
        return gb, f"learner rank {gb:.1f} GB (weights, gradients, optimizer states{' + critic' if sizes.critic else ''}, ZeRO-{cfg.learner.zero_stage})"
    if role == "reference":
        return policy * w / GB, f"reference {policy * w / GB:.1f} GB"
    if role == "reward":
        return (sizes.reward or 0) * w / GB, f"reward model {(sizes.reward or 0) * w / GB:.1f} GB"
    share = cfg.rollout.gpu_memory_utilization or 0.0
    gb = share * cfg.cluster.gpu_memory_gb
    return gb, f"vLLM {gb:.1f} GB (rollout.gpu_memory_utilization {share} x {cfg.cluster.gpu_memory_gb:g})"


def bundle_needs(cfg: TidalConfig, sizes: ModelSizes) -> list[tuple[str, float, float, list[str]]]:
    """(bundle name, GB needed, GB there, what holds it) of every GPU bundle of the run's placement."""
    plan = plan_placement(cfg, role_counts(cfg, reference=True, reward_model=sizes.reward is not None))
    members: dict[tuple[str, int], list[str]] = {}
    for role, slots in plan.slots.items():
        for slot in slots:
            if slot.num_gpus > 0:
                members.setdefault((slot.group, slot.bundle_index), []).append(role)
    out = []
    for (group, index), roles in sorted(members.items()):
        gpus = plan.groups[group][index].get("GPU", 0.0)
        if group.startswith("rollout-"):  # an engine alone: its weights must leave room for a KV cache
            continue
        parts = [actor_gb(cfg, role, sizes) for role in roles]
        out.append((f"{group}[{index}]", sum(gb for gb, _ in parts), gpus * cfg.cluster.gpu_memory_gb,
                    [what for _, what in parts]))
    return out


def check_gpu_memory(cfg: TidalConfig, sizes: ModelSizes) -> None:
    """Refuse a plan whose GPUs cannot hold their share before activations (ConfigError, one line)."""
    if sizes.policy is None:
        return
    for name, need, have, parts in bundle_needs(cfg, sizes):
        if need > have:
            raise ConfigError(
                f"cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g}: GPU bundle {name} needs about {need:.1f} GB before "
                f"activations ({'; '.join(parts)}), more than its {have:.0f} GB; lower rollout.gpu_memory_utilization, "
                f"raise learner.zero_stage or learner.num_workers, set learner.offload=true, or use a smaller model.")
    r = cfg.rollout
    if r.gpus_per_worker > 0 and cfg.cluster.placement == "disaggregated":
        weights = sizes.policy * dtype_bytes(cfg) / r.tensor_parallel_size / GB
        share = (r.gpu_memory_utilization or 0.0) * cfg.cluster.gpu_memory_gb
        if weights >= share:
            raise ConfigError(
                f"rollout.gpu_memory_utilization={r.gpu_memory_utilization}: each engine GPU holds {weights:.1f} GB of "
                f"weights (tensor parallel {r.tensor_parallel_size}), no less than its {share:.1f} GB share of "
                f"cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g}, which leaves no KV cache; raise "
                f"rollout.gpu_memory_utilization or rollout.tensor_parallel_size (with rollout.gpus_per_worker).")
