"""The supervised stages of the pipeline: SFT on demonstrations, reward-model training, and
DPO (offline preference optimisation of the policy, an alternative to rm + rl).

Each builds its batch on the driver, starts a LearnerGroup (DeepSpeed ranks as Ray actors),
fits, logs one record per optimizer step, saves an HF folder in the run directory, and shuts
the group down so the next stage gets the resources.
"""

from __future__ import annotations

from pathlib import Path

from tidal.common.config import ConfigError, TidalConfig
from tidal.common.metrics import MetricsLogger

HELDOUT_PAIRS = 256  # held-out preference prompts whose pair accuracy the rm stage reports


class _FitProgress:
    """on_progress of a supervised fit: logs each new optimizer step's record and moves the
    console bar after every window of steps, so the bar shows a real rate and ETA."""

    def __init__(self, logger: MetricsLogger, stage: str, key: str | None = None):
        self.logger, self.stage, self.logged = logger, stage, 0
        self.key = key or stage  # the record's stage field: 'rm2' for the second rm round

    def __call__(self, history: list[dict[str, float]], total: int) -> None:
        for i in range(self.logged, len(history)):
            h = history[i]
            # "step" is the record's own key; the rest go under the stage's namespace unless namespaced.
            metrics = {(k if "/" in k else f"{self.stage}/{k}"): v for k, v in h.items() if k != "step"}
            self.logger.log(i + 1, metrics, stage=self.key)
        self.logged = len(history)
        last = history[-1] if history else {}
        loss = next((last[k] for k in ("losses/sft", "losses/reward", "losses/dpo") if k in last), 0.0) if history else None
        self.logger.progress(len(history), total, stage=self.key, **({"loss": loss} if loss is not None else {}))


def _records(path: Path | None, kind: str, field: str):
    from tidal.common.data import read_records

    if path is None:
        raise ConfigError(f"the {kind} stage needs data.{field} (or data.task: sentiment)")
    return read_records(path, kind)


def run_sft(cfg: TidalConfig, run_dir: Path, logger: MetricsLogger, data, base: str) -> str:
    """Fine-tune `base` on the demonstrations; returns the SFT model folder."""
    from tidal.common.models import load_tokenizer
    from tidal.learner.group import LearnerGroup
    from tidal.learner.sft import build_sft_batch

    d = cfg.data
    records = _records(data.demonstrations, "demonstrations", "demonstrations")
    batch = build_sft_batch(load_tokenizer(base), records, d.max_prompt_tokens, d.max_response_tokens, d.chat_template)
    print(f"tidal: sft on {len(batch)} demonstrations from {base}", flush=True)
    group = LearnerGroup(cfg, base, role="policy")
    try:
        group.fit_sft(batch, on_progress=_FitProgress(logger, "sft"))
        out = group.save_pretrained(run_dir / "sft")
    finally:
        group.shutdown()
    return str(out)


def run_rm(cfg: TidalConfig, run_dir: Path, logger: MetricsLogger, data, base: str, out_name: str = "reward_model",
           stage: str = "rm", feedback: dict | None = None) -> str:
    """Train a reward model (backbone of `base` + a scalar head, or a reward-model folder to
    continue) on preferences; returns its folder. After a collect round (`feedback`: its stage
    record), the new labels come first, then feedback.old_data of the earlier preference data."""
    from tidal.common.models import load_tokenizer, read_value_model_meta
    from tidal.learner.group import LearnerGroup
    from tidal.learner.reward_model import build_preference_batch

    d, loss = cfg.data, cfg.stages.rm.loss
    kind, train_path, held_path = (("comparisons", data.comparisons, data.comparisons_heldout) if loss == "pairwise"
                                   else ("rankings", data.rankings, data.rankings_heldout))
    tok = load_tokenizer(base)
    build = lambda recs: build_preference_batch(tok, recs, d.max_prompt_tokens, d.max_response_tokens,  # noqa: E731
                                                d.chat_template)
    records = _records(train_path, kind, kind)
    new: list = []
    if feedback is not None:
        from tidal.common.data import read_records

        new = read_records(feedback[kind], kind)
        records = records[:int(len(records) * cfg.feedback.old_data)]
        print(f"tidal: {stage} refreshes {base} on {len(new)} new {kind} from {feedback['output']} "
              f"+ {len(records)} earlier ones", flush=True)
    records = new + records
    if cfg.stages.rm.max_steps is not None:  # only what the fit will see: fit_reward scores all of it afterwards
        records = records[:cfg.stages.rm.max_steps * cfg.learner.mini_batch_size * cfg.stages.rm.epochs]
    train = build(records)
    held = build(_records(held_path, kind, kind)[:HELDOUT_PAIRS]) if held_path is not None else None
    print(f"tidal: {stage} ({loss}) on {len(train)} prompts from {base}", flush=True)
    group = LearnerGroup(cfg, base, role="reward")
    try:
        probes = _exploit_batch(tok, new, d) if new else None
        before = _exploit_scores(group, probes, read_value_model_meta(base)) if probes is not None else {}
        fit = group.fit_reward(train, held, on_progress=_FitProgress(logger, "rm", stage))
        final = {"rm/reward_mean": fit.reward_mean, "rm/reward_std": fit.reward_std, "rm/new_labels": float(len(new))}
        if probes is not None:  # how the refreshed model scores what the policy learned to exploit
            after = _exploit_scores(group, probes, {"reward_mean": fit.reward_mean, "reward_std": fit.reward_std})
            final.update({f"rm/exploit_before/{k}": v for k, v in before.items()})
            final.update({f"rm/exploit_after/{k}": v for k, v in after.items()})
            print("tidal: normalised reward-model score (before -> after the new labels): "
                  + ", ".join(f"{k} {before[k]:+.2f} -> {after[k]:+.2f}" for k in EXPLOITS), flush=True)
        if fit.eval_accuracy is not None:
            final["rm/eval_accuracy"] = fit.eval_accuracy
            print(f"tidal: reward model held-out pair accuracy {fit.eval_accuracy:.3f}", flush=True)
        logger.log(len(fit.history), final, stage=stage)
        out = group.save_pretrained(run_dir / out_name)
    finally:
        group.shutdown()
    return str(out)


