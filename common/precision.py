"""bf16 autocast for float32 models (learner.autocast).

With `learner.autocast` the learner ranks' and the reference worker's forward passes run under
`torch.autocast(dtype=bfloat16)`: matrix multiplies in bf16, weights, gradients, the loss's
log-softmax and AdamW's state in float32. Backward follows the forward's dtypes by itself.
It pays only where the hardware multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with
AVX512-BF16 or AMX (docs/performance.md: forward+backward 2.3x faster on the 2-core test
machine's AVX512-BF16 cores). Elsewhere bf16 is emulated and slower, so `auto` leaves it off there.
The decision is taken once per LearnerGroup (`decide_autocast`) and handed to every rank and to
the reference worker as a plain bool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from typing import ContextManager

import torch

log = logging.getLogger("tidal.precision")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # model.dtype's names


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a model.dtype name: the one map for every model a role loads."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def bf16_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def decide_autocast(setting: str, model_dtype: torch.dtype, native: Sequence[bool]) -> bool:
    """learner.autocast ("none" | "bf16" | "auto") decided once for processes that must agree: a
    group's learner ranks and its reference worker. `native`: each rank's `bf16_native` answer.
    auto: bf16 only if every rank multiplies bf16 natively. Every process is told the result and
    obeys it whatever its own hardware says: deciding per process let a learner and its reference
    run different precisions on mixed hardware, and the KL to the reference then did not start at 0.
    A bfloat16 model is bf16 already (the config refuses autocast with it)."""
    if setting == "none" or model_dtype != torch.float32:
        return False
    if setting == "bf16":
        if not all(native):
            log.warning("learner.autocast=bf16 on a device without native bf16 math: bf16 is emulated and may be "
                        "slower than float32; learner.autocast=auto turns it on only where it is native")
        return True
    return bool(native) and all(native)


def autocast(enabled: bool, device: torch.device) -> ContextManager:
    """The forward-pass context: bf16 autocast on `device`, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()
