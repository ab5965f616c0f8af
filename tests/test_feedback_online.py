"""Online RLHF's data side, without Ray: the store's lineage (task meta, reward-model versions,
schema 2 -> 3), labeler reliability from gold tasks and the weight it gives labels, soft labels
of overlap tasks, the newest-labels hold-out, the paced simulated labeler, the query choice,
and the config checks of feedback.mode=online."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
import torch

from tidal.common.config import ConfigError, load_config
from tidal.driver.collect import weighted
from tidal.driver.online import choose, plan_queries
from tidal.feedback import lineage
from tidal.feedback.online import comparison_records, label_set, split_newest
from tidal.feedback.simulated import SimulatedLabeler
from tidal.feedback.stats import reliability
from tidal.feedback.store import FeedbackStore, NewTask, TaskResponse
from tidal.learner.reward_model import preference_loss


def task(i: int, k: int = 2, gold=None, meta=None) -> NewTask:
    return NewTask(f"prompt {i}", [TaskResponse(f"r{i}." + "x" * j, "policy", "3") for j in range(k)], gold, meta)


def label(store, name: str, task_id: int, ranking: list[int]) -> int:
    who = store.labeler_id(name) or (store.add_labeler(name) and store.labeler_id(name))
    leased = store.next_task(who)
    assert leased is not None and leased.id == task_id, (name, task_id, leased)
    return store.submit(who, f"label-{name}-{task_id}", task_id, ranking)[0]


# ------------------------------------------------------------------ store lineage


def test_task_meta_and_reward_versions_round_trip(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    (tid,) = store.add_tasks([task(0, meta={"selector": "active", "disagreement": 0.25})], overlap_fraction=0)
    t = store.tasks()[tid]
    assert t.meta == {"selector": "active", "disagreement": 0.25} and t.created_at > 0
    a = label(store, "ann", tid, [1, 0])
    lineage.record_version(store, 0, "rm0", [], [], {"policy_step": 0})
    lineage.record_version(store, 1, "rm1", [a], [], {"online_accuracy": 0.75, "policy_step": 3})
    v = lineage.versions(store)
    assert [x.version for x in v] == [0, 1] and v[1].labels == [a] and v[1].meta["online_accuracy"] == 0.75
    rows = lineage.per_version(store)
    assert rows[1]["new_labels"] == 1 and rows[1]["policy_step"] == 3 and rows[1]["labels_per_min"] > 0


def test_a_version_2_store_gains_task_meta_and_the_versions_table(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    store.add_tasks([task(0)])
    db = sqlite3.connect(store.path)  # make it a version-2 file: no meta column, no versions table
    db.executescript("ALTER TABLE tasks DROP COLUMN meta; DROP TABLE reward_versions; "
                     "UPDATE meta SET value='2' WHERE key='schema_version';")
    db.close()
    store = FeedbackStore(tmp_path / "fb")
    assert store.tasks()[1].meta is None and lineage.versions(store) == []
    store.add_tasks([task(1, meta={"selector": "random"})])
    assert store.tasks()[2].meta == {"selector": "random"} and store.integrity_check() == "ok"


# ------------------------------------------------------------------ reliability and soft labels


def graded_store(tmp_path, bad_tasks: int = 3):
    """Gold task 1 (response 1 is better); 'good' ranks it right, 'bad' reversed. Then non-gold
    tasks: one both label, opposite ways, and `bad_tasks` that only 'bad' labels (reversed:
    it prefers the shorter response, 'good' the longer)."""
    store = FeedbackStore(tmp_path / "fb", create=True)
    store.add_tasks([task(0, gold=[1, 0])])
    shared = store.add_tasks([task(1)], overlap_fraction=1.0)[0]  # wants two labels
    own = store.add_tasks([task(2 + i) for i in range(bad_tasks)], overlap_fraction=0.0)
    label(store, "good", 1, [1, 0])
    label(store, "bad", 1, [0, 1])
    label(store, "good", shared, [1, 0])
    label(store, "bad", shared, [0, 1])
    for tid in own:
        label(store, "bad", tid, [0, 1])
    return store


def test_reliability_from_gold_tasks(tmp_path):
    store = graded_store(tmp_path)
    r = reliability(store.labels(), store.tasks())
    assert r["good"] == {"gold_pairs": 1, "agreement": 1.0, "weight": 1.0, "dropped": False}
    assert r["bad"]["weight"] == 0.0 and r["bad"]["agreement"] == 0.0
    store.add_labeler("new")
    assert reliability(store.labels(), store.tasks()).get("new") is None  # no labels: not listed
    half = reliability(store.labels(), store.tasks(), min_reliability=1.0)
    assert half["good"]["dropped"] is False and half["bad"]["dropped"] is True


def test_an_ungraded_labeler_weighs_one_and_a_threshold_drops_it(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    (tid,) = store.add_tasks([task(0)])
    label(store, "ann", tid, [1, 0])
    assert reliability(store.labels(), store.tasks())["ann"]["weight"] == 1.0
    (pair,) = label_set(store).pairs
    assert (pair.p, pair.mass) == (0.0, 1.0)  # ann ranks response 1 first: p(response 0 above 1) = 0
    store.add_tasks([task(9, gold=[0, 1])])
    label(store, "ann", 2, [1, 0])  # wrong on gold: graded, weight 0
    assert reliability(store.labels(), store.tasks())["ann"]["weight"] == 0.0 and label_set(store).pairs == []


def test_the_reward_loss_weights_labels_by_reliability(tmp_path):
    """The unreliable labeler outnumbers the reliable one; with reliability the reward fit follows
    the reliable one, without it (every weight 1) the unreliable majority."""
    store = graded_store(tmp_path, bad_tasks=3)
    pairs = label_set(store).pairs
    shared = next(p for p in pairs if p.task_id == 2)
    assert shared.p == 0.0 and shared.mass == 1.0  # only 'good' counts: response 1 ('x' longer) wins
    assert len(pairs) == 1  # 'bad' weighs 0: its own tasks give no pair

    def fitted_slope(records) -> float:
        # reward = w * length: the sign of w says which labeler the fit followed
        lengths = torch.tensor([[len(r.chosen), len(r.rejected)] for r in records], dtype=torch.float32)
        weight = torch.tensor([r.weight for r in records])
        w = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.5)
        for _ in range(200):
            opt.zero_grad()
            preference_loss(w * lengths, torch.tensor([[0, 1]] * len(records)), "pairwise", weight).backward()
            opt.step()
        return float(w.detach())

    assert fitted_slope(comparison_records(pairs)) > 0.1  # longer is better: the reliable labeler's view
    unweighted = label_set(store, min_reliability=0.0)
    ignored = {k: {**v, "weight": 1.0} for k, v in unweighted.weights.items()}
    from tidal.feedback.online import soft_pairs

    labels, tasks = store.labels(), store.tasks()
    naive = [p for tid in sorted({lab.task_id for lab in labels if tasks[lab.task_id].gold_ranking is None})
             for p in soft_pairs(tasks[tid], [lab for lab in labels if lab.task_id == tid], ignored)]
    assert fitted_slope(comparison_records(naive)) < -0.1  # reliability ignored: the majority's (wrong) view


def test_overlap_disagreement_is_kept_as_a_soft_label(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    (tid,) = store.add_tasks([task(0, k=3)], overlap_fraction=1.0)
    label(store, "ann", tid, [0, 1, 2])
    label(store, "bob", tid, [2, 0, 0])  # disagrees on (0, 1) and (0, 2); ties (1, 2)
    pairs = {(p.a, p.b): p for p in label_set(store).pairs}
    texts = [r.text for r in store.tasks()[tid].responses]
    assert pairs[(texts[0], texts[1])].p == 0.5 and pairs[(texts[0], texts[1])].mass == pytest.approx(2 / 3)
    assert pairs[(texts[1], texts[2])].p == 1.0 and pairs[(texts[1], texts[2])].mass == pytest.approx(1 / 3)
    records = comparison_records([pairs[(texts[0], texts[1])]])
    assert [(r.chosen, r.rejected, r.weight) for r in records] == [(texts[0], texts[1], pytest.approx(1 / 3)),
                                                                   (texts[1], texts[0], pytest.approx(1 / 3))]


def test_the_newest_labeled_tasks_are_held_out_whole(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    ids = store.add_tasks([task(i) for i in range(5)], overlap_fraction=0.0)
    for tid in ids:
        label(store, "ann", tid, [0, 1])
    train, held = split_newest(label_set(store).pairs, 0.4)
    assert [p.task_id for p in held] == ids[3:] and [p.task_id for p in train] == ids[:3]
    assert split_newest(label_set(store).pairs, 0.0)[1] == []


def test_collect_exports_weigh_rows_by_reliability():
    rows = [{"labeler": "good", "weight": 0.5}, {"labeler": "bad", "weight": 0.5}, {"labeler": "new", "ranking": [0, 1]}]
    out = weighted(rows, {"good": 0.8, "bad": 0.0})
    assert out == [{"labeler": "good", "weight": 0.4}, {"labeler": "new", "ranking": [0, 1]}]


# ------------------------------------------------------------------ the simulated labeler online


def test_the_paced_simulated_labeler_keeps_its_latency_and_throughput(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True)
    store.add_tasks([task(i) for i in range(4)], overlap_fraction=0.0)
    stop = threading.Event()
    labeler = SimulatedLabeler(lambda p, c: [float(len(x)) for x in c], temperature=0.0)
    t = threading.Thread(target=labeler.label_paced, args=(store, stop, 0.4, 10.0, 0.05))
    t.start()
    deadline = time.time() + 30
    while len(store.labels()) < 4 and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    t.join(10)
    labels, tasks = store.labels(), store.tasks()
    assert len(labels) == 4 and all(lab.ranking == [1, 0] for lab in labels)
    assert all(lab.created_at >= tasks[lab.task_id].created_at + 0.4 for lab in labels)  # latency
    gaps = [b.created_at - a.created_at for a, b in zip(labels, labels[1:])]
    assert min(gaps) >= 0.1 - 1e-3  # at most 10 labels a second


# ------------------------------------------------------------------ queries and config


def test_choose_ranks_by_disagreement_and_skips_tasks_without_two_responses():
    assert choose([0.1, 0.9, 0.5, 0.7], [True, True, True, False], 2) == [1, 2]
    assert choose([None] * 4, [True, False, True, True], 2) == [0, 2]


def test_a_step_asks_query_rate_tasks_until_the_budget_from_candidates_times_as_many():
    fb = load_config(None, ["feedback.query_rate=3", "feedback.label_budget=10", "feedback.candidates=4"]).feedback
    assert plan_queries(fb, made=0, batch_size=16, have_ensemble=True) == (3, 12, True)
    assert plan_queries(fb, made=8, batch_size=16, have_ensemble=True) == (2, 8, True)  # 2 left in the budget
    assert plan_queries(fb, made=10, batch_size=16, have_ensemble=True)[0] == 0
    assert plan_queries(fb, made=0, batch_size=8, have_ensemble=True) == (3, 8, True)  # at most the step's batch
    assert plan_queries(fb, made=0, batch_size=16, have_ensemble=False) == (3, 3, False)  # no ensemble yet
    rnd = load_config(None, ["feedback.queries=random", "feedback.query_rate=3"]).feedback
    assert plan_queries(rnd, made=0, batch_size=16, have_ensemble=True) == (3, 3, False)


def test_online_config_checks():
    with pytest.raises(ConfigError, match="drop collect"):
        load_config(None, ["feedback.mode=online", "stages.run=[rm,rl,collect,rm,rl]"])
    with pytest.raises(ConfigError, match="kind: model"):
        load_config(None, ["feedback.mode=online", "reward.terms=[{kind: sentiment}]"])
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_config(None, ["feedback.serve=localhost"])
    assert load_config(None, ["feedback.mode=online", "feedback.serve='[::1]:0'"]).feedback.serve == "[::1]:0"
    assert load_config(None, ["feedback.serve="]).feedback.serve is None


# ------------------------------------------------------------------ the rollout side of a step


class OnlineStandIn:
    """OnlineFeedback's two calls on the rollout thread: each swap publishes a new version."""

    def __init__(self):
        self.version, self.asked = 0, []

    def swap(self) -> int:
        self.version += 1
        return self.version

    def queries(self, step, batch, rollout) -> dict:
        self.asked.append((step, list(batch.index), list(rollout.prompt_index)))
        return {"online/reward_version": float(self.version)}


