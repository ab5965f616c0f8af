"""Scoreboard statistics on constructed cases: win-rate and its Wilson interval, the
degenerate-completion detector, the over-optimisation alarm and Gao et al.'s x axis."""

from __future__ import annotations

import math

import pytest

from tidal.common.scoreboard import (
    degenerate_share, gao_x, is_degenerate, ls_slope, overoptimisation_alarm, overoptimisation_check,
    slope_p_value, student_t_cdf, wilson_interval, win_rate,
)


def test_win_rate_of_identical_lists_is_one_half():
    scores = [0.1, -2.0, 3.5, 0.0, 1.0]
    wr = win_rate(scores, scores)
    assert (wr.rate, wr.wins, wr.ties, wr.losses, wr.n) == (0.5, 0, 5, 0, 5)
    assert wr.low < 0.5 < wr.high


def test_win_rate_of_a_dominating_list_is_one():
    b = [0.1 * i for i in range(20)]
    wr = win_rate([x + 1.0 for x in b], b)
    assert (wr.rate, wr.wins, wr.losses) == (1.0, 20, 0)
    assert wr.high == 1.0 and 0.8 < wr.low < 1.0  # Wilson keeps a width at p = 1
    assert win_rate(b, [x + 1.0 for x in b]).rate == 0.0


def test_win_rate_hand_computation_with_ties_and_tolerance():
    a = [1.0, 2.0, 3.0, 4.00, 0.0]
    b = [0.0, 2.0, 5.0, 3.99, 0.0]
    # exact: win, tie, loss, win, tie -> (2 + 1) / 5
    wr = win_rate(a, b)
    assert (wr.wins, wr.ties, wr.losses, wr.rate) == (2, 2, 1, 0.6)
    # tolerance 0.05: 4.00 vs 3.99 becomes a tie -> (1 + 1.5) / 5
    wr = win_rate(a, b, tie_tolerance=0.05)
    assert (wr.wins, wr.ties, wr.losses, wr.rate) == (1, 3, 1, 0.5)


def test_wilson_interval_hand_computation():
    # 8 of 10 at 95%: z = 1.959964; centre (0.8 + z^2/20) / (1 + z^2/10) = 0.71693,
    # half z * sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.22677 -> (0.49016, 0.94331)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94331, abs=1e-5)


