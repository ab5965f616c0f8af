"""Scoreboard statistics: win-rate with an interval, degenerate completions, over-optimisation.

Pure Python (no torch), so `tidal eval`, the RL loop's monitor and plots can all use it.

  win_rate(a, b)            pairwise win-rate of policy A over B on the same prompts, ties half,
                            with a 95% Wilson score interval
  is_degenerate(text)       empty, mostly symbols, or one token / short unit repeated
  degenerate_share(texts)   the share of degenerate completions
  overoptimisation_check / overoptimisation_alarm
                            gold falling while the proxy rises (least-squares slopes over a window)
  gao_x(kl)                 sqrt(KL), the x axis of Gao et al. 2022's over-optimisation plots
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist


# ---------------------------------------------------------------------------- win-rate

@dataclass(frozen=True)
class WinRate:
    rate: float  # (wins + ties / 2) / n
    low: float  # lower end of the interval
    high: float  # upper end
    wins: int
    ties: int
    losses: int
    confidence: float  # e.g. 0.95
    method: str = "wilson"

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def _finite_list(name: str, values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    bad = [i for i, v in enumerate(out) if math.isnan(v)]
    if bad:
        raise ValueError(f"{name} has NaN at positions {bad[:5]}; score every prompt (or drop it from both lists) first")
    return out


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (Wilson 1927). Unlike the normal
    (Wald) interval it stays inside [0, 1] and keeps a non-zero width at 0 and n successes,
    which is exactly where a dominating policy lands."""
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp: for p at 0 or 1, centre -/+ half is 0 or 1 up to rounding.
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], tie_tolerance: float = 0.0,
             confidence: float = 0.95) -> WinRate:
    """Win-rate of A over B, pairwise on the same prompts: scores_a[i] and scores_b[i] belong to
    prompt i. A wins when a_i - b_i > tol, loses when b_i - a_i > tol, else ties; a tie counts
    half a win (as in AlpacaFarm's simulated win-rate, Dubois et al. 2023).

    Interval: the Wilson score interval on (wins + ties / 2) out of n. Ties make each prompt's
    outcome take values in {0, 1/2, 1}, whose variance (wins + ties/4)/n - rate^2 is never
    above a coin flip's rate(1 - rate) with the same mean, so treating the half-counted total as
    binomial overstates the spread: the interval is conservative, never too narrow. (With all
    prompts tied, e.g. identical lists, the rate is exactly 0.5 and the interval is as wide as
    a coin's; that honestly says n prompts cannot tell a 0.5 apart from its neighbours.)"""
    a = _finite_list("scores_a", scores_a)
    b = _finite_list("scores_b", scores_b)
    if len(a) != len(b):
        raise ValueError(f"scores_a has {len(a)} prompts, scores_b {len(b)}; a win-rate compares the same prompts")
    if not a:
        raise ValueError("win_rate needs at least one prompt")
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance}")
    wins = sum(x - y > tie_tolerance for x, y in zip(a, b))
    losses = sum(y - x > tie_tolerance for x, y in zip(a, b))
    ties = len(a) - wins - losses
    successes = wins + 0.5 * ties
    low, high = wilson_interval(successes, len(a), confidence)
    return WinRate(successes / len(a), low, high, wins, ties, losses, confidence)


# ---------------------------------------------------------------------------- degenerate completions

_WORD = re.compile(r"\S+")


def _is_periodic(s: str, max_unit: int, min_repeats: int) -> bool:
    """True when s is a unit of <= max_unit characters repeated >= min_repeats times (a
    partial last unit allowed): ':):):)', 'hahahaha', 'aaaaaa'."""
    for unit in range(1, max_unit + 1):
        if len(s) >= unit * min_repeats and all(s[i] == s[i % unit] for i in range(len(s))):
            return True
    return False


