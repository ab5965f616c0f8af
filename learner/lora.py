"""The learner's side of LoRA that pays (learner.lora_rank > 0, docs/rollout.md#lora):

* the frozen reference is the policy's own base with its adapters switched off (peft's
  `disable_adapter`), computed by the learner ranks: no second model in memory, and exact - the
  base weights never train (tests/test_learner_lora.py compares it with a separate reference copy);
* the weight push carries the adapter matrices only, under peft's names (tidal.common.lora), so a
  sync moves megabytes instead of the whole model;
* the adapter is exported on its own (an adapter folder `PeftModel.from_pretrained` loads on the
  base) beside the merged model.

Under ZeRO-3 every LoRA layer's two matrices are gathered on all ranks (a collective), rank 0 keeps
a copy; the frozen base weights are never gathered for the push.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from tidal.common.lora import PEFT_PREFIX, LoraSpec, write_adapter


def uses_own_base(lora_rank: int, policy_path: str | Path, reference_path: str | Path | None) -> bool:
    """Whether the reference can be the policy's base with the adapters off: LoRA, and the
    reference is the very model the adapters sit on (the RL stage's initial policy). A second RL
    round anchored to an earlier model keeps its reference worker."""
    if lora_rank <= 0 or reference_path is None:
        return False
    return Path(reference_path).resolve() == Path(policy_path).resolve()


def iter_adapter_weights(model: nn.Module, keep: bool, to_cpu: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(peft name, copy: on the CPU, or on the parameters' device) of every LoRA matrix of the active adapter: `base_model.model.<module>.
    lora_A.weight` (r, in) and `.lora_B.weight` (out, r). Every rank must exhaust it (ZeRO-3
    gathers per layer); only `keep` (rank 0) gets tensors."""
    from tidal.learner.export import _gathered, _is_lora_layer, unwrap_hf

    hf = unwrap_hf(model)
    for name, module in hf.named_modules():
        if not _is_lora_layer(module):
            continue
        adapter = next(a for a in module.active_adapters if a in module.lora_A)
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        with _gathered([a, b]):
            if keep:
                for part, t in (("A", a), ("B", b)):
                    t = t.data.detach().clone()
                    yield f"{PEFT_PREFIX}{name}.lora_{part}.weight", t.cpu() if to_cpu else t


def save_adapter(model: nn.Module, out_dir: str | Path, spec: LoraSpec, base_model: str, keep: bool) -> str | None:
    """The adapter alone as a peft folder on `base_model`; every rank calls it, rank 0 writes."""
    adapter = dict(iter_adapter_weights(model, keep))
    return str(write_adapter(out_dir, adapter, spec, base_model)) if keep else None


def base_logprobs(model: nn.Module, compute) -> torch.Tensor:
    """`compute()` (the rank's log-prob forward passes) with every adapter off: the base model's
    log-probs, i.e. the frozen reference's (the base never trains)."""
    from tidal.learner.export import unwrap_hf

    peft_model = model if hasattr(model, "disable_adapter") else None
    if peft_model is None:
        raise RuntimeError(f"{type(unwrap_hf(model)).__name__} has no LoRA adapters to switch off; "
                           "the reference needs its own worker (reference_path)")
    with peft_model.disable_adapter():
        return compute()