def test_win_rate_interval_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (10, 40, 160, 640):
        a = [float(i % 3) for i in range(n)]  # a beats b on 2 of 3 prompts
        b = [1.0] * n
        wr = win_rate(a, b)
        assert wr.low <= wr.rate <= wr.high
        widths.append(wr.high - wr.low)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="same prompts"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        win_rate([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        win_rate([], [])


@pytest.mark.parametrize("text", [
    "", "   ", "\n\t ", "!!!!!!", "...?!", ":):):):)", ":) :) :) :)", "Great!!!!!!!!!!!!!", "hahahahaha",
    "ha ha ha ha", ":)", "great great great great great", "The the the the the", "\U0001F600\U0001F600\U0001F600",
])
def test_degenerate_examples(text):
    assert is_degenerate(text)


@pytest.mark.parametrize("text", [
    "#DeflateGateHop!!!! Deflatedgrass...",  # real words among symbols: the gold judge decides
    "The movie was wonderful, I loved it!", "Great!", "ok", "very very good film", "10/10",
    "lol :)",
])
def test_not_degenerate_examples(text):
    assert not is_degenerate(text)


def test_degenerate_share():
    assert degenerate_share(["", "a fine review", "!!!!", "I liked the plot."]) == 0.5
    with pytest.raises(ValueError):
        degenerate_share([])


def test_ls_slope_hand_computation():
    assert ls_slope([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    # x mean 2, y mean 2: slope = sum dx*dy / sum dx^2 = ((-2)(-1) + 0 + 2*3 + ... )
    assert ls_slope([0, 2, 4], [1.0, 0.0, 5.0]) == pytest.approx(((-2) * (-1) + 0 * (-2) + 2 * 3) / 8)


STEPS = list(range(0, 100, 10))
PROXY_UP = [0.1 * i for i in range(10)]
SPREAD = (-0.02, 0.01, 0.0, 0.03, -0.01, 0.02)  # a fixed per-prompt wobble around each mean


def per_prompt(means: list[float], spread=SPREAD) -> list[list[float]]:
    """Each evaluation's per-prompt gold: the mean plus a wobble that shifts with the evaluation,
    so the prompts' own slopes differ (the test has a spread to judge the fall against)."""
    return [[m + spread[(i + t) % len(spread)] for i in range(len(spread))] for t, m in enumerate(means)]


def test_overoptimisation_alarm_fires_when_gold_falls_as_proxy_rises():
    gold = per_prompt([0.5] * 5 + [0.45, 0.4, 0.42, 0.3, 0.25])  # a decline in the last evaluations
    check = overoptimisation_check(STEPS, PROXY_UP, gold, window=5)
    assert check.alarm and check.proxy_slope > 0 and check.gold_slope < 0 and check.points == 5
    assert check.p_value < 0.01 and check.gold_drop == pytest.approx(-check.gold_slope * 40)
    assert overoptimisation_alarm(STEPS, PROXY_UP, gold, window=5)
    # A required drop larger than the observed one (about 0.18 across the window) silences it.
    assert not overoptimisation_alarm(STEPS, PROXY_UP, gold, window=5, min_gold_drop=0.25)
    assert overoptimisation_alarm(STEPS, PROXY_UP, gold, window=5, min_gold_drop=0.15)


def test_no_alarm_when_both_rise_or_proxy_flat_or_too_few_points():
    gold_up = per_prompt([0.2 + 0.01 * i for i in range(10)])
    assert not overoptimisation_alarm(STEPS, PROXY_UP, gold_up, window=5)
    gold_down = per_prompt([1.0 - 0.1 * i for i in range(10)])
    assert not overoptimisation_alarm(STEPS, [1.0] * 10, gold_down, window=5)  # proxy flat: no gaming
    # Gold fell early but recovers inside the window: no alarm for the past.
    gold_dip = per_prompt([1.0, 0.5, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert not overoptimisation_alarm(STEPS, PROXY_UP, gold_dip, window=5)
    check = overoptimisation_check(STEPS[:3], PROXY_UP[:3], gold_down[:3], window=5)
    assert not check.alarm and math.isnan(check.gold_slope) and math.isnan(check.p_value)
    with pytest.raises(ValueError, match="window"):
        overoptimisation_alarm(STEPS, PROXY_UP, gold_down, window=2)
    with pytest.raises(ValueError, match="same prompts"):
        overoptimisation_alarm(STEPS[:5], PROXY_UP[:5], gold_down[:4] + [[0.0]], window=5)


def test_student_t_cdf_against_known_values():
    assert student_t_cdf(0.0, 3) == pytest.approx(0.5)
    assert student_t_cdf(-1.0, 1) == pytest.approx(0.25)  # df 1 is the Cauchy: 1/2 + atan(t)/pi
    assert student_t_cdf(2.0, 1) == pytest.approx(0.5 + math.atan(2.0) / math.pi)
    assert student_t_cdf(-2.0, 2) == pytest.approx(0.5 * (1 - 2.0 / math.sqrt(2 + 4.0)))  # df 2 closed form
    assert student_t_cdf(-2.602, 15) == pytest.approx(0.01, abs=2e-4)  # tables: t_{0.99, 15} = 2.602
    assert student_t_cdf(-1.96, 10_000) == pytest.approx(0.025, abs=2e-4)  # the normal limit
    assert student_t_cdf(-math.inf, 4) == 0.0 and student_t_cdf(math.inf, 4) == 1.0


def test_slope_p_value_uses_the_spread_between_prompts():
    xs = [0.0, 1.0, 2.0]
    same_fall = [[1.0, 2.0], [0.9, 1.9], [0.8, 1.8]]  # both prompts fall by exactly 0.1 a step
    assert slope_p_value(xs, same_fall) == 0.0
    assert slope_p_value(xs, [[1.0], [0.5], [0.0]]) == 1.0  # one prompt: no spread, no evidence
    # Prompt slopes -0.3 and +0.1: mean -0.1, sd 0.2828, t = -0.5 with df 1 -> p = 1/2 + atan(-0.5)/pi.
    mixed = [[0.0, 0.0], [-0.3, 0.1], [-0.6, 0.2]]
    assert slope_p_value(xs, mixed) == pytest.approx(0.5 + math.atan(-0.5) / math.pi)


def simulated_alarms(drop_per_eval: float, runs: int = 1000, evals: int = 10, prompts: int = 16, noise: float = 0.1,
                     window: int = 4, **rule) -> tuple[float, float]:
    """(share of evaluations that alarm, share of runs with any alarm) over simulated runs. Each
    prompt's gold is its own level, minus drop_per_eval per evaluation, plus noise whose sd makes
    the MEAN gold's noise `noise`; the proxy rises every evaluation."""
    import random

    rng = random.Random(7)
    alarms = checks = alarmed_runs = 0
    for _ in range(runs):
        level = [rng.gauss(0.0, 0.3) for _ in range(prompts)]
        steps, proxy, gold, any_alarm = [], [], [], False
        for t in range(evals):
            steps.append(10.0 * (t + 1))
            proxy.append(0.1 * t + rng.gauss(0.0, 0.02))
            gold.append([g - drop_per_eval * t + rng.gauss(0.0, noise * math.sqrt(prompts)) for g in level])
            if t + 1 >= window:
                alarm = overoptimisation_alarm(steps, proxy, gold, window, **rule)
                alarms, checks, any_alarm = alarms + alarm, checks + 1, any_alarm or alarm
        alarmed_runs += any_alarm
    return alarms / checks, alarmed_runs / runs


def test_flat_noisy_gold_rarely_raises_the_alarm():
    """The defect: with flat gold plus noise (sd 0.1) and a rising proxy, the sign of the gold
    slope alone alarmed at about half of all evaluations. The test keeps it near alpha."""
    per_eval, per_run = simulated_alarms(0.0)
    assert per_eval < 0.05, per_eval
    assert per_eval < 0.02  # the default alpha is 0.01 per evaluation
    assert per_run < 7 * 0.02  # 7 windows per run: at most their sum
    coin, _ = simulated_alarms(0.0, alpha=1.0)  # the sign of the slope alone, as before
    assert 0.4 < coin < 0.6


def test_a_real_gold_drop_raises_the_alarm():
    per_eval, per_run = simulated_alarms(0.15)  # gold falls 0.15 per evaluation, noise sd 0.1
    assert per_run > 0.99 and per_eval > 0.6, (per_eval, per_run)
    # A minimum drop well above the real one (0.45 across a window of 4 evaluations) silences it.
    assert simulated_alarms(0.15, runs=100, min_gold_drop=1.0)[1] < 0.05


def test_gao_x():
    assert gao_x(4.0) == 2.0 and gao_x(0.0) == 0.0
    assert gao_x(-1e-3) == 0.0  # k1 sampling noise below zero
    assert gao_x([0.25, 9.0]) == [0.5, 3.0]
    assert math.isnan(gao_x(float("nan")))
