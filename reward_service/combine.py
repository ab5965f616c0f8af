"""The configured reward: weighted sum of terms, then hygiene, normalization and clipping.

`build_reward(cfg.reward, ...)` returns a `CombinedReward`. For one RolloutBatch, `score`:
  1. cleans the text (lone surrogates from decoding invalid UTF-8 become U+FFFD),
  2. evaluates every term (rule functions in-process, model terms on a RewardPool, remote
     terms over HTTP), each giving (B,) values; wrong counts or non-numbers are errors,
  3. sums them with their weights,
  4. finds NaN/inf: `on_invalid=error` raises naming the sample and the term; `drop` marks
     the sample invalid (ScoredBatch.valid False, score 0) and counts it (reward/dropped),
  5. normalizes (`running` mean/std over all valid scores so far, or `reference`: the
     calibration from reference-policy samples, docs/implementation.md#d6), then clips to +-clip,
  6. gives `missing_eos_penalty` as the final score of samples that did not end with EOS
     (finish_reason != "stop", docs/implementation.md#d4).
ScoredBatch.terms keeps each term's raw values, NaN/inf included where `valid` is False (to
inspect, never to train on), and `raw_scores` their weighted sum of step 3 (0 where invalid);
`scores` is always finite. `last_metrics` holds the metrics of the
last `score` call (reward/mean, reward/dropped, reward/dropped_total, reward/missing_eos,
reward/term/<name>). Normalization state is in `state_dict()` so the driver can checkpoint it.
Not thread-safe: one caller at a time (the HTTP server serializes its requests).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tidal.common.config import ConfigError, RewardConfig, RewardTerm
from tidal.common.types import RolloutBatch, ScoredBatch
from tidal.reward_service.rules import RULES, load_function
from tidal.reward_service.sandbox import InProcessFunction, IsolatedFunction, RewardFunctionError
from tidal.reward_service.worker import RewardInput, RewardPool, tokenizer_fingerprint


class InvalidRewardError(RewardFunctionError):
    """A reward term gave NaN/inf (or the weighted sum overflowed) with on_invalid=error."""


def clean_text(text: str) -> str:
    """Text any tokenizer or JSON encoder accepts: lone surrogates (what decoding invalid
    UTF-8 with 'surrogateescape' leaves behind) become U+FFFD, one per undecodable byte."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the original bytes of \udc80-\udcff escapes
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # other lone surrogates
    return raw.decode("utf-8", "replace")


class ModelReward:
    """A `model` term with the rule signature: the RewardPool scores prompt + completion."""

    def __init__(self, pool: RewardPool, use_token_ids: bool):
        self.pool = pool
        self.use_token_ids = use_token_ids  # True only when the policy's tokenizer is the RM's

    def __call__(self, prompts: list[str], completions: list[str], **meta) -> list[float]:
        ids = meta.get("token_ids") if self.use_token_ids else None
        return self.pool.score(RewardInput(prompts, completions, ids, meta.get("ended"))).tolist()


@dataclass
class Term:
    name: str  # key in ScoredBatch.terms and in metrics (reward/term/<name>)
    weight: float
    target: str | None
    fn: Callable[..., list[float]]  # the rule signature: (prompts, completions, **meta)
    kind_rule: bool = False  # a built-in rule (sentiment, match, length)


@dataclass
class RunningStats:
    """Mean and variance of every valid score seen so far (Chan et al. parallel update)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        x = x.double()
        batch_mean, batch_m2 = x.mean().item(), ((x - x.mean()) ** 2).sum().item()
        delta, total = batch_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0


def _as_scores(name: str, values, n: int, prompt_index: list[int]) -> torch.Tensor:
    """(n,) float64 tensor of a term's output, or an error naming the term and the row."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise RewardFunctionError(f"reward term '{name}' returned {type(values).__name__} ({str(values)[:40]!r}) for "
                                  f"a batch of {n} samples; a reward returns a list of floats, one per sample.")
    values = list(values)
    if len(values) != n:
        raise RewardFunctionError(f"reward term '{name}' returned {len(values)} scores for {n} samples; it must return "
                                  f"one per sample.")
    for i, v in enumerate(values):
        if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):
            raise RewardFunctionError(f"reward term '{name}' returned {v!r} ({type(v).__name__}) for sample {i} "
                                      f"(prompt index {prompt_index[i]}); scores must be numbers.", i)
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


