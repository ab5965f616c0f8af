"""Online RLHF (feedback.mode=online): labeling, reward fitting and RL at the same time, as in
Christiano et al. 2017 ("Deep reinforcement learning from human preferences"): the policy
learns against the current reward model, its recent samples go to labelers, and the reward
model is refit on every comparison so far, continually. Three processes overlap:

  RL          the rl stage's loop, unchanged; its rollout thread (the only one that touches the
              rollout pool and the reward workers) also hot-swaps reward-model versions and
              makes queries, both here (`swap` before a step's scoring, `queries` after it);
  labeling    people at the labeling app the run serves (feedback.labeler human, feedback.serve)
              or the simulated labeler on a driver thread at feedback.latency_s / throughput;
  reward fit  tidal.driver.reward_learner.RewardLearner: its own actor and placement bundle.

Everything lives in RUN/feedback-online/ (tidal.feedback.store, tidal.feedback.lineage) and
RUN/reward_versions/v<k>/, so a run that ends or is resumed keeps every label; a resumed run
starts its reward workers and reward learner from the newest version.

Queries: each RL step makes feedback.query_rate tasks (until feedback.label_budget), each one
prompt of the step's batch with feedback.responses samples of the current policy (the step's
weights). queries=active samples candidates x as many and keeps those on which the ensemble of
the current version (tidal.learner.ensemble) disagrees most; random keeps the first. Each task
records why it was chosen (Task.meta).

A version change keeps the RL signal sound (docs/feedback.md#online-rlhf): the reward workers
swap between two scoring calls, so one step is scored by one version (its rollouts.jsonl rows
say which); reward.normalize=reference is re-measured on the same calibration samples of the
initial policy, so those keep scoring ~N(0, 1) under every version (running normalisation
starts over); the adaptive KL controller follows KL, which a swap does not move; the critic keeps
its weights and follows the new targets through its value loss (online/swap_shift says how far
the step's samples' reward moved at a swap, what the critic must absorb).
"""

from __future__ import annotations

import threading
from pathlib import Path

from tidal.common.config import TidalConfig
from tidal.driver.reward_learner import Published, RewardLearner

FOLDER = "feedback-online"  # the run's feedback store, in the rl stage's folder


def query_seed(cfg: TidalConfig, step: int) -> int:
    """Sampling seed of step `step`'s query candidates (apart from the step's own rollouts)."""
    return (cfg.seed * 1_000_003 + step * 7_919 + 2) & 0x7FFFFFFF


def plan_queries(fb, made: int, batch_size: int, have_ensemble: bool) -> tuple[int, int, bool]:
    """(tasks to make, candidate prompts to sample, active?) for one step: feedback.query_rate
    tasks until feedback.label_budget; active queries (once an ensemble exists) score
    feedback.candidates candidates per task, at most the step's batch."""
    n = max(0, min(fb.query_rate, fb.label_budget - made))
    active = fb.queries == "active" and have_ensemble
    return n, min(batch_size, n * fb.candidates if active else n), active


def choose(scores: list[float | None], valid: list[bool], n: int) -> list[int]:
    """Indices of the n tasks to ask: by disagreement, highest first (scores given), else in order;
    tasks that are not valid (fewer than two different responses) never."""
    order = [i for i in range(len(valid)) if valid[i]]
    if any(s is not None for s in scores):
        order.sort(key=lambda i: -scores[i])
    return order[:n]


