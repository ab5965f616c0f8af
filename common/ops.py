"""Pure-torch tensor ops shared by the learner, the reward service and tests.

No ray / vllm / deepspeed imports here: these run anywhere and are tested against loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask == 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over masked positions (Bessel-corrected unless `unbiased=False`)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalize x to unit variance (and zero mean) using only masked positions; padding
    must not leak into the statistics (docs/implementation.md#d7). Padded positions come back 0."""
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) over the last dim, in fp32. The upcast comes before the
    division: bf16 logits divided in bf16 round every quotient to 8 mantissa bits, which cost
    0.006-0.023 nats per token against the float32 quotient."""
    x = logits.float()
    if temperature != 1.0:
        # a fresh float32 copy (bf16 input) is divided in place: one (..., V) tensor, not two
        x = x / temperature if x is logits else x.div_(temperature)
    return F.log_softmax(x, dim=-1)


def _gather(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels) under softmax(logits / temperature). logits (..., V), labels (...) -> (...).

    Dividing by the sampling temperature is what makes trainer logprobs match the rollout
    engine's (docs/implementation.md#d3)."""
    return _gather(_log_softmax(logits, temperature), labels)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the last dim. (..., V) -> (...)."""
    return _entropy(_log_softmax(logits, temperature))


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs_from_logits and entropy_from_logits from one log-softmax over the vocabulary
    (the costliest op of the loss at a 49k vocabulary). entropy_grad=False: the entropy is a
    metric, computed without gradient."""
    logp = _log_softmax(logits, temperature)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = _entropy(logp)
    return _gather(logp, labels), entropy


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of each (left-padded) row, so a
    forward pass does not change with the amount of padding (docs/implementation.md#d2). (B, T)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)
