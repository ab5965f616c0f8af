"""Toy rule rewards for the end-to-end tests (importable as `e2e_rewards:NAME` with tests/ on the
path). They give a dense signal that a tiny random policy can climb in a few steps."""

from __future__ import annotations


def letter_rate(prompts: list[str], completions: list[str], **meta) -> list[float]:
    """Share of the completion's characters that are the letter in `target` (default 'e'), x10."""
    letter = (meta.get("target") or "e")[0]
    return [10.0 * sum(ch == letter for ch in c) / max(len(c), 1) for c in completions]
