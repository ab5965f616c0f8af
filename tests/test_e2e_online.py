"""Online RLHF on the tiny model (feedback.mode=online): the policy trains while the simulated
labeler answers queries with a latency and the reward learner refits, so the three overlap:
reward-model versions are published and hot-swapped into the reward workers during the rl
stage, every scored sample records its version, labels keep arriving while the steps go on,
and a reward learner killed with SIGKILL in the middle of a fit comes back from its last
version and refits on every label (none lost). Then the same with people: a browser labels in
the app the run serves while it trains, and the run's next reward-model version is fit on
exactly those labels."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import pytest

from e2e_support import REPO, read_jsonl, tiny_overrides
from reward_fixtures import make_reward_model
from tidal.common.config import load_config
from tidal.driver.job import run_pipeline
from tidal.feedback import lineage
from tidal.feedback.store import FeedbackStore
from tidal.learner.group import LearnerGroup

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def online_overrides(tmp_path, name: str, rm: str, *extra: str) -> list[str]:
    return [o for o in tiny_overrides(tmp_path, name) if not o.startswith("reward.terms")] + [
        "stages.run=[rl]", f"model.reward={rm}", "reward.terms=[{kind: model}]", "algorithm.prompts_per_step=8",
        "algorithm.update_epochs=1", "logging.eval_samples=4", "learner.mini_batch_size=8",
        "learner.micro_batch_size=8", "stages.rm.max_steps=4", "stages.rm.lr=1e-3", "feedback.mode=online",
        "feedback.responses=2", "feedback.query_rate=2", "feedback.candidates=2", "feedback.ensemble=3",
        "feedback.gold=e2e_support:letter_rate", *extra]


@pytest.fixture(scope="module")
def rm0(tiny_model, tmp_path_factory):
    return str(make_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "rm0",
                                 extra={"reward_mean": 0.0, "reward_std": 1.0}))


def test_labels_refits_and_rl_overlap_and_a_killed_reward_learner_recovers_and_resumes(ray_cluster, tmp_path, rm0,
                                                                                       monkeypatch):
    """Labels, refits and RL steps overlap; the reward learner SIGKILLed mid-fit comes back from
    its last version without losing a label. Then the run, which ended and kept its store, is
    resumed for more steps: its reward workers and reward learner start from the newest version,
    every earlier label is still there, and the refits that follow are fit on them too."""
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", online_overrides(
        tmp_path, "online", rm0, "algorithm.steps=14", "feedback.latency_s=0.5", "feedback.refit_every=4"))
    killed: dict = {}
    real_fit = LearnerGroup.fit_reward

    def fit_then_die(self, train, held_out=None, **options):
        """The first refit's learner process gets SIGKILL a moment after the fit starts."""
        if self.role == "reward" and not killed:
            store = FeedbackStore(tmp_path / "online" / "feedback-online")
            killed.update(pid=self.describe()[0]["pid"], labels={lab.id for lab in store.labels()})
            threading.Timer(0.3, os.kill, (killed["pid"], signal.SIGKILL)).start()
        return real_fit(self, train, held_out, **options)

    monkeypatch.setattr(LearnerGroup, "fit_reward", fit_then_die)
    summary = run_pipeline(cfg, tmp_path / "online")
    run = tmp_path / "online"

    online = summary["online"]
    assert killed and online["learner_restarts"] == 1  # the SIGKILLed learner came back
    versions = lineage.versions(FeedbackStore(run / "feedback-online"))
    assert len(versions) >= 3 and online["reward_version"] == versions[-1].version  # v0 + two refits at least
    first = versions[1]  # fit by the restarted learner, from v0: every label there was at the kill
    assert killed["labels"] <= set(first.labels) | set(first.heldout)
    assert all(set(a.labels) <= set(b.labels) | set(b.heldout) for a, b in zip(versions[1:], versions[2:]))

    rows = read_jsonl(run / "rollouts.jsonl")  # every scored sample names the version that scored it
    assert all(len(r["reward_version"]) == len(r["score"]) for r in rows)
    seen = [r["reward_version"][0] for r in rows]
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] >= 1  # swapped during the stage, never back
    steps = [r for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "rl" and "online/labels" in r]
    labels = [r["online/labels"] for r in steps]
    assert labels == sorted(labels) and labels[0] < labels[-1]  # labels arrived while the steps went on
    swap_steps = [r["step"] for r in steps if r["online/swaps"] > steps[0]["online/swaps"]]
    assert swap_steps and swap_steps[0] < steps[-1]["step"]  # a version swapped in before the last step

    tasks = FeedbackStore(run / "feedback-online").tasks().values()
    assert online["tasks"] == len(tasks) and all(t.meta["selector"] in ("active", "random: no ensemble yet")
                                                 for t in tasks)
    assert any(t.meta["selector"] == "active" and t.meta["disagreement"] is not None for t in tasks)
    assert all(r.source.startswith("rl:step-") and r.version.isdigit() for t in tasks for r in t.responses)
    assert (run / "reward_versions" / f"v{versions[-1].version}" / "value_head.safetensors").is_file()

    from tidal.commands.train import train_from_cli

    labels = {lab.id for lab in FeedbackStore(run / "feedback-online").labels()}
    assert train_from_cli(None, ["algorithm.steps=22"], resume=str(run)) == 0  # `tidal train --resume RUN` extends
    summary = json.loads((run / "summary.json").read_text())
    store = FeedbackStore(run / "feedback-online")
    after = lineage.versions(store)
    assert labels <= {lab.id for lab in store.labels()}  # no label lost across the restart
    assert [v.labels for v in after[:len(versions)]] == [v.labels for v in versions] and len(after) > len(versions)
    assert labels <= set(after[-1].labels) | set(after[-1].heldout)  # refits after the resume use them too
    resumed = [r for r in read_jsonl(run / "rollouts.jsonl") if r["step"] > 14]
    assert resumed and resumed[0]["reward_version"][0] >= versions[-1].version  # not back to v0
    assert summary["online"]["reward_version"] == after[-1].version


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_browser_labels_while_an_online_run_trains(ray_cluster, tmp_path, rm0):
    from feedback_support import chromium_or_skip, quit_browser, wait_for
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = chromium_or_skip()
    port, run = _free_port(), tmp_path / "people"
    cfg = load_config(REPO / "configs" / "tiny_ppo.yaml", online_overrides(
        tmp_path, "people", rm0, "algorithm.steps=40", "feedback.labeler=human", f"feedback.serve=127.0.0.1:{port}",
        "feedback.refit_every=3", "feedback.label_budget=6", "feedback.heldout_share=0"))
    result: dict = {}
    trainer = threading.Thread(target=lambda: result.update(summary=run_pipeline(cfg, run)), daemon=True)
    trainer.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(url) or not trainer.is_alive(), timeout=600, what="the labeling app the run serves")
        assert trainer.is_alive(), "the run stopped before it served the labeling app"
        store = FeedbackStore(run / "feedback-online")  # the run made it: a person adds a labeler while it trains
        token = store.add_labeler("ann")
        store.configure(likert="off")
        driver.get(url + "/login")
        driver.find_element(By.ID, "token").send_keys(token)
        driver.find_element(By.ID, "login").click()
        sent = 0
        while sent < 3:  # three tasks, as they are made by the running policy
            driver.get(url + "/label")
            wait_for(lambda: driver.execute_script("return document.body.dataset.ready") == "1", what="the page")
            if not driver.find_elements(By.CSS_SELECTOR, "#responses > li"):
                threading.Event().wait(2)  # no task yet: the next rl step makes some
                continue
            items = driver.find_elements(By.CSS_SELECTOR, "#responses > li")
            driver.execute_script("arguments[0].focus()", items[-1])
            items[-1].send_keys(Keys.ARROW_UP)  # rank the last shown response above the one before it
            driver.find_element(By.ID, "submit").click()
            wait_for(lambda s=sent: len(store.labels()) > s, what="the label in the store")
            sent += 1
        browser_labels = {lab.id for lab in store.labels()}
        wait_for(lambda: len(lineage.versions(store)) > 1, timeout=600, what="a reward-model version fit on them")
    finally:
        quit_browser(driver)
        trainer.join(timeout=1200)
    assert "summary" in result, "the run did not finish"
    v1 = lineage.versions(store)[1]
    assert browser_labels <= set(v1.labels) and v1.meta["policy_step"] < 40  # fit on the page's labels mid-run
    assert result["summary"]["online"]["reward_version"] >= 1


def _up(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/login", timeout=2).status_code == 200
    except requests.RequestException:
        return False
