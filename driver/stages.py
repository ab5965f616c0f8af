"""The stage table: every stage `stages.run` may name, what it runs, and what it hands on.

`STAGES[name]` is a `Stage`. The job (tidal.driver.job.run_pipeline) walks `stages.run` in
order; for each entry it runs the stage (unless run_state.json says it already finished) and
lets the stage's record change what the later stages start from (`Models`):

    sft      fine-tunes the policy on demonstrations   -> policy and reference
    rm       trains (or, after a collect round, refreshes) the reward model -> reward_model
    dpo      DPO/IPO on preference pairs from the policy -> policy and reference
    rl       PPO / GRPO / ... against the reward        -> policy (round k: RUN/round-k/)
    collect  labels of the current policy's samples    -> feedback (for the next rm)

A new stage is one entry here (and its name in `StagesConfig.run`); nothing else in the job
compares stage names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tidal.common.config import TidalConfig
from tidal.common.metrics import MetricsLogger
from tidal.driver.interrupt import StopRequests
from tidal.driver.preflight import DataPaths
from tidal.driver.run_folder import rl_dir


@dataclass
class Models:
    """What the stages so far produced: each stage starts from these."""

    policy: str  # the current policy (initial, after sft or dpo, after each rl round)
    reference: str  # the frozen reference and KL anchor (the initial policy after sft or dpo)
    reward_model: str | None
    feedback: dict | None = None  # the last collect round's record (its exports)


@dataclass(frozen=True)
class StageRun:
    """Everything a stage reads besides the models: one per job."""

    cfg: TidalConfig
    run_dir: Path
    logger: MetricsLogger
    data: DataPaths
    stops: StopRequests
    resume: bool = False  # a resumed run: an rl stage continues from its checkpoint (a new run never loads one)


@dataclass(frozen=True)
class Stage:
    name: str
    # (job, models, key, round) -> the run_state.json record: {"output": ..., ...}; key is the
    # stage's name for round 1 and name + round after ('rm2'), round counts from 1
    run: Callable[[StageRun, Models, str, int], dict[str, Any]]
    # how a finished record changes what later stages start from
    hand_on: Callable[[Models, dict[str, Any]], None]


def _sft(job: StageRun, models: Models, key: str, round_: int) -> dict:
    from tidal.driver.fit_stages import run_sft

    return {"output": run_sft(job.cfg, job.run_dir, job.logger, job.data, models.policy)}


def _rm(job: StageRun, models: Models, key: str, round_: int) -> dict:
    from tidal.common.models import resolve_model
    from tidal.driver.fit_stages import run_rm

    cfg = job.cfg
    if round_ > 1 and models.reward_model:  # refresh the previous reward model on the new labels
        base = models.reward_model
    else:
        base = str(resolve_model(cfg.stages.rm.base)) if cfg.stages.rm.base else models.policy
    out = "reward_model" if round_ == 1 else f"reward_model-{round_}"
    return {"output": run_rm(cfg, job.run_dir, job.logger, job.data, base, out_name=out, stage=key,
                             feedback=models.feedback)}


def _dpo(job: StageRun, models: Models, key: str, round_: int) -> dict:
    from tidal.driver.fit_stages import run_dpo

    return {"output": run_dpo(job.cfg, job.run_dir, job.logger, job.data, models.policy)}


def _collect(job: StageRun, models: Models, key: str, round_: int) -> dict:
    from tidal.driver.collect import run_collect

    return run_collect(job.cfg, job.run_dir, job.logger, job.data, models.policy, round_, key)


def _rl(job: StageRun, models: Models, key: str, round_: int) -> dict:
    from tidal.driver.rl_stage import run_rl

    where = rl_dir(job.run_dir, round_)
    summary = run_rl(job.cfg, where, job.logger, job.data, models.policy, models.reward_model, job.stops,
                     reference=models.reference, stage=key, resume=job.resume)
    record = {"output": str(where / "policy"), "summary": summary}
    if "online" in summary:  # online feedback refit the reward model while the stage ran
        record["reward_model"] = summary["online"]["final_reward_model"]
    return record


def _new_anchor(models: Models, record: dict) -> None:
    """sft and dpo: later stages start from the new policy and are anchored (KL) to it."""
    models.policy = models.reference = record["output"]


def _new_policy(models: Models, record: dict) -> None:
    models.policy = record["output"]
    if record.get("reward_model"):  # an online rl stage's last reward-model version
        models.reward_model = record["reward_model"]


def _new_reward_model(models: Models, record: dict) -> None:
    models.reward_model = record["output"]


def _new_feedback(models: Models, record: dict) -> None:
    models.feedback = record


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("sft", _sft, _new_anchor),
    Stage("rm", _rm, _new_reward_model),
    Stage("dpo", _dpo, _new_anchor),
    Stage("rl", _rl, _new_policy),
    Stage("collect", _collect, _new_feedback),
)}
