"""A simulated labeler: ranks a feedback folder's tasks the way a noisy person would, from a gold
judge the policy never trains on (AlpacaFarm's simulated annotators, Dubois et al. 2023).

For one task with gold scores g_1..g_K, the ranking is a draw from the Plackett-Luce model
with utilities g_i / temperature (sort by g_i / temperature + Gumbel noise): every pair is then
ordered by a Bradley-Terry coin with P(i above j) = sigmoid((g_i - g_j) / temperature), so close
calls are noisy and clear ones are not. With probability `error_rate` the labeler ignores the
judge and ranks at random (a careless or adversarial label). temperature 0: always the gold order.

Online (`label_paced`) it behaves like a person at the page while a run trains: a task is labeled
no sooner than `latency_s` after it was made, and at most `throughput` labels a second.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Callable

from tidal.feedback.store import FeedbackStore, Task

GoldJudge = Callable[[list[str], list[str]], list[float]]  # (prompts, completions) -> scores
NAME = "simulated"


def prompt_text(task: Task) -> str:
    """The task's prompt as text (a chat prompt: its turns' contents, joined)."""
    if isinstance(task.prompt, str):
        return task.prompt
    return "\n".join(m.get("content", "") for m in task.prompt)


class SimulatedLabeler:
    def __init__(self, gold: GoldJudge, temperature: float = 0.1, error_rate: float = 0.0, seed: int = 0):
        if temperature < 0 or not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"simulated labeler: temperature {temperature} must be >= 0 and error_rate {error_rate} in [0, 1]")
        self.gold, self.temperature, self.error_rate = gold, temperature, error_rate
        self.rng = random.Random(seed)

    def rank(self, scores: list[float]) -> list[int]:
        """ranking[i] = rank of response i (0 = best) for gold scores (K,)."""
        k = len(scores)
        if self.rng.random() < self.error_rate:
            keys = [self.rng.random() for _ in range(k)]
        elif self.temperature == 0:
            keys = [float(s) for s in scores]
        else:  # Gumbel-max: a Plackett-Luce draw with utilities s / temperature
            keys = [s / self.temperature - math.log(-math.log(self.rng.random() or 1e-300)) for s in scores]
        order = sorted(range(k), key=lambda i: -keys[i])  # best first
        ranking = [0] * k
        for rank, i in enumerate(order):
            ranking[i] = rank
        return ranking

    def label(self, store: FeedbackStore, name: str = NAME) -> int:
        """Rank every task the simulated labeler has not labeled yet; returns how many it labeled.
        Submission ids are a function of the task, so running it again stores nothing twice."""
        labeler_id = self._labeler(store, name)
        done = 0
        while (task := store.next_task(labeler_id)) is not None:
            done += self._label_one(store, labeler_id, task, name)
        return done

    def label_paced(self, store: FeedbackStore, stop: threading.Event, latency_s: float = 0.0,
                    throughput: float = 0.0, poll_s: float = 0.2, name: str = NAME) -> int:
        """Label tasks as they come until `stop` is set: each no sooner than `latency_s` after
        the task was made, at most `throughput` a second (0: no limit). Returns how many."""
        labeler_id = self._labeler(store, name)
        done = 0
        while not stop.is_set():
            task = store.next_task(labeler_id)
            if task is None:
                stop.wait(poll_s)
                continue
            if stop.wait(max(0.0, task.created_at + latency_s - time.time())):
                break  # the lease lapses; the task goes to the next labeler (or this one, resumed)
            done += self._label_one(store, labeler_id, task, name)
            if throughput > 0:
                stop.wait(1.0 / throughput)
        return done

    @staticmethod
    def _labeler(store: FeedbackStore, name: str) -> int:
        if store.labeler_id(name) is None:
            store.add_labeler(name)  # its token is never needed: it labels in-process
        return store.labeler_id(name)

    def _label_one(self, store: FeedbackStore, labeler_id: int, task: Task, name: str) -> int:
        texts = [r.text for r in task.responses]
        scores = [float(s) for s in self.gold([prompt_text(task)] * len(texts), texts)]
        _, new = store.submit(labeler_id, f"{name}-task-{task.id}", task.id, ranking=self.rank(scores))
        return int(new)
