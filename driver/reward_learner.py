"""Online RLHF's reward learner: refits the reward model on every label so far while RL trains.

One DeepSpeed rank of role reward (tidal.learner.group.LearnerGroup) on a placement group of its
own (one bundle; on a GPU cluster its own GPU), driven from a driver thread, so its fits run in
their own process beside the policy's learners, the rollout pool and the reward workers. A refit
starts when feedback.refit_every labels arrived since the last version:

  1. the store's labels as soft pairs weighted by labeler reliability (tidal.feedback.online),
     the newest feedback.heldout_share of the labeled tasks held out;
  2. a warm-started fit (the rank keeps its weights and optimizer between refits) on the pairs,
     then feedback.old_data of the offline comparisons (labels first: stages.rm.max_steps caps
     what one refit sees), pairwise loss, stages.rm's lr, epochs and max_steps;
  3. the online accuracy: the new version on the held-out newest pairs, which no fit has seen;
  4. the ensemble (tidal.learner.ensemble): bootstrap heads on the new trunk's features;
  5. publish: the folder RUN/reward_versions/v<k> (what a restarted worker or a resumed run
     loads), the weights through the object store as the policy's travel (what the reward
     workers hot-swap to), and the lineage row (tidal.feedback.lineage) naming the labels.

A reward learner that dies (kill -9, a lost node) is restarted from the last version's folder
and refits; the labels are in the store, so none is lost.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tidal.common.config import TidalConfig

POLL_S = 1.0  # how often the learner looks for new labels
MAX_RESTARTS = 3  # restarts of a dead reward learner within one refit before the run stops
ENSEMBLE_PAIRS = 512  # the most training pairs the ensemble heads are fit on


@dataclass(frozen=True)
class Published:
    """A reward-model version ready for the reward workers."""

    version: int
    path: str  # its folder
    handle: Any  # WeightHandle of its weights (None: the workers load the folder)
    reward_mean: float
    reward_std: float
    ensemble: Any  # tidal.learner.ensemble.Ensemble of this version, or None
    meta: dict


class RewardLearner:
    """The refit loop on a driver thread (see the module doc). `on_publish(Published)` hands each
    version (and the first ensemble of the starting one) to the RL side; `policy_step()` says
    which RL step is training now (recorded with each version)."""

    def __init__(self, cfg: TidalConfig, run_dir: Path, store, version: int, path: str, offline: list,
                 on_publish: Callable[[Published], None], policy_step: Callable[[], int]):
        # one rank: a reward model is small next to the policy, and its own bundle must stay small
        self.cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_workers=1))
        self.run_dir, self.store, self.offline = Path(run_dir), store, offline
        self.version, self.path = version, str(path)
        self.on_publish, self.policy_step = on_publish, policy_step
        self.group = None
        self.restarts = self.refits = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tidal-reward-learner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, finish: bool = False) -> None:
        """Stop refitting. `finish`: a fit in flight completes and publishes (the rank stays up
        until `shutdown`, so its published weights stay readable); else it is abandoned (its
        labels stay in the store for a resumed run) and the rank stops now."""
        self.stop.set()
        if not finish:
            self.shutdown()
        self._thread.join(timeout=self.cfg.cluster.sync_timeout_s if finish else 60)

    def shutdown(self) -> None:
        """Stop the rank; the weights it published through the object store go with it."""
        self._shutdown_group()

    def _run(self) -> None:
        try:
            self._recovering(self._publish_ensemble)  # the starting version's ensemble: active queries at once
            while not self.stop.is_set():
                if self._new_labels() >= self.cfg.feedback.refit_every:
                    self._recovering(self._refit)
                else:
                    self.stop.wait(POLL_S)
        except BaseException as e:  # noqa: BLE001 - the RL side re-raises it (OnlineFeedback.check)
            if not self.stop.is_set():
                self.error = e
            self._shutdown_group()

    def _recovering(self, work: Callable[[], None]) -> None:
        """`work`, restarting a dead reward learner from the last version up to MAX_RESTARTS times."""
        from tidal.learner.group import LearnerError

        for attempt in range(MAX_RESTARTS + 1):
            try:
                return work()
            except LearnerError as e:
                if self.stop.is_set():
                    return
                if attempt == MAX_RESTARTS:
                    raise
                self.restarts += 1
                print(f"tidal: reward learner lost ({e}); restarting it from reward model v{self.version} "
                      f"({self.path}); the labels are in the store", flush=True)
                self._shutdown_group()

    def _group(self):
        """The live reward learner, started from the last version's folder when there is none."""
        if self.group is None:
            from tidal.learner.group import LearnerGroup

            self.group = LearnerGroup(self.cfg, self.path, role="reward")
        return self.group

    def _shutdown_group(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            try:
                group.shutdown()
            except Exception as e:  # noqa: BLE001 - already gone
                print(f"tidal: while stopping the reward learner: {e}", flush=True)

    # ------------------------------------------------------------------ data

    def _new_labels(self) -> int:
        """Labels the last version has not been fit on or measured on."""
        from tidal.feedback import lineage
        from tidal.feedback.online import label_set

        seen = {i for v in lineage.versions(self.store) if v.version == self.version for i in v.labels + v.heldout}
        return len(label_set(self.store, self.cfg.feedback.min_reliability).label_ids - seen)

    def _data(self):
        """(train records, held-out records, train label ids, held-out label ids, the label set, how many
        of the train records are labels' rather than offline)."""
        from tidal.feedback.online import comparison_records, label_set, split_newest

        fb, rm, lc = self.cfg.feedback, self.cfg.stages.rm, self.cfg.learner
        labels = label_set(self.store, fb.min_reliability)
        train, held = split_newest(labels.pairs, fb.heldout_share)
        records = comparison_records(train) + self.offline[:int(len(self.offline) * fb.old_data)]
        if rm.max_steps is not None:  # the new labels first: what one refit can see
            records = records[:rm.max_steps * lc.mini_batch_size * rm.epochs]
        ids = lambda pairs: sorted({i for p in pairs for i in p.label_ids})  # noqa: E731
        return records, comparison_records(held), ids(train), ids(held), labels, len(comparison_records(train))

    def _batch(self, records):
        from tidal.common.models import load_tokenizer
        from tidal.learner.reward_model import build_preference_batch

        d = self.cfg.data
        return build_preference_batch(load_tokenizer(self.path), records, d.max_prompt_tokens, d.max_response_tokens,
                                      d.chat_template)

    # ------------------------------------------------------------------ fits

    def _refit(self) -> None:
        t0 = time.perf_counter()
        records, held, train_ids, held_ids, labels, from_labels = self._data()
        if len(records) < self.cfg.learner.mini_batch_size:
            self.stop.wait(POLL_S)  # one optimizer step needs a minibatch of pairs: wait for more labels
            return
        group, batch = self._group(), self._batch(records)
        fit = group.fit_reward(batch, None, loss="pairwise")
        accuracy = weighted_accuracy(group, self._batch(held)) if held else None
        version, step = self.version + 1, self.policy_step()
        path = group.save_pretrained(self.run_dir / "reward_versions" / f"v{version}",
                                     extra={"reward_mean": fit.reward_mean, "reward_std": fit.reward_std,
                                            "version": version})
        meta = {"online_accuracy": accuracy, "pairs": len(records), "label_pairs": min(from_labels, len(records)),
                "fit_s": round(time.perf_counter() - t0, 2), "policy_step": step,
                "dropped_labelers": sorted(k for k, v in labels.weights.items() if v["dropped"])}
        ensemble = self._ensemble(group, batch, version)
        handle = group.export_reward_weights(version)
        from tidal.feedback import lineage

        lineage.record_version(self.store, version, str(path), train_ids, held_ids, meta)
        self.version, self.path = version, str(path)
        self.refits += 1
        print(f"tidal: reward model v{version} fit on {len(train_ids)} labels ({len(records)} pairs) at rl step {step} "
              f"in {meta['fit_s']:.1f} s; online accuracy "
              f"{'n/a' if accuracy is None else f'{accuracy:.3f}'} on {len(held_ids)} newest labels"
              + (f"; left out, reliability below feedback.min_reliability: {', '.join(meta['dropped_labelers'])}"
                 if meta["dropped_labelers"] else ""), flush=True)
        self.on_publish(Published(version, str(path), handle, fit.reward_mean, fit.reward_std, ensemble, meta))

    def _publish_ensemble(self) -> None:
        """The starting version's ensemble, fit on what that version would train on now."""
        records = self._data()[0]
        if len(records) < 2:
            return
        ensemble = self._ensemble(self._group(), self._batch(records), self.version)
        self.on_publish(Published(self.version, self.path, None, 0.0, 1.0, ensemble, {"ensemble_only": True}))

    def _ensemble(self, group, batch, version: int):
        """Bootstrap heads (feedback.ensemble of them) on this trunk's features of the fit's pairs."""
        from tidal.learner.ensemble import fit_ensemble

        n = min(len(batch), ENSEMBLE_PAIRS)
        part = batch.select(torch.arange(n))
        feats = group.compute_features(part.input_ids, part.attention_mask).view(n, 2, -1)  # (n, 2, H)
        chosen_first = part.ranks[:, 0] < part.ranks[:, 1]  # (n,)
        chosen = torch.where(chosen_first[:, None], feats[:, 0], feats[:, 1])
        rejected = torch.where(chosen_first[:, None], feats[:, 1], feats[:, 0])
        return fit_ensemble(chosen, rejected, part.weight, self.cfg.feedback.ensemble, self.cfg.seed + version,
                            version=version)


def weighted_accuracy(group, batch) -> float:
    """Share (by weight) of held-out comparisons whose chosen response the reward model scores higher."""
    scores = group.compute_scores(batch.input_ids, batch.attention_mask).view(-1, 2)  # (N, 2)
    right = torch.where(batch.ranks[:, 0] < batch.ranks[:, 1], scores[:, 0] > scores[:, 1], scores[:, 1] > scores[:, 0])
    return float((batch.weight * right.float()).sum() / batch.weight.sum().clamp_min(1e-12))
