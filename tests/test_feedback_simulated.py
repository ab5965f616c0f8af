"""The simulated labeler: Plackett-Luce rankings over a gold judge with Bradley-Terry noise,
stored like a person's labels (idempotent), and exported in the rm stage's formats."""

from __future__ import annotations

import math

import pytest

from tidal.common.data import read_records
from tidal.feedback.export import write_export
from tidal.feedback.simulated import SimulatedLabeler
from tidal.feedback.store import FeedbackStore, NewTask, TaskResponse


def gold_by_length(prompts, completions):
    return [float(len(c)) for c in completions]


def test_noiseless_labeler_ranks_in_gold_order():
    lab = SimulatedLabeler(gold_by_length, temperature=0.0)
    assert lab.rank([0.3, 0.9, -1.0, 0.5]) == [2, 0, 3, 1]


def test_pairs_follow_the_bradley_terry_probability():
    lab = SimulatedLabeler(gold_by_length, temperature=0.5, seed=1)
    d, n = 0.4, 4000
    first_wins = sum(lab.rank([d, 0.0])[0] == 0 for _ in range(n)) / n
    assert first_wins == pytest.approx(1 / (1 + math.exp(-d / 0.5)), abs=0.03)  # sigmoid(0.8) = 0.69


def test_error_rate_one_ranks_at_random():
    lab = SimulatedLabeler(gold_by_length, temperature=0.0, error_rate=1.0, seed=3)
    firsts = [lab.rank([3.0, 2.0, 1.0]).index(0) for _ in range(600)]
    assert all(abs(firsts.count(i) / 600 - 1 / 3) < 0.07 for i in range(3))


def test_labels_every_task_once_and_exports_what_the_rm_stage_reads(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    store.add_tasks([NewTask(f"prompt {i}", [TaskResponse(t, "policy", "3") for t in ("a", "bbbb", "cc")])
                     for i in range(5)], overlap_fraction=0.0)
    lab = SimulatedLabeler(gold_by_length, temperature=0.0)
    assert lab.label(store) == 5 and lab.label(store) == 0  # again: nothing new, nothing twice
    labels = store.labels()
    assert len(labels) == 5 and all(lab_.ranking == [2, 0, 1] and lab_.labeler == "simulated" for lab_ in labels)
    write_export(store, tmp_path / "c.jsonl", "comparisons")
    comparisons = read_records(tmp_path / "c.jsonl", "comparisons")
    assert len(comparisons) == 5 * 3 and all(len(c.chosen) > len(c.rejected) for c in comparisons)