class CombinedReward:
    """Weighted sum of reward terms with hygiene and normalization (see module doc)."""

    def __init__(self, cfg: RewardConfig, terms: list[Term]):
        self.cfg = cfg
        self.terms = terms
        self.running = RunningStats()
        self.reference: tuple[float, float] | None = None  # (mean, std) from calibrate()
        self.dropped_total = 0
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ scoring

    def score(self, rollout: RolloutBatch, raw: bool = False) -> ScoredBatch:
        """Scores of a rollout. raw=True: the weighted sum only (valid rows; no normalization,
        clipping or EOS penalty), e.g. reference-policy samples for `calibrate`."""
        n = len(rollout)
        _check_rollout(rollout)
        references = list(rollout.reference) if rollout.reference else [None] * n
        meta = {
            "references": [None if r is None else clean_text(r) for r in references],
            "response_lengths": [len(r) for r in rollout.response_ids],
            "token_ids": [list(p) + list(r) for p, r in zip(rollout.prompt_ids, rollout.response_ids)],
            "ended": [f == "stop" for f in rollout.finish_reason],
        }
        prompts = [clean_text(t) for t in rollout.prompt_text]
        completions = [clean_text(t) for t in rollout.response_text]
        terms, total = self._evaluate(prompts, completions, meta, list(rollout.prompt_index))
        valid = self._check_finite(terms, total, rollout.prompt_index)
        scores = torch.where(valid, total, torch.zeros_like(total))  # (B,)
        no_eos = torch.tensor([f != "stop" for f in rollout.finish_reason], dtype=torch.bool)
        if not raw:
            scores = self._normalize(scores, valid)
            if self.cfg.clip is not None:
                scores = scores.clamp(-self.cfg.clip, self.cfg.clip)
            if self.cfg.missing_eos_penalty is not None:
                scores = torch.where(no_eos & valid, torch.full_like(scores, self.cfg.missing_eos_penalty), scores)
        self._record_metrics(terms, scores, valid, no_eos)
        return ScoredBatch(rollout=rollout, scores=scores.float(), terms={k: v.float() for k, v in terms.items()},
                           valid=valid, raw_scores=torch.where(valid, total, torch.zeros_like(total)).float())

    def score_texts(self, prompts: list[str], completions: list[str],
                    references: list[str | None] | None = None) -> list[float]:
        """Weighted sum of the terms for bare text (the HTTP server's path); any NaN/inf is an error."""
        if len(prompts) != len(completions) or (references is not None and len(references) != len(prompts)):
            raise ValueError(f"prompts ({len(prompts)}), completions ({len(completions)}) and references "
                             f"({'-' if references is None else len(references)}) must have the same length.")
        meta = {"references": [None if r is None else clean_text(r) for r in references or [None] * len(prompts)],
                "response_lengths": None, "token_ids": None, "ended": None}
        terms, total = self._evaluate([clean_text(p) for p in prompts], [clean_text(c) for c in completions], meta,
                                      list(range(len(prompts))))
        self._check_finite(terms, total, list(range(len(prompts))), on_invalid="error")
        return total.tolist()

    def _evaluate(self, prompts: list[str], completions: list[str], meta: dict,
                  prompt_index: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        terms, total = {}, torch.zeros(len(prompts), dtype=torch.float64)
        for term in self.terms:
            try:
                out = term.fn(prompts, completions, target=term.target, **meta)
            except RewardFunctionError as e:  # a user function: say which samples of the rollout it was given
                at = f"prompt index {prompt_index[e.sample]}" if e.sample is not None else \
                    f"prompt indices {sorted(set(prompt_index))[:8]}{'...' if len(set(prompt_index)) > 8 else ''}"
                raise type(e)(f"reward term '{term.name}' ({at}): {e}", e.sample) from None
            except (ValueError, TypeError) as e:
                if term.kind_rule:  # a rule's complaint about its setting or the data (e.g. no reference answer)
                    raise RewardFunctionError(f"reward term '{term.name}': {e}") from None
                raise
            values = _as_scores(term.name, out, len(prompts), prompt_index)
            terms[term.name] = values  # (B,)
            total = total + term.weight * values
        return terms, total

    def _check_finite(self, terms: dict[str, torch.Tensor], total: torch.Tensor, prompt_index: list[int],
                      on_invalid: str | None = None) -> torch.Tensor:
        """(B,) bool: True where every term and the sum are finite; raises under on_invalid=error."""
        valid = torch.isfinite(total)
        for values in terms.values():
            valid &= torch.isfinite(values)
        if (on_invalid or self.cfg.on_invalid) == "error" and not valid.all():
            i = int((~valid).nonzero()[0])
            bad = [(k, v[i].item()) for k, v in terms.items() if not math.isfinite(v[i].item())]
            name, value = bad[0] if bad else ("weighted sum", total[i].item())
            raise InvalidRewardError(
                f"reward term '{name}' gave {value} for sample {i} (prompt index {prompt_index[i]}); "
                f"{int((~valid).sum())} of {len(valid)} samples are invalid. Fix the reward, or set "
                f"reward.on_invalid=drop to drop such samples.")
        return valid

    # ------------------------------------------------------------------ normalization

    @property
    def normalize(self) -> str:
        """reward.normalize with `auto` resolved: reference when a term is a learned reward model
        (docs/implementation.md#d6), else none."""
        if self.cfg.normalize != "auto":
            return self.cfg.normalize
        return "reference" if any(isinstance(t.fn, ModelReward) for t in self.terms) else "none"

    def _normalize(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.normalize == "none":
            return scores
        if self.normalize == "running":
            self.running.update(scores[valid])
            mean, std = self.running.mean, self.running.std
        else:
            if self.reference is None:
                raise RuntimeError("reward.normalize=reference: call calibrate() with reference-policy scores "
                                   "(score(rollout, raw=True)) before scoring.")
            mean, std = self.reference
        std = std if std > 1e-8 else 1.0
        return torch.where(valid, (scores - mean) / std, scores)

    def calibrate(self, scores: torch.Tensor | ScoredBatch) -> dict[str, float]:
        """Set the `reference` normalization from raw scores of reference-policy samples
        (`score(rollout, raw=True)`), so those samples score mean 0, std 1. Given the ScoredBatch,
        its dropped rows are left out; non-finite values are always ignored."""
        if isinstance(scores, ScoredBatch):
            scores = scores.scores if scores.valid is None else scores.scores[scores.valid]
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        scores = scores[torch.isfinite(scores)]
        if scores.numel() < 2:
            raise ValueError(f"calibrate() needs at least 2 finite reference scores, got {scores.numel()}.")
        mean, std = scores.mean().item(), scores.std().item()
        if std < 1e-8:
            warnings.warn(f"reference reward scores have no spread (all {mean:.4g}); only shifting them.", stacklevel=2)
            std = 1.0
        self.reference = (mean, std)
        return {"reward/ref_mean": mean, "reward/ref_std": std}

    def _record_metrics(self, terms, scores, valid, no_eos) -> None:
        dropped = int((~valid).sum())
        self.dropped_total += dropped
        m = {"reward/mean": scores[valid].mean().item() if valid.any() else float("nan"),
             "reward/dropped": float(dropped), "reward/dropped_total": float(self.dropped_total),
             "reward/missing_eos": float(no_eos.sum())}
        for name, values in terms.items():
            finite = values[torch.isfinite(values)]
            m[f"reward/term/{name}"] = finite.mean().item() if finite.numel() else float("nan")
        self.last_metrics = m

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"running": {"count": self.running.count, "mean": self.running.mean, "m2": self.running.m2},
                "reference": None if self.reference is None else list(self.reference),
                "dropped_total": self.dropped_total}

    def load_state_dict(self, state: dict) -> None:
        missing = {"running", "reference", "dropped_total"} - set(state)
        if missing:
            raise KeyError(f"reward state is missing {sorted(missing)}; was it written by CombinedReward.state_dict()?")
        self.running = RunningStats(**state["running"])
        self.reference = None if state["reference"] is None else tuple(state["reference"])
        self.dropped_total = int(state["dropped_total"])

    def close(self) -> None:
        """Stop the reward-model workers and the processes of user functions."""
        for term in self.terms:
            if isinstance(term.fn, ModelReward):
                term.fn.pool.shutdown()
            elif isinstance(term.fn, (IsolatedFunction, InProcessFunction)):
                term.fn.close()


def _check_rollout(rollout: RolloutBatch) -> None:
    n = len(rollout)
    for name in ("prompt_text", "prompt_ids", "response_text", "response_ids", "finish_reason"):
        if len(getattr(rollout, name)) != n:
            raise ValueError(f"RolloutBatch.{name} has {len(getattr(rollout, name))} rows, prompt_index has {n}; "
                             f"every field needs one row per sample.")
    if rollout.reference and len(rollout.reference) != n:
        raise ValueError(f"RolloutBatch.reference has {len(rollout.reference)} rows for {n} samples (give one per sample or none).")


def _term_names(terms: tuple[RewardTerm, ...]) -> list[str]:
    """'sentiment', or 'match[0]', 'match[2]' when a kind appears more than once."""
    kinds = [t.kind for t in terms]
    return [k if kinds.count(k) == 1 else f"{k}[{i}]" for i, k in enumerate(kinds)]


def build_reward(cfg: RewardConfig, reward_model: str | Path | None = None,
                 policy_tokenizer: str | Path | None = None, *, local: bool = False, placement=None,
                 dtype: str = "float32", worker_timeout_s: float = 300.0,
                 gpus_per_worker: float = 0.0, num_threads: int = 0) -> CombinedReward:
    """The reward of `cfg` (RewardConfig).

    reward_model: folder of `model` terms whose target is unset (the config's model.reward).
    policy_tokenizer: the policy's folder; when its tokenizer equals the reward model's, the
        model reads the rollout's token ids instead of re-tokenizing the text.
    local: reward-model workers run in this process (one per model term), no Ray.
    placement: a tidal.actors.placement.Placement with "reward" slots (cfg.num_workers per
        model term, see role_counts); None: plain actors.
    worker_timeout_s: timeout of every call to a reward worker (cluster.sync_timeout_s).
    gpus_per_worker: GPUs each reward-model worker reserves (0 on CPU).
    num_threads: math threads of each reward-model worker (tidal.actors.threads; 0: leave them)."""
    from tidal.reward_service.client import RemoteReward

    policy_fp = None
    if policy_tokenizer is not None:
        from tidal.common.models import load_tokenizer

        policy_fp = tokenizer_fingerprint(load_tokenizer(policy_tokenizer))
    terms = []
    for i, (term, name) in enumerate(zip(cfg.terms, _term_names(cfg.terms))):
        where = f"reward.terms[{i}] (kind {term.kind})"
        if term.kind in RULES:
            fn = RULES[term.kind]
        elif term.kind == "function":
            if not term.target:
                raise ConfigError(f"{where}: set target to the function's import path 'module:function'.")
            fn = load_function(term.target)  # import errors here, at build time
            fn = InProcessFunction(term.target, fn) if cfg.function_timeout_s is None else \
                IsolatedFunction(term.target, cfg.function_timeout_s)
        elif term.kind == "remote":
            fn = RemoteReward.from_term(term, cfg.timeout_s, cfg.retries, where)
        else:  # model
            path = term.target or reward_model
            if path is None:
                raise ConfigError(f"{where}: no reward model; set its target or model.reward to a reward-model "
                                  f"folder, or run the rm stage before rl.")
            offset = cfg.num_workers * sum(isinstance(t.fn, ModelReward) for t in terms)
            pool = RewardPool(path, cfg.num_workers, cfg.micro_batch_size, dtype, worker_timeout_s,
                              num_gpus_per_worker=gpus_per_worker, local=local, num_threads=num_threads,
                              options_fn=placement.actor_options("reward", offset) if placement else None)
            fn = ModelReward(pool, use_token_ids=policy_fp is not None and policy_fp == pool.fingerprint)
        terms.append(Term(name, term.weight, term.target, fn, kind_rule=term.kind in RULES))
    if not terms:
        raise ConfigError("reward.terms is empty; configure at least one reward term.")
    return CombinedReward(cfg, terms)

