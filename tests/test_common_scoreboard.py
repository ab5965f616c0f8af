"""Scoreboard statistics on constructed cases: win-rate and its Wilson interval, the
degenerate-completion detector, the over-optimisation alarm and Gao et al.'s x axis."""

from __future__ import annotations

import math

import pytest

from tidal.common.scoreboard import (
    degenerate_share, gao_x, is_degenerate, ls_slope, overoptimisation_alarm, overoptimisation_check,
    wilson_interval, win_rate,
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


def test_overoptimisation_alarm_fires_when_gold_falls_as_proxy_rises():
    gold = [0.5] * 5 + [0.45, 0.4, 0.42, 0.3, 0.25]  # noisy decline in the last evaluations
    check = overoptimisation_check(STEPS, PROXY_UP, gold, window=5)
    assert check.alarm and check.proxy_slope > 0 and check.gold_slope < 0 and check.points == 5
    assert overoptimisation_alarm(STEPS, PROXY_UP, gold, window=5)
    # A required drop larger than the observed one silences it (slope here is about -0.005 per step).
    assert not overoptimisation_alarm(STEPS, PROXY_UP, gold, window=5, min_gold_drop=0.01)


def test_no_alarm_when_both_rise_or_proxy_flat_or_too_few_points():
    gold_up = [0.2 + 0.01 * i for i in range(10)]
    assert not overoptimisation_alarm(STEPS, PROXY_UP, gold_up, window=5)
    gold_down = [1.0 - 0.1 * i for i in range(10)]
    assert not overoptimisation_alarm(STEPS, [1.0] * 10, gold_down, window=5)  # proxy flat: no gaming
    # Gold fell early but recovers inside the window: no alarm for the past.
    gold_dip = [1.0, 0.5, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert not overoptimisation_alarm(STEPS, PROXY_UP, gold_dip, window=5)
    check = overoptimisation_check(STEPS[:3], PROXY_UP[:3], gold_down[:3], window=5)
    assert not check.alarm and math.isnan(check.gold_slope)
    with pytest.raises(ValueError, match="window"):
        overoptimisation_alarm(STEPS, PROXY_UP, gold_down, window=2)


def test_gao_x():
    assert gao_x(4.0) == 2.0 and gao_x(0.0) == 0.0
    assert gao_x(-1e-3) == 0.0  # k1 sampling noise below zero
    assert gao_x([0.25, 9.0]) == [0.5, 3.0]
    assert math.isnan(gao_x(float("nan")))
