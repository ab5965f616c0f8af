"""Where pi_old comes from (tidal.learner.pi_old), decided in one place: the three sources, the
`auto` rule, the engine check and its fallback (kept across a resume), and the configurations it
refuses - through `tidal config show --check` and `tidal train`, before Ray starts, in one line.
Pure logic; the learner side of each source is in tests/test_learner_old_in_update.py and
tests/test_learner_local.py."""

from __future__ import annotations

import pytest

from tidal.common.config import ConfigError, load_config
from tidal.common.types import RolloutBatch
from tidal.learner.pi_old import (ENGINE_LOGPROB_TOL, PiOld, PiOldStep, check_config, engine_is_pi_old,
                                  forward_planned, update_takes_pi_old)

# one minibatch per step (4 prompts x 2 samples = 8) and no KL penalty in the rewards
GRPO = ["algorithm.name=grpo", "algorithm.kl_coef=0", "rollout.n_samples=2", "algorithm.prompts_per_step=4",
        "learner.mini_batch_size=8", "learner.micro_batch_size=4", "learner.num_workers=1"]


def _cfg(*overrides):
    return load_config(None, ["algorithm.mode=sync", "rollout.temperature=1.0", *overrides])


def _rollout(rows: int, engine_logprobs: bool = True) -> RolloutBatch:
    lp = [[-1.0, -2.0] if engine_logprobs else [] for _ in range(rows)]
    return RolloutBatch(list(range(rows)), ["p"] * rows, [[5]] * rows, ["r"] * rows, [[7, 8]] * rows, lp,
                        ["stop"] * rows, [0] * rows)


def test_the_update_takes_pi_old_when_the_rows_fit_one_minibatch_and_the_rewards_have_no_kl():
    cfg = load_config(None, GRPO)
    assert update_takes_pi_old(cfg) and not forward_planned(cfg)  # 8 rows = one minibatch of 8
    assert update_takes_pi_old(cfg, rows=6)  # rows dropped (invalid rewards): still all in one, smaller, minibatch
    assert not update_takes_pi_old(cfg, rows=12)  # two minibatches: the second one's pi_old would be stale
    for off in (["learner.mini_batch_size=4"], ["algorithm.kl_coef=0.05"], ["algorithm.adaptive_kl=true"],
                ["algorithm.old_logprobs=trainer"], ["algorithm.old_logprobs=engine"],
                ["algorithm.name=expert_iteration", "algorithm.ei_top_k=1"]):  # SFT: no ratio to take it for
        assert not update_takes_pi_old(load_config(None, GRPO + off)), off


def test_the_engine_logprobs_are_pi_old_only_where_they_are_the_same_policy():
    assert engine_is_pi_old(_cfg())  # auto, sync, unfiltered, float32 learner
    assert not forward_planned(_cfg())
    for off in ("algorithm.mode=async", "rollout.top_p=0.9", "rollout.top_k=5", "rollout.temperature=0",
                "algorithm.old_logprobs=trainer", "learner.autocast=bf16"):
        assert not engine_is_pi_old(_cfg(off)), off
        assert forward_planned(_cfg(off)), off


@pytest.mark.parametrize("bad, names", [
    ("algorithm.mode=async", "async mode"), ("rollout.top_k=5", "top_k"), ("rollout.top_p=0.9", "top_p"),
    ("rollout.temperature=0", "rollout.temperature=0"), ("learner.autocast=auto", "learner.autocast=auto"),
])
def test_engine_is_refused_where_it_is_not_pi_old(bad, names):
    cfg = _cfg("algorithm.old_logprobs=engine", bad)  # the config alone cannot tell: it loads
    with pytest.raises(ConfigError, match="algorithm.old_logprobs=engine") as e:
        check_config(cfg)
    assert names in str(e.value)
    with pytest.raises(ConfigError):
        PiOld(cfg)  # and no RL loop runs with it either
    check_config(_cfg("algorithm.old_logprobs=engine"))


def test_auto_checks_the_engine_on_schedule_and_falls_back_for_good(capsys):
    pi_old = PiOld(_cfg("algorithm.logprob_check_every=5"))
    decisions = {s: pi_old.decide(s, _rollout(16)) for s in range(3, 16)}  # a run resumed at step 3
    assert [s for s, d in decisions.items() if d.check] == [3, 5, 10, 15]  # its first step, then every 5
    assert set(decisions.values()) == {PiOldStep("trainer", check=True), PiOldStep("engine")}
    pi_old.observe(5, ENGINE_LOGPROB_TOL / 10)
    assert pi_old.decide(6, _rollout(16)) == PiOldStep("engine")
    pi_old.observe(10, ENGINE_LOGPROB_TOL * 10)
    assert "rl step 11" in capsys.readouterr().err
    assert [pi_old.decide(s, _rollout(16)) for s in (11, 15)] == [PiOldStep("trainer")] * 2  # for good
    forced = PiOld(_cfg("algorithm.old_logprobs=engine"))
    assert forced.decide(0, _rollout(16)) == PiOldStep("engine")  # engine: never second-guessed
    assert PiOld(_cfg("algorithm.old_logprobs=trainer")).decide(0, _rollout(16)) == PiOldStep("trainer")


def test_a_rollout_without_engine_logprobs_falls_back_to_the_trainer(capsys):
    pi_old = PiOld(_cfg())
    assert pi_old.decide(0, _rollout(16, engine_logprobs=False)) == PiOldStep("trainer")
    assert "no engine log-probs" in capsys.readouterr().err
    assert pi_old.decide(1, _rollout(16)) == PiOldStep("trainer")


def test_the_fallback_survives_a_resume():
    fell = PiOld(_cfg())
    fell.decide(0, _rollout(16))
    fell.observe(0, 1.0)
    resumed = PiOld(_cfg())
    resumed.load_state_dict(fell.state_dict())
    assert resumed.decide(7, _rollout(16)) == PiOldStep("trainer")
    fresh = PiOld(_cfg())
    fresh.load_state_dict(PiOld(_cfg()).state_dict())
    assert fresh.decide(7, _rollout(16)).check  # a resumed run checks the engine at its first step


def test_a_step_with_dropped_rows_still_takes_pi_old_in_the_update():
    pi_old = PiOld(load_config(None, GRPO))
    assert pi_old.decide(0, _rollout(8)) == PiOldStep("update")
    assert pi_old.decide(1, _rollout(6)) == PiOldStep("update")  # one group dropped: one smaller minibatch


@pytest.mark.parametrize("overrides, names", [
    (["algorithm.old_logprobs=engine", "algorithm.mode=async"], ["algorithm.old_logprobs=engine", "async"]),
    (["algorithm.name=grpo"], ["algorithm.name=grpo", "rollout.n_samples must be >= 2"]),
    (["algorithm.name=expert_iteration"], ["rollout.n_samples=1", "algorithm.ei_threshold", "keeps every sample"]),
])
def test_the_cli_refuses_before_ray_in_one_line(tmp_path, monkeypatch, capsys, overrides, names):
    import ray

    from tidal.commands.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)
    for command in (["config", "show", "--check"], ["train", "logging.output_dir=runs"]):
        assert main([*command, *overrides, "reward.terms=[{kind: length, target: '16'}]"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(name in err[0] for name in names), err
    assert not list(tmp_path.iterdir())  # nothing written: no run folder, no task data
