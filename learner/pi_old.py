"""Where pi_old comes from (algorithm.old_logprobs): decided here, and nowhere else.

pi_old, the policy that the trainer sees as having sampled a step's rows, is the PPO ratio's
denominator and the policy term of the per-token KL penalty. It has three sources:

  trainer  a forward pass of the learner ranks over every row: always right, costs a forward.
  engine   the rollout engine's log-probs of the sampled tokens. They are pi_old only in sync
           mode (the engine holds the very weights being trained), with unfiltered sampling
           (top_p 1, top_k -1: else they are the truncated distribution's), temperature > 0
           (greedy: the engine does not report the trainer's plain softmax) and a float32
           learner (learner.autocast none: bf16 learner log-probs are not the float32 engine's).
  update   taken inside the update: when a step's rows fit in one minibatch, every row is in the
           first minibatch, whose log-probs before its optimizer step ARE pi_old (later epochs
           reuse them). The rewards must carry no KL penalty (kl_coef 0, not adaptive): they are
           built before the update. And the update must have a ratio (a policy-gradient entry of
           the algorithm table; expert iteration's SFT has none).

`auto` (the default) takes `update` where it applies, else `engine` where the engine's log-probs
are pi_old, checked against the trainer's at the first step that would use them in this process
(so also after a resume) and every algorithm.logprob_check_every steps: a mean gap above
ENGINE_LOGPROB_TOL switches the run to `trainer` for good, with a warning. `engine` and
`trainer` force theirs; `check_config` refuses `engine` where it is not pi_old.

The RL loop asks `PiOld.decide(step, rollout)` each step for a `PiOldStep`, hands it to
`LearnerGroup.forward`, and after a check step reports the gap it saw (`observe`). The one piece
of state, whether the run fell back to the trainer, is in `state_dict()` (the driver checkpoint).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tidal.common.config import ConfigError
from tidal.learner.algorithms import algorithm_for

if TYPE_CHECKING:
    from tidal.common.config import TidalConfig
    from tidal.common.types import RolloutBatch

Source = Literal["trainer", "engine", "update"]
# The largest mean |engine - trainer| logprob gap (nats per token) at which the engine's log-probs
# stand for pi_old. fp32 engine and trainer agree to ~2e-5 on CPU; a bf16 engine, a mismatched
# kernel or a weight-sync bug is off by 1e-2 or more.
ENGINE_LOGPROB_TOL = 1e-3


@dataclass(frozen=True)
class PiOldStep:
    """One step's decision, the argument of `LearnerGroup.forward`."""

    source: Source
    check: bool = False  # source trainer, whose log-probs are compared with the engine's (PiOld.observe)


TRAINER = PiOldStep("trainer")


def check_config(cfg: "TidalConfig") -> None:
    """ConfigError naming the keys for algorithm.old_logprobs=engine where the engine's log-probs
    are not pi_old (called by preflight, before Ray starts, and by PiOld)."""
    a, r = cfg.algorithm, cfg.rollout
    if a.old_logprobs != "engine":
        return
    if a.mode != "sync":
        why = "in async mode the engine's samples come from an older policy than the one trained"
    elif r.top_p < 1.0 or r.top_k > 0:
        why = "with top_p < 1 or top_k > 0 the engine's log-probs are those of the truncated distribution"
    elif r.temperature == 0:
        why = "with rollout.temperature=0 (greedy) the engine does not report the softmax the trainer computes"
    elif cfg.learner.autocast != "none":
        why = (f"with learner.autocast={cfg.learner.autocast} the engine's float32 log-probs differ from the learner's "
               "bf16 ones (about 0.05 nats per token), so PPO ratios would start off 1")
    else:
        return
    raise ConfigError(f"algorithm.old_logprobs=engine: {why}, so they are not pi_old; "
                      "use algorithm.old_logprobs=auto (or trainer).")


def engine_is_pi_old(cfg: "TidalConfig") -> bool:
    """Whether the engine's log-probs of the sampled tokens may stand for pi_old (module doc)."""
    a, r = cfg.algorithm, cfg.rollout
    return (a.old_logprobs != "trainer" and a.mode == "sync" and r.top_p >= 1.0 and r.top_k <= 0
            and r.temperature > 0 and cfg.learner.autocast == "none")


def update_takes_pi_old(cfg: "TidalConfig", rows: int | None = None) -> bool:
    """Whether pi_old can be taken inside the update for a step of `rows` rows (default
    prompts_per_step x n_samples): old_logprobs auto, no KL penalty in the rewards, an update with
    a ratio, and rows that fit in one minibatch (at least one per rank)."""
    a, lc = cfg.algorithm, cfg.learner
    rows = a.prompts_per_step * cfg.rollout.n_samples if rows is None else rows
    return (a.old_logprobs == "auto" and a.kl_coef == 0 and not a.adaptive_kl
            and algorithm_for(cfg).ratio and lc.num_workers <= rows <= lc.mini_batch_size)


def forward_planned(cfg: "TidalConfig") -> bool:
    """Whether the steps of a run normally run the learner ranks' pi_old forward (thread planning:
    without it the reference worker's forward runs alone)."""
    return not (engine_is_pi_old(cfg) or update_takes_pi_old(cfg))


def has_engine_logprobs(rollout: "RolloutBatch") -> bool:
    return len(rollout) > 0 and all(len(lp) > 0 for lp in rollout.response_logprobs)


class PiOld:
    """The per-step decision and the engine check of one RL run (module doc)."""

    def __init__(self, cfg: "TidalConfig"):
        check_config(cfg)
        self.cfg = cfg
        self.engine_ok = engine_is_pi_old(cfg)  # False for good after a failed check
        self._checked = False  # the engine's log-probs were checked once in this process

    def decide(self, step: int, rollout: "RolloutBatch") -> PiOldStep:
        """Where step `step`'s pi_old comes from, for the rows it trains on."""
        a = self.cfg.algorithm
        if update_takes_pi_old(self.cfg, len(rollout)):
            return PiOldStep("update")
        if not self.engine_ok:
            return TRAINER
        if not has_engine_logprobs(rollout):
            self._fall_back(step, "the rollout carries no engine log-probs")
            return TRAINER
        if a.old_logprobs == "auto" and (not self._checked or step % a.logprob_check_every == 0):
            self._checked = True
            return PiOldStep("trainer", check=True)
        return PiOldStep("engine")

    def observe(self, step: int, gap: float | None) -> None:
        """After a check step: keep the engine's log-probs, or fall back to the trainer's for good.
        `gap`: the mean |engine - trainer| logprob per token (None: nothing to compare)."""
        if gap is None:
            self._fall_back(step, "no engine logprobs to compare")
        elif gap > ENGINE_LOGPROB_TOL:
            self._fall_back(step, f"mean |engine - trainer| logprob gap {gap:.2e} nats/token "
                                  f"(bound {ENGINE_LOGPROB_TOL:g})")

    def _fall_back(self, step: int, why: str) -> None:
        self.engine_ok = False
        print(f"tidal: warning: rl step {step + 1}: {why}; pi_old comes from the learners' forward pass from now "
              "on (algorithm.old_logprobs)", file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, bool]:
        return {"engine_ok": self.engine_ok}

    def load_state_dict(self, state: dict[str, bool]) -> None:
        """A run that fell back stays on the trainer's log-probs (only ever from True to False:
        a config that no longer allows the engine keeps it off)."""
        self.engine_ok = self.engine_ok and bool(state["engine_ok"])
