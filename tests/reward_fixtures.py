"""Helpers shared by the reward tests (tests/ is on sys.path under pytest), plus user reward
functions that the tests load by import path 'reward_fixtures:NAME'."""

from __future__ import annotations

from pathlib import Path

import torch

from tidal.common.types import RolloutBatch


def make_reward_model(base: Path, out_dir: Path, seed: int = 0, extra: dict | None = None) -> Path:
    """A reward-model folder: the tiny backbone with a seeded value head, tokenizer and metadata."""
    from tidal.common.models import load_tokenizer, load_value_model, save_value_model

    torch.manual_seed(seed)
    model = load_value_model(base)  # fresh head drawn from the seeded RNG
    return save_value_model(model, out_dir, extra=extra, tokenizer=load_tokenizer(base))


def make_rollout(prompts: list[str], completions: list[str], finish: list[str] | None = None,
                 references: list[str | None] | None = None, tokenizer=None) -> RolloutBatch:
    """A RolloutBatch as the rollout pool would produce it (ids from `tokenizer` when given)."""
    n = len(prompts)
    if tokenizer is not None:
        prompt_ids = tokenizer(prompts)["input_ids"] if n else []
        response_ids = tokenizer(completions, add_special_tokens=False)["input_ids"] if n else []
    else:
        prompt_ids = [[1] * max(1, len(p.split())) for p in prompts]
        response_ids = [[1] * len(c.split()) for c in completions]
    return RolloutBatch(
        prompt_index=list(range(n)), prompt_text=list(prompts), prompt_ids=[list(x) for x in prompt_ids],
        response_text=list(completions), response_ids=[list(x) for x in response_ids],
        response_logprobs=[[0.0] * len(r) for r in response_ids],
        finish_reason=finish if finish is not None else ["stop"] * n,
        weight_version=[0] * n, reference=references if references is not None else [],
    )


# ---------------------------------------------------------------- user reward functions

def shout(prompts, completions, **meta):
    """Fraction of upper-case letters in the completion."""
    return [sum(c.isupper() for c in s) / max(1, sum(c.isalpha() for c in s)) for s in completions]


def constant(value):
    """A reward function that gives `value` for every sample (value may be nan/inf)."""
    def fn(prompts, completions, **meta):
        return [value] * len(completions)
    return fn


def nan_on_marker(prompts, completions, **meta):
    """NaN for completions containing 'NAN', +inf for 'INF', else 1.0."""
    return [float("nan") if "NAN" in c else float("inf") if "INF" in c else 1.0 for c in completions]


def one_too_few(prompts, completions, **meta):
    return [0.0] * (len(completions) - 1)


def strings(prompts, completions, **meta):
    return ["high"] * len(completions)


def completion_length(prompts, completions, **meta):
    """Characters in the completion (to see exactly what text a rule received)."""
    return [float(len(c)) for c in completions]


NOT_CALLABLE = 42


def as_number(prompts, completions, **meta):
    """The completion read as a number: lets a test dictate every score."""
    return [float(c) for c in completions]


def saw_replacement_char(prompts, completions, **meta):
    """1.0 where the completion holds U+FFFD (what cleaning makes of undecodable bytes)."""
    return [float("\ufffd" in c) for c in completions]
