"""The over-optimisation monitor's decisions, fed with the scores of real rules: a gameable
proxy that rewards length, and a gold rule (tidal's `length` rule, target 8 words) that
penalises going past the target; its state across a resume, its best-gold record, and the
best-gold checkpoint folder (tidal.driver.best_checkpoint) on real checkpoint folders."""

from __future__ import annotations

import json
import math

import pytest

from tidal.driver.monitor import GoldMonitor
from tidal.common.config import ConfigError, load_config
from tidal.reward_service.rules import RULES


def _longer_is_better(completions: list[str]) -> float:  # the gameable proxy
    return sum(len(c.split()) / 10 for c in completions) / len(completions)


def _gold(completions: list[str]) -> list[float]:  # per prompt
    return RULES["length"](["p"] * len(completions), completions, target="8")


# The policy's held-out completions (8 prompts, half of them a word longer) get longer every
# evaluation: good up to 8 words, then gaming.
WORDS = [2, 4, 6, 8, 11, 14, 18, 24]
EVALS = [(10 * (i + 1), [" ".join(["word"] * (n + k % 2)) for k in range(8)], 0.5 * i) for i, n in enumerate(WORDS)]


def _feed(monitor: GoldMonitor):
    verdicts = []
    for step, completions, kl in EVALS:
        verdicts.append(monitor.observe_eval(step, _longer_is_better(completions), _gold(completions), kl))
    return verdicts


def test_the_warning_fires_once_when_the_gameable_proxy_rises_and_gold_falls():
    verdicts = _feed(GoldMonitor(window=3))
    warned_at = [EVALS[i][0] for i, v in enumerate(verdicts) if v.warn]
    # the first window whose gold falls for every prompt: 6, 8, 11 words (steps 30..50)
    assert warned_at == [50]
    assert all(not v.check.alarm for v in verdicts[:4]) and all(v.check.alarm for v in verdicts[4:])
    assert verdicts[4].check.proxy_slope > 0 > verdicts[4].check.gold_slope
    assert all(v.stop is None for v in verdicts)  # early_stop none: it only warns


def test_gold_drop_stops_at_the_first_alarm_and_kl_at_its_bound():
    verdicts = _feed(GoldMonitor(window=3, early_stop="gold_drop"))
    assert [v.stop for v in verdicts].index("gold_drop") == 4
    kl = GoldMonitor(window=3, early_stop="kl", stop_at_kl=2.0)
    assert [kl.observe_kl(x).stop for x in (0.5, 1.9, 2.1)] == [None, None, "kl"]
    assert GoldMonitor(window=3).observe_kl(100.0).stop is None


def test_no_alarm_while_proxy_and_gold_rise_together():
    m = GoldMonitor(window=3)
    verdicts = [m.observe_eval(s, 0.1 * s, [0.05 * s, 0.04 * s], 0.0) for s in range(1, 8)]
    assert not any(v.warn or v.check.alarm for v in verdicts) and not m.warned


def test_plot_writes_gold_and_proxy_against_sqrt_kl(tmp_path):
    m = GoldMonitor(window=3)
    _feed(m)
    assert m.plot(tmp_path / "plots" / "o.png").stat().st_size > 0
    assert GoldMonitor(window=3).plot(tmp_path / "none.png") is None


def test_config_needs_a_bound_for_kl_and_the_monitor_for_gold_drop():
    with pytest.raises(ConfigError, match="stop_at_kl"):
        load_config(None, ["algorithm.early_stop=kl"])
    with pytest.raises(ConfigError, match="gold_every"):
        load_config(None, ["algorithm.early_stop=gold_drop"])
    cfg = load_config(None, ["algorithm.early_stop=gold_drop", "logging.gold_every=2"])
    assert cfg.logging.gold_window == 4 and cfg.logging.gold_term == "sentiment"


def test_the_config_sets_the_test_level_and_the_minimum_drop():
    """logging.gold_alpha and logging.gold_min_drop reach the monitor's decision."""
    noisy = [[0.5, 0.9, 0.1, 0.6], [0.6, 0.5, 0.2, 0.5], [0.4, 0.6, 0.0, 0.6], [0.3, 0.8, 0.1, 0.4]]  # a weak fall
    def alarms(*overrides):
        m = GoldMonitor.from_config(load_config(None, ["logging.gold_every=1", *overrides]))
        return [m.observe_eval(s, 0.1 * s, g, 0.0).check.alarm for s, g in enumerate(noisy, 1)][-1]
    assert not alarms()  # p = 0.03: not significant at the default 0.01
    assert alarms("logging.gold_alpha=0.05")
    assert alarms("logging.gold_alpha=1.0")  # no test: the slope's sign, as before
    assert not alarms("logging.gold_alpha=1.0", "logging.gold_min_drop=0.2")  # it falls by 0.13 across the window
    assert alarms("logging.gold_alpha=1.0", "logging.gold_min_drop=0.1")


