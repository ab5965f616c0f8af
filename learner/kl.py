"""KL between the policy and the frozen reference: per-token estimators and the coefficient
controllers that weight the KL penalty in the reward (docs/implementation.md#d5).

Estimators follow John Schulman, "Approximating KL Divergence" (2020). With tokens sampled from
the policy p and the reference q, each estimates KL(p || q) per token:
    k1 = log p - log q                     unbiased, high variance, can be negative
    k2 = 0.5 * (log p - log q)^2           biased, low variance, >= 0
    k3 = (r - 1) - log r,  r = q / p       unbiased, low variance, >= 0
"""

from __future__ import annotations

from typing import Callable

import torch


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs  # (B, T)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2  # (B, T)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_r = ref_logprobs - logprobs  # (B, T) log(q / p)
    return (log_r.exp() - 1.0) - log_r  # (B, T); x - 1 >= log x, so never negative


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate. (B, T), (B, T) -> (B, T).
    Padded positions hold whatever their inputs give; consumers mask them."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)


class FixedKLController:
    """A constant KL coefficient beta. `update` is a no-op so the trainer treats both alike."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive beta (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences"): steer the measured KL toward `target` with a proportional controller.

        proportional_error = clip(current_kl / target - 1, -0.2, 0.2)
        beta *= 1 + proportional_error * n_steps / horizon

    The clip bounds how fast beta can move on one noisy KL measurement; n_steps is the number
    of samples (or steps) the measurement covers, so the rate is per sample, not per call.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL needs init_kl_coef >= 0, target > 0, horizon > 0; got "
                f"init_kl_coef={init_kl_coef}, target={target}, horizon={horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.value = float(d["value"])


KLController = FixedKLController | AdaptiveKLController