def is_degenerate(text: str, min_alnum_share: float = 0.5, max_unit: int = 4, min_repeats: int = 4,
                  max_word_share: float = 0.8, min_words: int = 4) -> bool:
    """True for a completion that says nothing. Rules, in order:

      1. empty or whitespace only;
      2. mostly symbols: under `min_alnum_share` of its non-space characters are letters or
         digits ('!!!!!!', '...?!', 'Great!!!!!!!!!!!!!', emoji strings, a lone ':)');
      3. a short unit repeated: with spaces removed, a unit of <= `max_unit` characters repeated
         >= `min_repeats` times (':):):):)', 'hahahaha', 'ha ha ha ha');
      4. one word repeated: at least `min_words` words of which one (case-folded) makes up
         >= `max_word_share` ('great great great great great').

    Deliberately NOT degenerate: text with real words among some symbols, e.g.
    '#DeflateGateHop!!!! Deflatedgrass...' (27 of its 35 non-space characters are letters).
    Whether such text games the reward is the gold judge's call; this detector only counts
    outputs that carry no content at all, so its share is a floor on reward hacking, not an
    estimate of it."""
    compact = "".join(text.split())
    if not compact:
        return True
    alnum = sum(ch.isalnum() for ch in compact)
    if alnum < min_alnum_share * len(compact):
        return True
    if _is_periodic(compact, max_unit, min_repeats):
        return True
    words = [w.casefold() for w in _WORD.findall(text)]
    if len(words) >= min_words and Counter(words).most_common(1)[0][1] >= max_word_share * len(words):
        return True
    return False


def degenerate_share(texts: Sequence[str], **rules) -> float:
    """Share of `texts` that `is_degenerate` flags (keyword `rules` go to it)."""
    if not texts:
        raise ValueError("degenerate_share needs at least one text")
    return sum(is_degenerate(t, **rules) for t in texts) / len(texts)


# ---------------------------------------------------------------------------- over-optimisation

def ls_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs (0.0 when all xs are equal)."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError(f"ls_slope needs two equal-length sequences of >= 2 points, got {n} and {len(ys)}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


@dataclass(frozen=True)
class OveroptimisationCheck:
    alarm: bool  # gold slope < -min_gold_drop and proxy slope > min_proxy_rise over the window
    proxy_slope: float  # per step, least squares over the window (nan: too few evaluations)
    gold_slope: float
    points: int  # evaluations in the window


def overoptimisation_check(steps: Sequence[float], proxy: Sequence[float], gold: Sequence[float], window: int,
                           min_proxy_rise: float = 0.0, min_gold_drop: float = 0.0) -> OveroptimisationCheck:
    """Rule: over the last `window` evaluations (steps[i], proxy[i], gold[i]), fit a
    least-squares line to proxy-vs-step and to gold-vs-step; the alarm fires when the proxy
    slope is > min_proxy_rise AND the gold slope is < -min_gold_drop (slopes are per step).
    This is Gao et al.'s over-optimisation signature: the reward model keeps improving while the
    true preference it stands for gets worse. Slopes over a window, not the last two points, so a
    single noisy evaluation neither fires nor hides it. With fewer than `window` evaluations
    there is no alarm (not enough evidence yet) and the slopes are nan. The thresholds default
    to 0; raise them to ignore drifts that are too small to matter at your score scale."""
    if not (len(steps) == len(proxy) == len(gold)):
        raise ValueError(f"steps ({len(steps)}), proxy ({len(proxy)}) and gold ({len(gold)}) must have one value per evaluation")
    if window < 3:
        raise ValueError(f"window must be >= 3 evaluations (a slope through 2 points is just their difference), got {window}")
    if len(steps) < window:
        return OveroptimisationCheck(False, math.nan, math.nan, len(steps))
    xs = [float(s) for s in steps[-window:]]
    p = _finite_list("proxy", proxy[-window:])
    g = _finite_list("gold", gold[-window:])
    proxy_slope, gold_slope = ls_slope(xs, p), ls_slope(xs, g)
    alarm = proxy_slope > min_proxy_rise and gold_slope < -min_gold_drop
    return OveroptimisationCheck(alarm, proxy_slope, gold_slope, window)


def overoptimisation_alarm(steps: Sequence[float], proxy: Sequence[float], gold: Sequence[float], window: int,
                           min_proxy_rise: float = 0.0, min_gold_drop: float = 0.0) -> bool:
    """True when the gold score falls while the proxy rises over the last `window`
    evaluations; see `overoptimisation_check` for the rule and the slopes."""
    return overoptimisation_check(steps, proxy, gold, window, min_proxy_rise, min_gold_drop).alarm


def gao_x(kl: float | Sequence[float]) -> float | list[float]:
    """sqrt(KL(pi || pi_ref)), the x axis on which Gao et al. 2022 plot proxy and gold reward
    (their d = sqrt(KL), along which gold reward is a simple function of d). Slightly negative
    KL values, which the k1 estimator gives from sampling noise, map to 0; NaN stays NaN."""
    if isinstance(kl, (int, float)):
        return math.sqrt(max(float(kl), 0.0)) if not math.isnan(kl) else math.nan
    return [gao_x(float(k)) for k in kl]