class OnlineFeedback:
    """The online side of one rl stage (see the module doc)."""

    def __init__(self, cfg: TidalConfig, run_dir: Path, stage: str, reward_model: str, offline: list):
        from tidal.feedback import lineage
        from tidal.feedback.store import FeedbackStore

        self.cfg, self.run_dir, self.stage, self.offline = cfg, Path(run_dir), stage, offline
        self.store = FeedbackStore(self.run_dir / FOLDER, create=True)
        self.store.configure(min_reliability=cfg.feedback.min_reliability)
        versions = lineage.versions(self.store)
        if not versions:  # version 0: the reward model the stage starts with, fit on none of these labels
            lineage.record_version(self.store, 0, reward_model, [], [], {"policy_step": 0})
            versions = lineage.versions(self.store)
        self.version, self.path = versions[-1].version, versions[-1].path  # a resumed run goes on from the newest
        self.accuracy = versions[-1].meta.get("online_accuracy")
        self.made = sum(bool(t.meta and "selector" in t.meta) for t in self.store.tasks().values())
        self.ensemble = None
        self.parts = self.learner = self.server = None
        self.swaps, self.shift, self.asked = 0, 0.0, 0
        self._pending: Published | None = None
        self._last = None  # the last step's rollout (online/swap_shift)
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._labeler: threading.Thread | None = None
        self._labeler_error: BaseException | None = None
        self._closed = False

    # ------------------------------------------------------------------ life cycle

    def start(self, parts, policy_step) -> None:
        """After the RL parts are up (and a checkpoint restored): normalisation for the current
        version, labeling, and the reward learner."""
        self.parts = parts
        self._renormalise()  # a resumed run may score with a newer version than its checkpoint's
        self._start_labeling()
        self.learner = RewardLearner(self.cfg, self.run_dir, self.store, self.version, self.path, self.offline,
                                     self._publish, policy_step)
        self.learner.start()

    def close(self, take_newest: bool = False) -> dict:
        """Stop labeling and the reward learner (labels stay in the store); the stage's summary.
        `take_newest` (the loop has ended, the rollout thread is idle): a version published after
        the last step's swap goes into the reward workers now, so the evaluation, the summary and
        the next stage use the version fit on the most labels."""
        if not self._closed:
            self._closed = True
            self._stop.set()
            try:
                if self.learner is not None:
                    self.learner.close(finish=take_newest)
                if self._labeler is not None:
                    self._labeler.join(timeout=30)
                if self.server is not None:
                    self.server.close()
                if take_newest:
                    self.swap()  # before the rank stops: the version's weights are in its object store
            finally:
                if self.learner is not None:
                    self.learner.shutdown()
        return self.summary()

    def summary(self) -> dict:
        return {"reward_version": self.version, "final_reward_model": self.path, "tasks": self.made,
                "labels": len(self.store.labels()), "swaps": self.swaps, "online_accuracy": self.accuracy,
                "refits": self.learner.refits if self.learner else 0,
                "learner_restarts": self.learner.restarts if self.learner else 0}

    def check(self) -> None:
        """Re-raise what stopped the reward learner or the simulated labeler."""
        for error, who in ((self.learner and self.learner.error, "reward learner"),
                           (self._labeler_error, "simulated labeler")):
            if error:
                raise RuntimeError(f"online feedback: the {who} stopped: {type(error).__name__}: {error}") from error

    def _start_labeling(self) -> None:
        fb, folder = self.cfg.feedback, self.store.folder
        if fb.labeler == "simulated":
            from tidal.driver.collect import gold_judge
            from tidal.feedback.simulated import SimulatedLabeler

            labeler = SimulatedLabeler(gold_judge(self.cfg), fb.temperature, fb.error_rate, seed=self.cfg.seed)
            self._labeler = threading.Thread(target=self._label, args=(labeler,), name="tidal-labeler", daemon=True)
            self._labeler.start()
        elif fb.serve is not None:
            self.server = serve_app(self.store, fb.serve)
        else:
            print(f"tidal: online labeling in {folder}: serve it with `tidal label serve {folder}`; the run trains "
                  "on and refits the reward model as labels come in", flush=True)

    def _label(self, labeler) -> None:
        fb = self.cfg.feedback
        try:
            labeler.label_paced(self.store, self._stop, fb.latency_s, fb.throughput)
        except BaseException as e:  # noqa: BLE001 - the rollout thread re-raises it (check)
            self._labeler_error = e

    # ------------------------------------------------------------------ versions (rollout thread)

    def _publish(self, published: Published) -> None:
        """The reward learner's thread: a new version waits for the rollout thread's next `swap`."""
        with self._lock:
            if published.handle is None and published.version == self.version:
                self.ensemble = published.ensemble  # the starting version's ensemble
            else:
                self._pending = published

    def swap(self) -> int:
        """Before a step's scoring call: take the newest published version into every reward
        worker and re-measure the normalisation; returns the version that scores the step."""
        self.check()
        with self._lock:
            p, self._pending = self._pending, None
        if p is None:
            return self.version
        before = self._policy_score()
        model_pool(self.parts.reward).load_version(p.handle, p.path, p.reward_mean, p.reward_std)
        self.version, self.path, self.ensemble = p.version, p.path, p.ensemble
        self.accuracy = p.meta.get("online_accuracy", self.accuracy)
        self._renormalise()
        after = self._policy_score()
        self.shift = 0.0 if before is None or after is None else after - before
        self.swaps += 1
        print(f"tidal: reward workers now score with reward model v{p.version} ({p.path})", flush=True)
        return self.version

    def _renormalise(self) -> None:
        reward = self.parts.reward
        if reward.normalize == "reference" and self.parts.calibration is not None:
            reward.calibrate(reward.score(self.parts.calibration, raw=True))
        elif reward.normalize == "running":
            reward.running = type(reward.running)()

    def _policy_score(self) -> float | None:
        """The last step's samples' mean reward-model score, normalised as the reward is now."""
        reward = self.parts.reward
        if self._last is None or reward.normalize != "reference":
            return None
        mean, std = reward.reference
        return float(((reward.score(self._last, raw=True).raw_scores - mean) / (std or 1.0)).mean())

    # ------------------------------------------------------------------ queries (rollout thread)

    def queries(self, step: int, batch, rollout) -> dict[str, float]:
        """After a step's scoring: this step's labeling tasks (module doc); returns the step's
        online/* metrics."""
        self._last = rollout
        n, m, active = plan_queries(self.cfg.feedback, self.made, len(batch), self.ensemble is not None)
        self.asked = self._ask(step, batch.slice(0, m), n, active) if n > 0 else 0
        return self.metrics()

    def _ask(self, step: int, prompts, n: int, active: bool) -> int:
        from tidal.driver.heldout import eval_sampling
        from tidal.feedback.model import MIN_K, distinct

        fb = self.cfg.feedback
        cand = self.parts.pool.generate(prompts, eval_sampling(self.cfg, query_seed(self.cfg, step), n=fb.responses))
        tasks = candidate_tasks(self.parts.dataset, prompts, cand, fb.responses, f"{self.stage}:step-{step}")
        scores = self._disagreement(cand, len(prompts)) if active else [None] * len(tasks)
        picked = choose(scores, [len(distinct(t).responses) >= MIN_K for t in tasks], n)
        why = "active" if active else ("random" if fb.queries == "random" else "random: no ensemble yet")
        for rank, i in enumerate(picked):
            tasks[i] = _with_meta(tasks[i], {"selector": why, "disagreement": scores[i], "rank": rank,
                                             "candidates": len(tasks), "rl_step": step,
                                             "policy_version": cand.weight_version[i * fb.responses],
                                             "reward_version": self.version})
        ids = self.store.add_tasks([tasks[i] for i in picked], overlap_fraction=0.0 if fb.labeler == "simulated"
                                   else None, seed=self.cfg.seed + step, duplicates="drop")
        self.made += len(ids)
        return len(ids)

    def _disagreement(self, cand, m: int) -> list[float]:
        """(m,) the ensemble's disagreement on each candidate task, from the current version's trunk."""
        from tidal.reward_service.worker import RewardInput

        term = model_term(self.parts.reward)
        ids = [list(p) + list(r) for p, r in zip(cand.prompt_ids, cand.response_ids)] if term.use_token_ids else None
        feats = term.pool.features(RewardInput(list(cand.prompt_text), list(cand.response_text), ids,
                                               [f == "stop" for f in cand.finish_reason]))  # (m*K, H)
        return self.ensemble.disagreement(feats.view(m, -1, feats.shape[-1])).tolist()

    def metrics(self) -> dict[str, float]:
        """online/* of a step: the version that scored it, tasks and labels so far, the latest
        version's online accuracy, refits, restarts of the reward learner, the last swap's shift."""
        m = {"online/reward_version": float(self.version), "online/tasks": float(self.made),
             "online/queries": float(self.asked), "online/labels": float(len(self.store.labels())),
             "online/swaps": float(self.swaps), "online/swap_shift": self.shift,
             "online/refits": float(self.learner.refits if self.learner else 0),
             "online/learner_restarts": float(self.learner.restarts if self.learner else 0)}
        if self.accuracy is not None:
            m["online/online_accuracy"] = float(self.accuracy)
        return m


