"""The feedback store, its statistics and exports without a server: exports read back with
tidal.common.data and build a K-wise preference batch unchanged; assignment and leases; the
agreement figures on hand-worked cases; the `tidal label` commands' user errors."""

import json
import math

import pytest
import torch

from tidal.commands.cli import main
from tidal.common.data import ComparisonRecord, RankingRecord, read_records
from tidal.feedback import export, stats
from tidal.feedback.store import Conflict, FeedbackError, FeedbackStore, Label, NewTask, Settings, Task, TaskResponse


def _task(i: int, k: int = 3, gold=None) -> NewTask:
    return NewTask(f"prompt {i}", [TaskResponse(f"response {i}.{j}", f"model{j}", "v1") for j in range(k)], gold)


def test_kendall_tau_and_pairwise_agreement_by_hand():
    assert stats.kendall_tau([0, 1, 2], [0, 1, 2]) == 1.0
    assert stats.kendall_tau([0, 1, 2], [2, 1, 0]) == -1.0
    # one of three pairs swapped: agreement 2/3, tau (2 - 1) / 3
    assert stats.pairwise_agreement([0, 1, 2], [1, 0, 2]) == pytest.approx(2 / 3)
    assert stats.kendall_tau([0, 1, 2], [1, 0, 2]) == pytest.approx(1 / 3)
    # K = 4, rankings (0 1 2 3) vs (0 2 1 3)... as rank lists; pairs: 6, one discordant
    assert stats.kendall_tau([0, 1, 2, 3], [0, 2, 1, 3]) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="different lengths"):
        stats.pairwise_agreement([0, 1], [0, 1, 2])


def test_agreement_per_labeler_and_gold():
    tasks = {1: Task(1, "p", [TaskResponse("a"), TaskResponse("b"), TaskResponse("c")], 3),
             2: Task(2, "g", [TaskResponse("x"), TaskResponse("y")], 1, gold_ranking=[0, 1])}
    lab = lambda i, who, task, ranking: Label(i, f"s{i}", task, who, None, ranking, None, None, None, 0.0)  # noqa: E731
    labels = [lab(1, "ann", 1, [0, 1, 2]), lab(2, "bob", 1, [0, 1, 2]), lab(3, "cy", 1, [2, 1, 0]),
              lab(4, "ann", 2, [0, 1]), lab(5, "bob", 2, [1, 0]),
              Label(6, "s6", 1, "dee", "cannot judge", None, None, None, None, 0.0)]
    a = stats.agreement(labels, tasks)
    # pairs: ann-bob 1.0, ann-cy 0.0, bob-cy 0.0 (agreement); tau 1, -1, -1
    assert a["pairs"] == 3 and a["agreement"] == pytest.approx(1 / 3) and a["tau"] == pytest.approx(-1 / 3)
    assert a["per_labeler"]["ann"] == {"pairs": 2, "agreement": 0.5, "tau": 0.0}
    assert a["per_labeler"]["cy"]["agreement"] == 0.0 and "dee" not in a["per_labeler"]
    g = stats.gold_agreement(labels, tasks)
    assert g["per_labeler"]["ann"]["agreement"] == 1.0 and g["per_labeler"]["bob"]["tau"] == -1.0
    assert g["agreement"] == 0.5
    d = stats.distributions(labels, ("f1",))
    assert d["responses"] == 3 * 3 + 2 * 2 and d["skips"] == {"cannot judge": 1}


def test_assignment_leases_overlap_and_gold_first(tmp_path):
    store = FeedbackStore(tmp_path / "fb", create=True, settings=Settings(overlap_fraction=0.0, lease_s=3600))
    ids = store.add_tasks([_task(0), _task(1)])
    gold = store.add_tasks([_task(2, gold=[2, 1, 0])])[0]
    both = store.add_tasks([_task(3)], overlap_fraction=1.0)[0]  # goes to two labelers
    ann, bob, cy = (store.login(store.add_labeler(n))[0] for n in ("ann", "bob", "cy"))
    ann, bob, cy = (store.session(s)["labeler_id"] for s in (ann, bob, cy))
    assert store.next_task(ann).id == gold  # onboarding: gold tasks first, for everyone
    assert store.next_task(ann).id == gold  # the lease holds until it is labeled
    store.submit(ann, "ann-gold-1", gold, [2, 1, 0], [1, 4, 7], [[], [], []])
    assert store.next_task(bob).id == gold
    store.submit(bob, "bob-skip-1", gold, skip_reason="cannot judge")
    assert store.next_task(cy).id == gold  # a skip by bob does not use it up for cy
    store.submit(cy, "cy-gold-01", gold, [1, 2, 0])
    seen = {}
    for who in (ann, bob, cy):
        seen[who] = store.next_task(who).id
    # leases keep them apart on single-label tasks; only the overlap task may be shared
    assert sorted(seen.values()) == sorted([ids[0], ids[1], both])
    for who, task in seen.items():
        store.submit(who, f"submission-{who}-{task}", task, [0, 1, 2])
    nxt = {who: store.next_task(who) for who in (ann, bob, cy)}
    holder = next(w for w, t in seen.items() if t == both)
    assert nxt[holder] is None or nxt[holder].id != both  # never the same task twice
    assert sum(t is not None and t.id == both for t in nxt.values()) == 1  # its second label
    with pytest.raises(FeedbackError, match="already labeled by you"):
        store.submit(holder, "another-id-1", both, [0, 1, 2])
    with pytest.raises(FeedbackError, match="'ranking': expected a permutation"):
        store.submit(ann, "bad-rank-1", ids[1], [0, 0, 1])
    with pytest.raises(FeedbackError, match="unknown flags"):
        store.submit(ann, "bad-flag-1", ids[1], [0, 1, 2], flags=[["nope"], [], []])
    assert store.submit(holder, f"submission-{holder}-{both}", both, [0, 1, 2]) == (store.labels()[-1].id, False)