def run_dpo(cfg: TidalConfig, run_dir: Path, logger: MetricsLogger, data, base: str) -> str:
    """DPO on the comparisons (or rankings, stages.dpo.data) starting from `base` (the SFT model
    when sft ran), which is also the frozen reference; returns RUN/policy_dpo (an HF folder)."""
    from tidal.common.models import load_tokenizer
    from tidal.learner.dpo import build_dpo_batch, pairs_per_record
    from tidal.learner.group import LearnerGroup

    d, st = cfg.data, cfg.stages.dpo
    path = data.comparisons if st.data == "comparisons" else data.rankings
    records = _records(path, st.data, st.data)
    if st.max_steps is not None:  # tokenize only what the fit can see (and the reference pass scores)
        need, kept = st.max_steps * cfg.learner.mini_batch_size * st.epochs, []
        for rec in records:
            if need <= 0:
                break
            kept.append(rec)
            need -= pairs_per_record(rec)
        records = kept
    batch = build_dpo_batch(load_tokenizer(base), records, d.max_prompt_tokens, d.max_response_tokens, d.chat_template)
    print(f"tidal: dpo ({st.loss}, beta={st.beta}) on {len(batch)} pairs from {base}", flush=True)
    group = LearnerGroup(cfg, base, role="policy")
    try:
        history = group.fit_dpo(batch, on_progress=_FitProgress(logger, "dpo"))
        if history:
            last = history[-1]
            print(f"tidal: dpo done: loss {last['losses/dpo']:.4f}, "
                  f"pair accuracy {last.get('dpo/rewards/accuracy', float('nan')):.3f}", flush=True)
        out = group.save_pretrained(run_dir / "policy_dpo")
    finally:
        group.shutdown()
    return str(out)


# Completions a policy learns to exploit a reward model with, and one plain good answer; after a
# collect round the refreshed reward model should rank the exploits below the plain answer.
EXPLOITS = {"empty": "", "punctuation": "!!!!!!!!", "emoticons": ":) :) :) :)",
            "plain": "What a lovely day, I really enjoyed it."}


def _exploit_batch(tok, records: list, d):
    """Every probe completion after the prompts of (up to) 8 new preference records."""
    from tidal.common.data import RankingRecord
    from tidal.learner.reward_model import build_preference_batch

    recs = [RankingRecord(r.prompt, list(EXPLOITS.values()), list(range(len(EXPLOITS)))) for r in records[:8]]
    return build_preference_batch(tok, recs, d.max_prompt_tokens, d.max_response_tokens, d.chat_template)


def _exploit_scores(group, batch, meta: dict) -> dict[str, float]:
    """Mean normalised score (by the model's own reward_mean/std) of each probe completion."""
    scores = group.compute_scores(batch.input_ids, batch.attention_mask).view(-1, len(EXPLOITS)).mean(0)
    mean, std = float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0)) or 1.0
    return {k: (float(v) - mean) / std for k, v in zip(EXPLOITS, scores)}
