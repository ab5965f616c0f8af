"""How many math threads each role's processes use.

Every Ray worker starts with OMP_NUM_THREADS=1 (tidal.driver.runtime): a safe default when many
processes share a machine, but it leaves cores idle whenever a role runs alone. A run's roles
take turns in a known pattern, so the thread count of each role follows from the schedule:

* sync RL (and the SFT / reward-model stages): the phases run one after another - generate
  (rollout workers), score (reward-model workers), forward (reference worker, plus the learner
  ranks when they recompute old log-probs or run the critic), update (learner ranks). Each phase
  may use the whole machine, split among the processes running in it.
* async RL: the rollout side (generation, then scoring) runs beside the learner side (forward,
  update) all the time; the cores are split between the sides in proportion to their logical
  CPUs (rollout.cpus_per_worker x workers vs learner.cpus_per_worker x ranks), then among the
  processes of each side.

This holds on an embedded cluster, where every actor runs on this machine. On a cluster tidal
joined (cluster.address, `tidal submit`) the driver does not know which actors share a node,
so each process uses as many threads as the logical CPUs Ray reserved for it (Ray's own rule).
A role's `num_threads` setting (rollout.num_threads, reward.num_threads, learner.num_threads,
which also sets the reference worker's) overrides the plan. A learner rank switches to its
forward-phase share while it computes old log-probs or critic values beside the reference worker.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from tidal.common.config import TidalConfig


@dataclass(frozen=True)
class ThreadPlan:
    rollout: int
    reward: int
    learner: int  # a learner rank's threads while it updates (it runs alone then)
    reference: int
    # a learner rank's threads in the forward phase, which it shares with the reference worker
    # (old log-probs, critic values): the reference's share, so the phase does not oversubscribe
    # the cores (bf16 forwards on 2 cores took 2.5 s oversubscribed vs 1.4 s shared)
    learner_forward: int


def machine_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def embedded(cfg: TidalConfig) -> bool:
    """Whether the run starts its own local cluster (the same test as cluster.runtime.connect)."""
    return cfg.cluster.address is None and "RAY_ADDRESS" not in os.environ


def plan_threads(cfg: TidalConfig, cores: int | None, reference_alone: bool = False) -> ThreadPlan:
    """Threads per process of each role. `cores`: the machine's cores when every actor runs on
    it (embedded cluster), None on a joined cluster. A role's num_threads > 0 wins."""
    r, rw, lc = cfg.rollout, cfg.reward, cfg.learner
    if cores is None:  # a joined cluster: the logical CPUs Ray reserved per process
        auto = ThreadPlan(rollout=_at_least_one(r.cpus_per_worker), reward=_at_least_one(lc.cpus_per_worker),
                          learner=_at_least_one(lc.cpus_per_worker), reference=_at_least_one(lc.cpus_per_worker),
                          learner_forward=_at_least_one(lc.cpus_per_worker))
    elif cfg.algorithm.mode == "async":
        rollout_cpus, learner_cpus = r.num_workers * r.cpus_per_worker, lc.num_workers * lc.cpus_per_worker
        share = rollout_cpus / (rollout_cpus + learner_cpus) if rollout_cpus + learner_cpus > 0 else 0.5
        rollout_side = min(max(1, round(cores * share)), max(1, cores - 1))
        learner_side = max(1, cores - rollout_side)
        auto = ThreadPlan(rollout=max(1, rollout_side // r.num_workers), reward=max(1, rollout_side // rw.num_workers),
                          learner=max(1, learner_side // lc.num_workers),
                          reference=learner_side if reference_alone else max(1, learner_side // (lc.num_workers + 1)),
                          learner_forward=max(1, learner_side // (lc.num_workers + 1)))
    else:
        auto = ThreadPlan(rollout=max(1, cores // r.num_workers), reward=max(1, cores // rw.num_workers),
                          learner=max(1, cores // lc.num_workers),
                          reference=cores if reference_alone else max(1, cores // (lc.num_workers + 1)),
                          learner_forward=max(1, cores // (lc.num_workers + 1)))
    return ThreadPlan(rollout=r.num_threads or auto.rollout, reward=rw.num_threads or auto.reward,
                      learner=lc.num_threads or auto.learner, reference=lc.num_threads or auto.reference,
                      learner_forward=lc.num_threads or auto.learner_forward)


def run_threads(cfg: TidalConfig, reference_alone: bool = False) -> ThreadPlan:
    """The plan of this run, on this machine (the driver's groups call it). `reference_alone`:
    in the forward phase the reference worker is the only process computing (the learner ranks
    take the engine's old log-probs and run no critic)."""
    return plan_threads(cfg, machine_cores() if embedded(cfg) else None, reference_alone)


def _at_least_one(cpus: float) -> int:
    return max(1, int(cpus))


def apply_threads(n: int) -> int:
    """Set this process's math threads to n (n <= 0: leave them). Only in a Ray actor's own
    process: an in-process (local=True) worker shares the caller's process and leaves it alone.
    Returns the thread count in effect."""
    import torch

    if n > 0 and _in_ray_actor():
        torch.set_num_threads(n)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # for libraries that read them later
            os.environ[var] = str(n)
    return torch.get_num_threads()


@contextmanager
def threads_during(n: int) -> Iterator[None]:
    """Use n math threads inside the block, then go back (n <= 0, or outside a Ray actor's own
    process: leave them, as apply_threads)."""
    import torch

    before = torch.get_num_threads()
    if n <= 0 or n == before or not _in_ray_actor():
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - no Ray, or no runtime context: not an actor
        return False
