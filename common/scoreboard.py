"""Scoreboard statistics: win-rate with an interval, degenerate completions, over-optimisation.

Pure Python (no torch), so `tidal eval`, the RL loop's monitor and plots can all use it.

  win_rate(a, b)            pairwise win-rate of policy A over B on the same prompts, ties half,
                            with a 95% Wilson score interval
  is_degenerate(text)       empty, mostly symbols, or one token / short unit repeated
  degenerate_share(texts)   the share of degenerate completions
  overoptimisation_check / overoptimisation_alarm
                            gold falling significantly while the proxy rises (least-squares slopes
                            over a window, a one-sided t test over the prompts' own slopes)
  slope_p_value, student_t_cdf  that test
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


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom, through the regularized
    incomplete beta function: P(|T| > |t|) = I_x(df / 2, 1 / 2) with x = df / (df + t^2)."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 0.0 if t < 0 else 1.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t < 0 else 1.0 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (Lentz's method, as in
    Press et al., Numerical Recipes, section 6.4), on the side where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * frac / a


def slope_p_value(xs: Sequence[float], per_prompt: Sequence[Sequence[float]]) -> float:
    """One-sided p-value that the scores fall along xs: per_prompt[t][i] is prompt i's score at
    xs[t] (the same prompts, in the same order, at every t). Each prompt's own least-squares
    slope is one observation; their mean is the slope of the mean score, and a one-sample t
    test (df = prompts - 1) asks whether it is below 0. The spread of the prompts' slopes is
    the sampling noise of the evaluation, so a fall this test calls significant is not the
    luck of which completions were drawn. 1.0 with fewer than two prompts (no evidence);
    0.0 when every prompt fell by the same amount (no spread, a certain fall)."""
    n = len(per_prompt[0])
    if any(len(row) != n for row in per_prompt):
        raise ValueError(f"every evaluation must score the same prompts, got {[len(r) for r in per_prompt]} scores")
    slopes = [ls_slope(xs, [row[i] for row in per_prompt]) for i in range(n)]
    if n < 2:
        return 1.0
    mean = sum(slopes) / n
    sd = math.sqrt(sum((b - mean) ** 2 for b in slopes) / (n - 1))
    if sd <= 1e-12 * max(1.0, abs(mean)):
        return 0.0 if mean < 0 else 1.0
    return student_t_cdf(mean / (sd / math.sqrt(n)), n - 1)


@dataclass(frozen=True)
class OveroptimisationCheck:
    alarm: bool  # proxy up, gold down significantly (p <= alpha) and by at least min_gold_drop
    proxy_slope: float  # per step, least squares over the window (nan: too few evaluations)
    gold_slope: float
    points: int  # evaluations in the window
    gold_drop: float = math.nan  # fall of the fitted gold line from the window's first step to its last
    p_value: float = math.nan  # one-sided p-value of the gold fall (slope_p_value)


def overoptimisation_check(steps: Sequence[float], proxy: Sequence[float], gold: Sequence[Sequence[float]],
                           window: int, alpha: float = 0.01, min_gold_drop: float = 0.0,
                           min_proxy_rise: float = 0.0) -> OveroptimisationCheck:
    """Rule: over the last `window` evaluations (steps[i], mean proxy[i], per-prompt gold[i]),
    fit least-squares lines to proxy-vs-step and gold-vs-step; the alarm fires when the proxy
    slope is > min_proxy_rise, the gold slope is negative with a one-sided p-value <= alpha
    (`slope_p_value` over the prompts' own slopes) and the fitted gold line falls by at least
    min_gold_drop across the window (gold score units). This is Gao et al.'s over-optimisation
    signature: the reward model keeps improving while the true preference it stands for gets
    worse. The sign of a slope alone is a coin flip when gold is flat and noisy (half of all
    evaluations would alarm); the test asks that the fall be larger than the spread between
    prompts says chance could make it, and min_gold_drop that it be large enough to matter.
    alpha=1 switches the test off. With fewer than `window` evaluations there is no alarm (not
    enough evidence yet) and the slopes are nan."""
    if not (len(steps) == len(proxy) == len(gold)):
        raise ValueError(f"steps ({len(steps)}), proxy ({len(proxy)}) and gold ({len(gold)}) must have one value per evaluation")
    if window < 3:
        raise ValueError(f"window must be >= 3 evaluations (a slope through 2 points is just their difference), got {window}")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if len(steps) < window:
        return OveroptimisationCheck(False, math.nan, math.nan, len(steps))
    xs = [float(s) for s in steps[-window:]]
    per_prompt = [_finite_list("gold", g) for g in gold[-window:]]
    p = _finite_list("proxy", proxy[-window:])
    proxy_slope = ls_slope(xs, p)
    gold_slope = ls_slope(xs, [sum(g) / len(g) for g in per_prompt])
    drop = -gold_slope * (xs[-1] - xs[0])
    p_value = slope_p_value(xs, per_prompt)
    alarm = proxy_slope > min_proxy_rise and gold_slope < 0 and p_value <= alpha and drop >= min_gold_drop
    return OveroptimisationCheck(alarm, proxy_slope, gold_slope, window, drop, p_value)


def overoptimisation_alarm(steps: Sequence[float], proxy: Sequence[float], gold: Sequence[Sequence[float]],
                           window: int, alpha: float = 0.01, min_gold_drop: float = 0.0,
                           min_proxy_rise: float = 0.0) -> bool:
    """True when the gold score falls significantly while the proxy rises over the last
    `window` evaluations; see `overoptimisation_check` for the rule."""
    return overoptimisation_check(steps, proxy, gold, window, alpha, min_gold_drop, min_proxy_rise).alarm


def gao_x(kl: float | Sequence[float]) -> float | list[float]:
    """sqrt(KL(pi || pi_ref)), the x axis on which Gao et al. 2022 plot proxy and gold reward
    (their d = sqrt(KL), along which gold reward is a simple function of d). Slightly negative
    KL values, which the k1 estimator gives from sampling noise, map to 0; NaN stays NaN."""
    if isinstance(kl, (int, float)):
        return math.sqrt(max(float(kl), 0.0)) if not math.isnan(kl) else math.nan
    return [gao_x(float(k)) for k in kl]