def test_the_monitor_records_the_best_gold_and_says_when_the_run_ended_past_it():
    m = GoldMonitor(window=3)
    verdicts = _feed(m)
    means = [sum(_gold(c)) / 8 for _, c, _ in EVALS]
    assert [v.best for v in verdicts] == [True, True, True, True, False, False, False, False]
    assert m.best_step == 40 and m.best_gold == pytest.approx(max(means))
    assert "step 80" in m.past_best() and "step 40" in m.past_best()
    rising = GoldMonitor(window=3)
    for s in range(1, 5):
        rising.observe_eval(s, 0.1 * s, [0.1 * s, 0.2 * s], 0.0)
    assert rising.past_best() is None and rising.best_step == 4


def test_a_resumed_monitor_decides_as_the_uninterrupted_one():
    """Its state goes into a checkpoint's driver_state.json (JSON) and back."""
    whole = _feed(GoldMonitor(window=3, early_stop="gold_drop"))
    first = GoldMonitor(window=3, early_stop="gold_drop")
    for step, completions, kl in EVALS[:4]:
        first.observe_eval(step, _longer_is_better(completions), _gold(completions), kl)
    resumed = GoldMonitor(window=3, early_stop="gold_drop")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [resumed.observe_eval(s, _longer_is_better(c), _gold(c), kl) for s, c, kl in EVALS[4:]]
    assert [v.stop for v in rest] == [v.stop for v in whole[4:]] and rest[0].stop == "gold_drop"
    assert resumed.best_step == 40 and len(resumed.steps) == len(EVALS)
    fresh = GoldMonitor(window=3)
    fresh.load_state_dict(json.loads(json.dumps(GoldMonitor(window=3).state_dict())))
    assert fresh.best_step is None and fresh.best_gold == -math.inf


def _write_checkpoints(run_dir, steps, monitor_best):
    """Real checkpoint folders (write_checkpoint) with the files an RL checkpoint holds."""
    import torch

    from tidal.driver.checkpoint import DriverState, write_checkpoint

    out = {}
    for step in steps:
        def write(d, step=step):
            (d / "learner").mkdir()
            torch.save({"w": torch.full((3,), float(step))}, d / "learner" / "model.pt")
            DriverState(step, step, {}, {}, {}, extra={"monitor": {"best_gold": 0.1 * monitor_best[step]}}).save(d)
        out[step] = write_checkpoint(run_dir, step, write)
    return out


def test_the_best_checkpoint_survives_pruning_and_costs_no_copy(tmp_path):
    import torch

    from tidal.driver.best_checkpoint import best_dir, publish_best, read_best
    from tidal.driver.checkpoint import checkpoint_problem

    ckpts = _write_checkpoints(tmp_path, [2], {2: 2})
    publish_best(tmp_path, ckpts[2], 2, 0.2)
    model = best_dir(tmp_path) / "learner" / "model.pt"
    assert model.stat().st_ino == (ckpts[2] / "learner" / "model.pt").stat().st_ino  # a hard link
    _write_checkpoints(tmp_path, [4, 6, 8], {4: 2, 6: 2, 8: 2})  # keeps the two newest: step 2 is pruned
    assert not ckpts[2].exists()
    assert read_best(tmp_path) == {"step": 2, "gold": 0.2} and checkpoint_problem(best_dir(tmp_path)) is None
    assert torch.load(model)["w"].tolist() == [2.0] * 3
    publish_best(tmp_path, tmp_path / "checkpoints" / "step-000008", 8, 0.5)  # a new best replaces it whole
    assert read_best(tmp_path)["step"] == 8 and torch.load(model)["w"].tolist() == [8.0] * 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "latest", "step-000006",
                                                                            "step-000008"]


def test_a_resume_keeps_the_best_only_when_it_is_the_monitors(tmp_path, capsys):
    from tidal.driver.best_checkpoint import publish_best, read_best, usable_best

    ckpts = _write_checkpoints(tmp_path, [2, 4], {2: 2, 4: 4})
    publish_best(tmp_path, ckpts[2], 2, 0.2)
    assert usable_best(tmp_path, 2)
    # Killed between step 4's checkpoint and its publication: step 4's own checkpoint is published.
    assert usable_best(tmp_path, 4) and read_best(tmp_path) == {"step": 4, "gold": pytest.approx(0.4)}
    # The monitor's best is a step whose checkpoint is gone: forgotten, with a warning.
    assert not usable_best(tmp_path, 1) and "best-gold checkpoint of step 1" in capsys.readouterr().err
    assert not usable_best(tmp_path, None)


def test_the_summary_says_which_policy_run_policy_is(tmp_path, capsys):
    """A run past its best gold keeps its last policy and says so; a gold_drop stop names the best."""
    from types import SimpleNamespace

    from tidal.driver.rl_stage import monitor_summary

    m = GoldMonitor(window=3)
    _feed(m)
    last = monitor_summary(SimpleNamespace(monitor=m, restored_best=None), tmp_path)
    assert last["best_gold"]["policy"] == "last" and last["best_gold"]["step"] == 40
    assert last["best_gold"]["last_step"] == 80 and last["overoptimisation_warned"] is True
    note = capsys.readouterr().out
    assert "note: the final policy's gold" in note and "step 40" in note and str(tmp_path / "policy") in note
    best = monitor_summary(SimpleNamespace(monitor=m, restored_best=40), tmp_path)
    assert best["best_gold"]["policy"] == "best" and "note" not in capsys.readouterr().out
    assert (tmp_path / "plots" / "overoptimisation.png").is_file()
