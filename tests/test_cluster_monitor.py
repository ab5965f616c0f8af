"""The over-optimisation monitor's decisions, fed with the scores of real rules: a gameable
proxy that rewards length, and a gold rule (tidal's `length` rule, target 8 words) that
penalises going past the target."""

from __future__ import annotations

import pytest

from tidal.driver.monitor import GoldMonitor
from tidal.common.config import ConfigError, load_config
from tidal.reward_service.rules import RULES


def _longer_is_better(completions: list[str]) -> float:  # the gameable proxy
    return sum(len(c.split()) / 10 for c in completions) / len(completions)


def _gold(completions: list[str]) -> float:
    scores = RULES["length"](["p"] * len(completions), completions, target="8")
    return sum(scores) / len(scores)


# The policy's held-out completions get longer every evaluation: good up to 8 words, then gaming.
WORDS = [2, 4, 6, 8, 11, 14, 18, 24]
EVALS = [(10 * (i + 1), [" ".join(["word"] * n)] * 4, 0.5 * i) for i, n in enumerate(WORDS)]


def _feed(monitor: GoldMonitor):
    verdicts = []
    for step, completions, kl in EVALS:
        verdicts.append(monitor.observe_eval(step, _longer_is_better(completions), _gold(completions), kl))
    return verdicts


def test_the_warning_fires_once_when_the_gameable_proxy_rises_and_gold_falls():
    verdicts = _feed(GoldMonitor(window=3))
    warned_at = [EVALS[i][0] for i, v in enumerate(verdicts) if v.warn]
    # the first window whose gold slope is negative: 6, 8, 11 words (gold -0.25, 0, -0.375; steps 30..50)
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
    verdicts = [m.observe_eval(s, 0.1 * s, 0.05 * s, 0.0) for s in range(1, 8)]
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