def test_one_reward_model_version_scores_a_step_of_many_sampling_rounds(tmp_path):
    """Dynamic sampling scores a step in several rounds; a version swaps in once, before all of
    them, so one version scores the step (and rollouts.jsonl names it), and the step's queries
    come from its first round's prompts."""
    from test_driver_dynamic_sampling import Reward, _loop

    loop = _loop(tmp_path, Reward(flat=set(range(0, 1000, 2))), "algorithm.dynamic_sampling=true")
    loop.online = online = OnlineStandIn()
    p = loop._produce(0)
    assert p.metrics["sampling/rounds"] >= 2 and online.version == 1
    assert online.asked == [(0, list(range(8)), [i for i in range(8) for _ in range(4)])]
    loop._record_rollout(0, p)
    (row,) = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert row["reward_version"] == [1] * len(p.batch.rollout)


def test_preflight_counts_the_reward_learners_cpus():
    from tidal.actors.placement import plan_placement, role_counts
    from tidal.driver.checks import check_cluster
    from tidal.driver.preflight import PreflightError

    rounds = load_config(None, ["stages.run=[rl]"])
    need = plan_placement(rounds, role_counts(rounds, reference=True)).total_cpus
    check_cluster(load_config(None, ["stages.run=[rl]", f"cluster.num_cpus={need:g}"]))  # enough for rounds
    with pytest.raises(PreflightError, match="reward learner"):
        check_cluster(load_config(None, ["stages.run=[rl]", f"cluster.num_cpus={need:g}", "feedback.mode=online"]))