def candidate_tasks(dataset, prompts, cand, k: int, source: str) -> list:
    """One NewTask per prompt: its k samples (rows [i*k, (i+1)*k) of `cand`), each with its source
    and the weight version that wrote it; the prompt as the data file has it."""
    from tidal.feedback.store import NewTask, TaskResponse

    return [NewTask(dataset.records[row].prompt,
                    [TaskResponse(cand.response_text[r], source, str(cand.weight_version[r]))
                     for r in range(i * k, (i + 1) * k)])
            for i, row in enumerate(prompts.index)]


def _with_meta(task, meta: dict):
    import dataclasses

    return dataclasses.replace(task, meta=meta)


def model_term(reward):
    """The ModelReward of the reward's `model` term without a target: the one online refits."""
    from tidal.reward_service.combine import ModelReward

    terms = [t.fn for t in reward.terms if isinstance(t.fn, ModelReward) and t.target is None]
    if not terms:
        raise RuntimeError("online feedback needs a `model` reward term without a target (config check missed it)")
    return terms[0]


def model_pool(reward):
    return model_term(reward).pool


def serve_app(store, where: str):
    """The labeling app on HOST:PORT in a background thread; prints its URL."""
    from tidal.common.web import WebServer, is_loopback
    from tidal.feedback.app import build_app

    host, _, port = where.rpartition(":")
    if not is_loopback(host) and store.labeler_count() == 0:
        print(f"tidal: feedback.serve={where}: {store.folder} has no labeler tokens yet, so the app serves 127.0.0.1 "
              f"only; add labelers with `tidal label add-labeler {store.folder} NAME` before serving a network", flush=True)
        host = "127.0.0.1"
    server = WebServer(build_app(store), host, int(port), name="label-server").start()
    hint = "" if store.labeler_count() else f" (add labelers: `tidal label add-labeler {store.folder} NAME`)"
    print(f"tidal: labeling app on {server.url} for {store.folder}{hint}; the run trains on and refits the "
          "reward model as labels come in", flush=True)
    return server
