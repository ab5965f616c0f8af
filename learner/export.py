"""Weight export: the policy's weights under the plain HF parameter names a rollout engine (or
`AutoModelForCausalLM.from_pretrained`) loads, whatever wraps them in the trainer.

- ZeRO-3 partitions every parameter across ranks: each unit is gathered with
  `GatheredParameters(..., modifier_rank=None)` on ALL ranks (a collective), and only rank 0
  keeps a clone. Every rank must therefore run the same iteration to the end.
- LoRA (peft): each LoRA layer is exported as ONE merged weight, base + B @ A * scaling, under
  the base layer's name; the adapter matrices themselves are not exported.
- Tied weights (lm_head shares the embedding): exported once, under the first name
  (`model.embed_tokens.weight`), exactly as HF's loader expects for a tied model.

Also here: the HF folders written by `save_pretrained`, and the per-rank RNG state of checkpoints.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

SAFETENSORS_FILE = "model.safetensors"


def unwrap_hf(module: nn.Module) -> nn.Module:
    """The HF model inside a peft wrapper (LoRA layers stay injected in it), else the module."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return module
    return module.base_model.model if isinstance(module, PeftModel) else module


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, LoraLayer)


def _units(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, bool]]:
    """(name prefix, module, is_lora) for every module that owns tensors directly; a LoRA layer
    is one unit with all of its sub-parameters (they merge into one weight)."""
    if _is_lora_layer(module):
        yield prefix, module, True
        return
    if next(module.parameters(recurse=False), None) is not None or module._buffers:
        yield prefix, module, False
    for name, child in module.named_children():
        yield from _units(child, f"{prefix}{name}.")


def _gathered(params: list[nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _merged_lora(module: nn.Module) -> dict[str, torch.Tensor]:
    """{"weight": base + sum of active adapters' deltas, "bias": base bias} of a gathered LoRA layer."""
    base = module.get_base_layer()
    weight = base.weight.data.clone()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight += module.get_delta_weight(adapter).to(weight.dtype)
    out = {"weight": weight}
    if getattr(base, "bias", None) is not None:
        out["bias"] = base.bias.data.clone()
    return out


def iter_named_weights(model: nn.Module, keep: bool, to_cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every weight the plain HF model needs: copies, on the CPU, or with
    to_cpu=False on the parameters' own device (a streamed send packs them there). `keep=False`
    (ranks other than 0) still gathers each unit - the collective needs every rank - but yields nothing."""
    hf = unwrap_hf(model)
    seen: set[int] = set()  # tied parameters are exported once
    for prefix, module, is_lora in _units(hf):
        params = list(module.parameters(recurse=is_lora))
        with _gathered(params):
            if not keep:
                continue
            if is_lora:
                tensors = _merged_lora(module)
            else:
                tensors = {}
                for name, p in module.named_parameters(recurse=False):
                    if id(p) not in seen:
                        seen.add(id(p))
                        tensors[name] = p.data.detach().clone()
                for name, b in module.named_buffers(recurse=False):
                    if b is not None and name not in module._non_persistent_buffers_set:
                        tensors[name] = b.detach().clone()
            for name, t in tensors.items():
                yield prefix + name, (t.cpu() if to_cpu else t).contiguous()


def write_hf_folder(out_dir: str | Path, state: dict[str, torch.Tensor], hf_model: nn.Module, tokenizer) -> Path:
    """An HF folder (config, generation config, safetensors weights, tokenizer) that
    `AutoModelForCausalLM.from_pretrained` and vLLM load."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    hf_model.config.save_pretrained(out)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def save_policy(model: nn.Module, out_dir: str | Path, tokenizer, keep: bool) -> str | None:
    """Merged, gathered policy as an HF folder; every rank calls it, rank 0 (keep) writes."""
    state = dict(iter_named_weights(model, keep))
    return str(write_hf_folder(out_dir, state, unwrap_hf(model), tokenizer)) if keep else None


def save_reward_model(model: nn.Module, out_dir: str | Path, tokenizer, extra: dict | None, keep: bool) -> str | None:
    """A value-model folder (tidal.common.models.save_value_model) with `extra` metadata; every
    rank calls it (ZeRO-3 gather), rank 0 (keep) writes."""
    from tidal.common.models import save_value_model

    with _gathered(list(model.parameters())):
        if keep:
            save_value_model(model, out_dir, extra=extra, tokenizer=tokenizer)
    return str(out_dir) if keep else None


def save_rng_state(path: Path) -> None:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, path)


def load_rng_state(path: Path) -> None:
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
