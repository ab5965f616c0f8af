"""Rule rewards: plain functions that share one signature.

    rule(prompts: list[str], completions: list[str], **meta) -> list[float]

`meta` carries what a rule may need beyond the text:
  references        list[str | None]  reference answer per sample (the `match` rule needs it)
  response_lengths  list[int] | None  response length in policy tokens (None: count words)
  target            str | None        the term's `target` setting (match mode, length target)
  token_ids         list[list[int]] | None  prompt + response ids of the rollout (None for bare text)
  ended             list[bool] | None  response ended with EOS (None for bare text)
A rule ignores the meta keys it does not use, so user functions written for this signature
(`kind: function`, target 'module:function') receive the same keys.
"""

from __future__ import annotations

import importlib
import re
import string
from collections import Counter
from typing import Callable

RuleFn = Callable[..., list[float]]

_PUNCT = str.maketrans("", "", string.punctuation)


def sentiment(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """VADER compound score of each completion, in [-1, 1] (the prompt is not scored)."""
    from tidal.common.sentiment import vader_score

    return [float(s) for s in vader_score(completions)]


def _normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: 'Paris.' and ' paris' agree."""
    return " ".join(text.lower().translate(_PUNCT).split())


def exact_match(completion: str, reference: str) -> float:
    return float(_normalize_answer(completion) == _normalize_answer(reference))


def overlap_f1(completion: str, reference: str) -> float:
    """Harmonic mean of unigram precision and recall (multiset overlap of normalized words).

    Two empty answers agree (1.0); one empty answer against a non-empty one scores 0.0."""
    pred, ref = _normalize_answer(completion).split(), _normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_MATCH_MODES = {"exact": exact_match, "overlap": overlap_f1}


def match(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """Agreement with the reference answer: target 'exact' (default; 1 or 0 after normalizing
    case, punctuation and spaces) or 'overlap' (unigram F1 in [0, 1])."""
    mode = meta.get("target") or "exact"
    if mode not in _MATCH_MODES:
        raise ValueError(f"match reward: target {mode!r} is not a mode; use 'exact' or 'overlap'.")
    references = meta.get("references") or []
    if len(references) != len(completions):
        raise ValueError(
            f"match reward needs one reference answer per completion: got {len(references)} references "
            f"for {len(completions)} completions. Give the prompts a 'reference' field.")
    scores = []
    for i, (completion, reference) in enumerate(zip(completions, references)):
        if reference is None:
            raise ValueError(f"match reward: sample {i} has no reference answer; every prompt needs a 'reference' field.")
        scores.append(_MATCH_MODES[mode](completion, reference))
    return scores


def length(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """-|n - target| / target: 0 at the target length, -1 for an empty response or one twice
    as long. n is the response length in policy tokens when known, else in words."""
    target = meta.get("target")
    try:
        target_len = float(target)
    except (TypeError, ValueError):
        target_len = 0.0
    if not target_len > 0:
        raise ValueError(f"length reward: target must be a positive length in tokens, e.g. target: '32' (got {target!r}).")
    lengths = meta.get("response_lengths")
    if lengths is None:
        lengths = [len(c.split()) for c in completions]
    if len(lengths) != len(completions):
        raise ValueError(f"length reward: {len(lengths)} response lengths for {len(completions)} completions.")
    return [-abs(n - target_len) / target_len for n in lengths]


# The registry: every entry has the rule signature above.
RULES: dict[str, RuleFn] = {"sentiment": sentiment, "match": match, "length": length}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_function(import_path: str) -> RuleFn:
    """The user reward function at 'package.module:function', with errors that say which part failed."""
    if not isinstance(import_path, str) or not _IMPORT_PATH.match(import_path):
        raise ValueError(
            f"reward function {import_path!r}: expected an import path 'package.module:function' "
            f"(e.g. target: 'my_rewards:brevity').")
    module_name, attr = import_path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward function {import_path!r}: cannot import module {module_name!r} ({e}). "
            f"Make it importable (install it or add its folder to PYTHONPATH).") from e
    except SyntaxError as e:
        raise ValueError(f"reward function {import_path!r}: {e.filename}:{e.lineno}: syntax error ({e.msg}); fix the "
                         f"module.") from None
    except Exception as e:  # noqa: BLE001 - whatever the module's own code raised while it was imported
        raise ValueError(f"reward function {import_path!r}: importing module {module_name!r} raised "
                         f"{type(e).__name__}: {e}; fix the module.") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {import_path!r}: module {module_name!r} has no attribute {attr!r}.")
    if not callable(fn):
        raise ValueError(f"reward function {import_path!r}: {attr!r} is a {type(fn).__name__}, not a callable.")
    return fn


# What `tidal reward template` prints: a module a user saves, edits and names in the config.
TEMPLATE = '''"""My reward for tidal. Save as my_rewards.py in a folder on PYTHONPATH (e.g. the one you run
tidal from, as `PYTHONPATH=. tidal train ...`; see docs/rewards.md) and add to the config:

    reward:
      terms:
        - {kind: function, target: "my_rewards:score", weight: 1.0}

Check it before a run: `tidal config show CONFIG --check` imports it and checks the signature.
"""


def score(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """One finite float per completion (higher is better). tidal calls it with a batch:

    prompts[i]          the prompt text of sample i (after the chat template, if one is used)
    completions[i]      the policy's response to it (without the prompt)
    meta["references"]  reference answer per sample (a prompts row's `reference`), or None each
    meta["response_lengths"]  response length in policy tokens, or None
    meta["ended"]       whether each response ended with EOS, or None
    meta["token_ids"]   prompt + response token ids per sample, or None
    meta["target"]      the term's `target` string
    Keep **meta: tidal may pass more keys later. A NaN or inf score stops the run (or drops
    the sample with reward.on_invalid=drop).
    """
    return [float(len(set(c.split()))) / (1 + len(c.split())) for c in completions]  # e.g. word variety
'''
