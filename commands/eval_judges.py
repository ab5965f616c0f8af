"""Two scoreboard columns about a method's reward model, for `tidal eval`.

A method's *judge* is the reward model its run ended with: the newest version an online run
published (RUN/reward_versions/v<k>, docs/feedback.md#online-rlhf), else the newest one its rm
stages trained (a rounds run's refit), else the proxy's reward model (model.reward or the first
run's). For each method row, with the judge:

  rm_accuracy   how often the judge ranks the method's completion against SFT's completion of the
                same prompt as the gold judge does (pairs where gold ties are left out, a judge tie
                counts half; rm_pairs says how many pairs). It asks whether the reward model still
                tells better from worse where the policy has gone, which its held-out accuracy on
                the offline comparisons cannot say. The SFT row has no such pairs.
  probe margin  the judge's score of a plain good answer minus its best score among the exploit
                probes (empty, punctuation, emoticons: EXPLOITS, the completions a policy learns to
                exploit a reward model with), each after the first 8 reporting prompts, in units of
                the model's own reward_std. Positive: the judge prefers the plain answer to every
                exploit. Per-probe scores are in eval.json.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

from tidal.common.config import TidalConfig
from tidal.driver.fit_stages import EXPLOITS

PROBE_PROMPTS = 8


def final_reward_model(run: str) -> str | None:
    """The reward model a run directory ended with (module doc); None for an HF folder."""
    from tidal.driver.run_folder import run_output

    run_dir = Path(run)
    if not (run_dir / "run_state.json").is_file():
        return None
    versions = [p for p in (run_dir / "reward_versions").glob("v*") if p.name[1:].isdigit()
                and (p / "config.json").is_file()]
    if versions:
        return str(max(versions, key=lambda p: int(p.name[1:])))
    return run_output(run_dir, ("rm",))


def judges(runs: list[str]) -> dict[str, str]:
    """Method name -> the reward model its run ended with, for each `--run NAME=RUN` that is a run
    directory with one (the others, SFT and best-of-n are judged by the proxy's reward model)."""
    out = {}
    for spec in runs:
        name, _, path = spec.partition("=")
        found = final_reward_model(path)
        if found:
            out[name] = found
    return out


def judge_columns(cfg: TidalConfig, judge: str | None, sft_tokenizer: str, prompts: list[str],
                  completions: list[str], gold: list[float], sft_completions: list[str] | None,
                  sft_gold: list[float] | None) -> dict:
    """rm_accuracy, rm_pairs, probes and probe_margin of one method with its judge (module doc);
    {} when there is no judge (no learned reward model in the config)."""
    from tidal.reward_service.combine import build_reward

    model_terms = [t for t in cfg.reward.terms if t.kind == "model" and not t.target]
    if judge is None or not model_terms:
        return {}
    reward = build_reward(replace(cfg.reward, terms=(replace(model_terms[0], weight=1.0),)), reward_model=judge,
                          policy_tokenizer=sft_tokenizer, local=True, dtype=cfg.model.dtype)
    try:
        out = {"rm_judge": judge, **probe_scores(reward, prompts[:PROBE_PROMPTS])}
        if sft_completions is not None and sft_gold is not None:
            mine = reward.score_texts(prompts, completions)
            theirs = reward.score_texts(prompts, sft_completions)
            out.update(pair_accuracy(mine, theirs, gold, sft_gold))
    finally:
        reward.close()
    return out


def probe_scores(reward, prompts: list[str]) -> dict:
    """The judge's mean normalised score of each probe over `prompts`, and the margin."""
    texts = list(EXPLOITS.values())
    flat = reward.score_texts([p for p in prompts for _ in texts], texts * len(prompts))
    per = {k: statistics.mean(flat[i::len(texts)]) for i, k in enumerate(EXPLOITS)}
    margin = per["plain"] - max(v for k, v in per.items() if k != "plain")
    return {"probes": per, "probe_margin": margin}


def pair_accuracy(rm_a: list[float], rm_b: list[float], gold_a: list[float], gold_b: list[float]) -> dict:
    """Agreement of the reward model's preference between A and B with gold's, prompt by prompt:
    gold ties left out, a reward-model tie counts half. rm_accuracy is None with no pair left."""
    agree, pairs = 0.0, 0
    for ra, rb, ga, gb in zip(rm_a, rm_b, gold_a, gold_b, strict=True):
        if ga == gb:
            continue
        pairs += 1
        agree += 0.5 if ra == rb else float((ra > rb) == (ga > gb))
    return {"rm_accuracy": agree / pairs if pairs else None, "rm_pairs": pairs}