def test_exports_read_back_and_build_a_kwise_batch(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from tidal.learner.reward_model import build_preference_batch

    store = FeedbackStore(tmp_path / "fb", create=True)
    ids = store.add_tasks([_task(i, k=4) for i in range(3)] + [_task(9, k=4, gold=[0, 1, 2, 3])], overlap_fraction=0.0)
    ann = store.session(store.login(store.add_labeler("ann"))[0])["labeler_id"]
    rankings = {ids[0]: [3, 1, 0, 2], ids[1]: [0, 0, 2, 3], ids[3]: [0, 1, 2, 3]}  # ids[1]: a tie for best
    while (task := store.next_task(ann)) is not None:  # the gold task first, then in id order
        if task.id == ids[2]:
            store.submit(ann, "sub-skip-01", ids[2], skip_reason="broken prompt")
        else:
            store.submit(ann, f"sub-{task.id:06d}", task.id, rankings[task.id], [4, 5, 6, 7], [[], ["made-up facts"], [], []])

    out = tmp_path / "rankings.jsonl"
    assert export.write_export(store, out, "rankings") == 2  # the skip and the gold task are left out
    records = read_records(out, "rankings")
    assert records == export.ranking_records(store)
    assert records[0] == RankingRecord("prompt 0", [f"response 0.{j}" for j in range(4)], [3, 1, 0, 2])
    row = json.loads(out.read_text().splitlines()[0])
    assert row["sources"] == ["model0", "model1", "model2", "model3"] and row["versions"] == ["v1"] * 4
    with pytest.raises(FileExistsError):
        export.write_export(store, out, "rankings")
    assert export.write_export(store, tmp_path / "gold.jsonl", "rankings", include_gold=True) == 3

    assert records[1].ranking == [0, 0, 2, 3]  # rankings keep the tie
    comp = tmp_path / "comparisons.jsonl"
    assert export.write_export(store, comp, "comparisons") == 2 * math.comb(4, 2) - 1  # the tied pair is no comparison
    pairs = read_records(comp, "comparisons")
    # rank 1 beats rank 3; each of a K = 4 ranking's 6 pairs weighs 1/6 (one comparison's weight in all)
    assert pairs[0] == ComparisonRecord("prompt 0", "response 0.1", "response 0.0", 1 / 6)
    assert pairs == export.comparison_records(store) and json.loads(comp.read_text().splitlines()[0])["weight"] == 1 / 6
    ratings = [json.loads(x) for x in export.to_jsonl(export.rating_rows(store)).splitlines()]
    assert len(ratings) == 8 and ratings[1]["flags"] == ["made-up facts"] and ratings[3]["likert"] == 7

    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = build_preference_batch(tok, records, max_prompt_tokens=16, max_response_tokens=16, use_chat_template=False)
    assert batch.ranks.tolist() == [[3, 1, 0, 2], [0, 0, 2, 3]]
    assert batch.input_ids.shape[0] == 2 * 4


def test_weighted_comparisons_train_as_the_rankings_do(tmp_path):
    """Rankings of different K exported as comparisons: with the export's 1 / C(K, 2) weights the
    reward model's weighted pairwise loss equals the InstructGPT ranking loss on the rankings
    (each prompt weighs the same), and DPO's pairs get the weights they get from the rankings."""
    from tidal.learner.dpo import preference_pairs
    from tidal.learner.losses import pairwise_reward_loss, ranking_reward_loss

    store = FeedbackStore(tmp_path / "fb", create=True)
    ids = store.add_tasks([_task(0, k=4), _task(1, k=2)], overlap_fraction=0.0)
    ann = store.session(store.login(store.add_labeler("ann"))[0])["labeler_id"]
    ranking = {ids[0]: [2, 0, 3, 1], ids[1]: [1, 0]}
    for _ in ids:  # label what the store leases, as the page does
        task = store.next_task(ann)
        store.submit(ann, f"sub-task-{task.id:04d}", task.id, ranking[task.id])
    export.write_export(store, tmp_path / "r.jsonl", "rankings")
    export.write_export(store, tmp_path / "c.jsonl", "comparisons")
    rankings, comparisons = read_records(tmp_path / "r.jsonl", "rankings"), read_records(tmp_path / "c.jsonl", "comparisons")
    assert [c.weight for c in comparisons] == [1 / 6] * 6 + [1.0]
    score = {f"response {i}.{j}": 0.7 * j - 0.4 * i + 0.1 * j * j for i in range(2) for j in range(4)}  # any scores
    per_prompt = [ranking_reward_loss(torch.tensor([[score[r] for r in rec.responses]]), torch.tensor([rec.ranking]))
                  for rec in rankings]
    chosen, rejected = (torch.tensor([score[getattr(c, f)] for c in comparisons]) for f in ("chosen", "rejected"))
    weights = torch.tensor([c.weight for c in comparisons])
    torch.testing.assert_close(pairwise_reward_loss(chosen, rejected, weights), sum(per_prompt) / 2)
    assert abs(pairwise_reward_loss(chosen, rejected) - sum(per_prompt) / 2) > 1e-3  # unweighted, it is not
    from_rankings, _ = preference_pairs(rankings)
    assert sorted((p.chosen, p.rejected, p.weight) for p in from_rankings) == \
        sorted((c.chosen, c.rejected, c.weight) for c in comparisons)


def test_label_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": "q", "responses": ["only one"]}\n')
    assert main(["label", "add-tasks", str(tmp_path / "fb"), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tidal: label error: {bad}:2: field 'responses': 1 responses; a task needs 2 to 9"
    assert main(["label", "status", str(tmp_path / "none")]) == 2
    assert "no feedback store" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "responses": ["a", {"text": "b", "source": "sft", "version": "3"}]}\n')
    assert main(["label", "add-tasks", str(tmp_path / "fb"), str(good), "--flags", "too long; off topic"]) == 0
    assert FeedbackStore(tmp_path / "fb").settings.flags == ("too long", "off topic")
    assert main(["label", "add-labeler", str(tmp_path / "fb"), "ann"]) == 0
    assert "token " in capsys.readouterr().out
    assert main(["label", "add-labeler", str(tmp_path / "fb"), "ann"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["label", "serve", str(tmp_path / "none")]) == 2
    assert main(["label", "export", str(tmp_path / "fb"), str(good)]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    store = FeedbackStore(tmp_path / "fb")
    assert store.tasks()[1].responses[1] == TaskResponse("b", "sft", "3")
    ann = store.session(store.login(store.add_labeler("bob"))[0])["labeler_id"]
    assert store.next_task(ann).id == 1
    store.submit(ann, "submission-1", 1, [1, 0], flags=[["off topic"], []])
    with pytest.raises(FeedbackError, match="before labeling starts"):
        store.set_flags(["something else"])


def test_serve_refuses_a_public_host_without_tokens(tmp_path, capsys):
    FeedbackStore(tmp_path / "fb", create=True)
    assert main(["label", "serve", str(tmp_path / "fb"), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_an_expired_lease_frees_the_task(tmp_path):
    import time

    store = FeedbackStore(tmp_path / "fb", create=True, settings=Settings(lease_s=0.3))
    (task,) = store.add_tasks([_task(0)], overlap_fraction=0.0)
    ann, bob = (store.session(store.login(store.add_labeler(n))[0])["labeler_id"] for n in ("ann", "bob"))
    assert store.next_task(ann).id == task
    assert store.next_task(bob) is None  # leased to ann
    assert store.counts()["leased"] == 1
    time.sleep(0.4)
    assert store.next_task(bob).id == task  # ann walked away; the task goes on
    # ann's late label is refused: bob holds the task now, and it wants one label
    with pytest.raises(Conflict, match="lease on task 1 ran out and the task went to another labeler"):
        store.submit(ann, "late-label-1", task, [0, 1, 2])
    assert store.submit(bob, "bobs-label-1", task, [0, 1, 2])[1] is True
    assert store.progress(bob) == {"done": 1, "open": 0}
    # a lapsed lease nobody took over still takes the label: nobody's work is thrown away
    (later,) = store.add_tasks([_task(1)], overlap_fraction=0.0)
    assert store.next_task(ann).id == later
    time.sleep(0.4)
    assert store.submit(ann, "late-label-2", later, [2, 1, 0])[1] is True
    assert [lab.labeler for lab in store.labels()] == ["bob", "ann"]
