"""Held-out evaluation: the fixed prompts, the one evaluation seed, the gold judge and the raw
scores that the RL stage's before/after samples, the over-optimisation monitor and `tidal eval`
share."""

from __future__ import annotations

import dataclasses

from tidal.common.config import ConfigError, RewardConfig, RewardTerm, TidalConfig

EVAL_SEED = 20_231_108


def gold_term(spec: str) -> RewardTerm:
    """logging.gold_term 'KIND' or 'KIND:TARGET' (sentiment, length:8, function:mod:fn, model:FOLDER)."""
    kind, _, target = spec.partition(":")
    kinds = typing_args(RewardTerm, "kind")
    if kind not in kinds or kind == "remote":
        raise ConfigError(f"logging.gold_term={spec!r}: the kind must be one of "
                          f"{', '.join(k for k in kinds if k != 'remote')}, optionally with ':TARGET'.")
    return RewardTerm(kind=kind, target=target or None)


def typing_args(cls: type, name: str) -> tuple:
    import typing

    return typing.get_args(typing.get_type_hints(cls)[name])


def build_gold(cfg: TidalConfig, policy_tokenizer: str):
    """The gold judge: one reward term, raw (no normalisation), reward-model workers in-process."""
    from tidal.reward_service.combine import build_reward

    rc = RewardConfig(terms=(gold_term(cfg.logging.gold_term),), normalize="none", on_invalid="error")
    return build_reward(rc, policy_tokenizer=policy_tokenizer, local=True, dtype=cfg.model.dtype)


def raw_scores(reward, rollout) -> list[float]:
    """The weighted sum of a reward's terms before normalisation (what a table can compare)."""
    scored = reward.score(rollout, raw=True)
    return sum(t.weight * scored.terms[t.name] for t in reward.terms).float().tolist()


def eval_sampling(cfg: TidalConfig, n: int = 1):
    """rollout.* with the one fixed eval seed: every method answers with the same randomness."""
    from tidal.rollout.sampling import Sampling

    return dataclasses.replace(Sampling.from_config(cfg.rollout, EVAL_SEED), n=n)
