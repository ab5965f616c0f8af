"""Placement by configuration: where each role's actors run.

Two modes (`cluster.placement`), one code path:

* colocated: one placement group, one bundle per learner rank (or per rollout worker, whichever
  is more). Bundle k hosts learner rank k (whose actor also holds the PPO critic), rollout
  worker k mod n, and the reference / reward-model workers spread the same way. Actors that share a bundle split its
  GPU (one GPU: a DeepSpeed rank never shares it with another rank, tidal.actors.devices; the vLLM
  engine sleeps while the rank updates, rollout.sleep); each keeps its own CPUs.
* disaggregated: the learner-side roles (learner, reference, reward model) get one
  placement group; every rollout worker gets a placement group of its own with one bundle, so
  the pool can grow and shrink while the job runs (`Placement.actor_options("rollout")` adds a
  group for a new worker and frees it when the worker is removed) without touching the learners. `cluster.rollout_node_resource` /
  `learner_node_resource` pin the two sides to nodes that advertise those custom resources.

`plan_placement` is pure (unit-tested without Ray); `Placement` turns a plan into live Ray
placement groups and hands out `.options(...)` for each actor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tidal.common.config import TidalConfig

NODE_RESOURCE_SLIVER = 0.001  # what a bundle asks of a node-marking custom resource
LEARNER_ROLES = ("learner", "reference", "reward")


@dataclass(frozen=True)
class RoleSlot:
    """Where one actor goes: a bundle of a named placement group, and what it requests there."""

    role: str
    group: str  # placement-group name in PlacementPlan.groups
    bundle_index: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class PlacementPlan:
    mode: str
    groups: dict[str, tuple[dict[str, float], ...]]  # group name -> bundles (resource dicts)
    slots: dict[str, tuple[RoleSlot, ...]]  # role -> one slot per actor
    rollout_bundle: dict[str, float] = field(default_factory=dict)  # one extra rollout worker

    @property
    def total_cpus(self) -> float:
        return sum(b.get("CPU", 0.0) for bundles in self.groups.values() for b in bundles)


def role_counts(cfg: TidalConfig, *, reference: bool, reward_model: bool = True) -> dict[str, int]:
    """Actors per role for an RL stage with this config (the critic lives in the learner ranks);
    reward-model workers: reward.num_workers per `model` reward term (none when reward_model=False)."""
    model_terms = sum(t.kind == "model" for t in cfg.reward.terms) if reward_model else 0
    return {
        "learner": cfg.learner.num_workers,
        "reference": 1 if reference else 0,
        "reward": cfg.reward.num_workers * model_terms,
        "rollout": cfg.rollout.num_workers,
    }


def _role_resources(cfg: TidalConfig, role: str) -> tuple[float, float]:
    if role == "rollout":
        return cfg.rollout.cpus_per_worker, cfg.rollout.gpus_per_worker
    return cfg.learner.cpus_per_worker, cfg.learner.gpus_per_worker


def _pack(cfg: TidalConfig, group: str, n_bundles: int, roles: dict[str, int],
          node_resource: str | None) -> tuple[tuple[dict[str, float], ...], dict[str, tuple[RoleSlot, ...]]]:
    """Assign actor i of each role to bundle i mod n_bundles; size each bundle to what lands on it.
    A bundle's GPU is the largest single request on it, shared equally by its GPU actors."""
    members: list[list[tuple[str, float, float]]] = [[] for _ in range(n_bundles)]
    for role, count in roles.items():
        cpus, gpus = _role_resources(cfg, role)
        for i in range(count):
            members[i % n_bundles].append((role, cpus, gpus))
    bundles, slots = [], {role: [] for role in roles}
    for k, actors in enumerate(members):
        gpu = max((g for _, _, g in actors), default=0.0)
        n_gpu_actors = sum(1 for _, _, g in actors if g > 0)
        bundle = {"CPU": float(sum(c for _, c, _ in actors))}
        if gpu > 0:
            bundle["GPU"] = float(gpu)
        if node_resource:
            bundle[node_resource] = NODE_RESOURCE_SLIVER
        bundles.append(bundle)
        for role, cpus, gpus in actors:
            share = gpu / n_gpu_actors if gpus > 0 else 0.0
            slots[role].append(RoleSlot(role, group, k, float(cpus), float(share)))
    return tuple(bundles), {r: tuple(s) for r, s in slots.items() if s}


def rollout_bundle(cfg: TidalConfig) -> dict[str, float]:
    """The one-bundle placement group of a disaggregated (or added) rollout worker."""
    bundle = {"CPU": float(cfg.rollout.cpus_per_worker)}
    if cfg.rollout.gpus_per_worker > 0:
        bundle["GPU"] = float(cfg.rollout.gpus_per_worker)
    if cfg.cluster.placement == "disaggregated" and cfg.cluster.rollout_node_resource:
        bundle[cfg.cluster.rollout_node_resource] = NODE_RESOURCE_SLIVER
    return bundle


def plan_placement(cfg: TidalConfig, counts: dict[str, int]) -> PlacementPlan:
    """Bundles and per-actor slots for `counts` (from role_counts) under cfg.cluster.placement."""
    unknown = set(counts) - set(LEARNER_ROLES) - {"rollout"}
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; expected {LEARNER_ROLES + ('rollout',)}")
    learner_side = {r: counts.get(r, 0) for r in LEARNER_ROLES if counts.get(r, 0) > 0}
    n_learner = max(counts.get("learner", 0), 1)
    n_rollout = counts.get("rollout", 0)
    if cfg.cluster.placement == "colocated":
        bundles, slots = _pack(cfg, "shared", max(n_learner, n_rollout),
                               {**learner_side, "rollout": n_rollout}, None)
        return PlacementPlan("colocated", {"shared": bundles}, slots, rollout_bundle(cfg))
    bundles, slots = _pack(cfg, "learner", n_learner, learner_side, cfg.cluster.learner_node_resource)
    groups = {"learner": bundles}
    rollout_slots = []
    for i in range(n_rollout):
        name = f"rollout-{i}"
        groups[name] = (rollout_bundle(cfg),)
        rollout_slots.append(RoleSlot("rollout", name, 0, float(cfg.rollout.cpus_per_worker),
                                      float(cfg.rollout.gpus_per_worker)))
    slots["rollout"] = tuple(rollout_slots)
    return PlacementPlan("disaggregated", groups, slots, rollout_bundle(cfg))


_NODE_KEYS = {"learner": "cluster.learner_node_resource", "rollout": "cluster.rollout_node_resource"}


def _fmt(x: float) -> str:
    return f"{x:g}"


def plan_shortfall(plan: PlacementPlan, nodes: list[dict[str, float]]) -> list[str]:
    """What `plan` asks for that a cluster whose live nodes have these total resources
    (`ray.util.state.list_nodes(...).resources_total`) lacks, each with its fix; [] when it fits.
    Checked, most specific first: every custom node resource a bundle asks for exists on a node;
    each bundle fits on one node; the CPUs/GPUs of the bundles pinned to a node resource fit the
    nodes that advertise it; the plan's CPUs/GPUs fit the cluster. Totals, not free resources,
    and no bin-packing proof: a cluster that passes can still be busy or fragmented."""
    bundles = [(name, b) for name, group in plan.groups.items() for b in group]
    custom = sorted({k for _, b in bundles for k in b if k not in ("CPU", "GPU")})
    for key in custom:
        if not any(key in n for n in nodes):
            role = next(name for name, b in bundles if key in b).split("-")[0]
            return [f"no node advertises the custom resource {key!r} ({_NODE_KEYS.get(role, 'cluster.*')}); start "
                    f"{role} nodes with `ray start --address=HEAD:6379 --resources='{{\"{key}\": 1}}'`"]
    for name, b in bundles:
        if not any(all(n.get(k, 0.0) >= v for k, v in b.items()) for n in nodes):
            flags = f"--num-cpus={math.ceil(b.get('CPU', 0.0))}" + (
                f" --num-gpus={math.ceil(b['GPU'])}" if b.get("GPU") else "")
            return [f"one bundle of placement group {name!r} needs {_resources(b)}, and no node has that much "
                    f"(the largest: {_resources(max(nodes, key=lambda n: n.get('CPU', 0.0), default={}))}); start a "
                    f"node with enough (`ray start ... {flags}`), or lower *.cpus_per_worker / *.gpus_per_worker"]
    problems = []
    for key in custom + [None]:
        want = [b for _, b in bundles if key is None or key in b]
        have = [n for n in nodes if key is None or key in n]
        for res, flag in (("CPU", "--num-cpus"), ("GPU", "--num-gpus")):
            need, got = sum(b.get(res, 0.0) for b in want), sum(n.get(res, 0.0) for n in have)
            if need > got + 1e-9:
                where = f"the nodes with {key!r} have" if key else "the cluster has"
                fix = (f"add {key} nodes or give them more (`ray start --address=HEAD:6379 {flag}=N "
                       f"--resources='{{\"{key}\": 1}}'`)") if key else \
                    f"add nodes, or start the head with enough (`ray start --head {flag}={math.ceil(need)}`)"
                problems.append(f"it needs {_fmt(need)} {res}s ({_plan_parts(plan, key, res)}) and {where} "
                                f"{_fmt(got)}; {fix}, or lower *.num_workers / *.{res.lower()}s_per_worker")
    return problems


def _resources(bundle: dict[str, float]) -> str:
    """'4 CPU, 1 GPU on a node with learner_node': amounts, and the node resources it must sit on."""
    amounts = ", ".join(f"{_fmt(bundle.get(k, 0.0))} {k}" for k in ("CPU", "GPU") if k == "CPU" or bundle.get(k))
    marks = [k for k in bundle if k not in ("CPU", "GPU") and not k.startswith("node:") and "memory" not in k]
    return amounts + (f" on a node with {', '.join(marks)}" if marks and bundle[marks[0]] < 1 else "")


def _plan_parts(plan: PlacementPlan, key: str | None, res: str) -> str:
    """'learner 1 x 2, rollout 2 x 1': which roles ask for the CPUs (or GPUs) counted."""
    per_role: dict[str, list[float]] = {}
    for role, slots in plan.slots.items():
        for s in slots:
            bundle = plan.groups[s.group][s.bundle_index]
            if key is None or key in bundle:
                per_role.setdefault(role, []).append(s.num_cpus if res == "CPU" else s.num_gpus)
    return ", ".join(f"{role} {len(v)} x {_fmt(max(v))}" for role, v in per_role.items() if sum(v) > 0)


class Placement:
    """Live placement groups for a plan. `options(role, i)` gives `ActorClass.options(**...)`."""

    def __init__(self, plan: PlacementPlan, timeout_s: float, name_prefix: str = "tidal"):
        from ray.util.placement_group import placement_group

        self.plan, self.timeout_s, self.prefix = plan, timeout_s, name_prefix
        self.pgs = {}
        for name, bundles in plan.groups.items():
            strategy = "STRICT_PACK" if name.startswith("rollout-") else "PACK"
            self.pgs[name] = placement_group(list(bundles), strategy=strategy, name=f"{name_prefix}-{name}")
        self.rollout_slots: dict[int, RoleSlot] = dict(enumerate(plan.slots.get("rollout", ())))
        self._wait(list(self.pgs))

    def _wait(self, names: list[str]) -> None:
        import ray

        refs = [self.pgs[n].ready() for n in names]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if len(ready) < len(refs):
            missing = [n for n, r in zip(names, refs) if r not in ready]
            raise TimeoutError(
                f"placement groups {missing} were not scheduled within {self.timeout_s:.0f} s; the cluster "
                f"lacks resources for bundles {[self.plan.groups.get(n) or self.plan.rollout_bundle for n in missing]} "
                f"(ray status shows what is free). Lower *.num_workers / *.cpus_per_worker or add nodes.")

    def options(self, role: str, index: int) -> dict:
        """Ray actor options placing actor `index` of `role` on its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from tidal.actors.devices import with_device_env

        slot = self._slot(role, index)
        return with_device_env({
            "num_cpus": slot.num_cpus,
            "num_gpus": slot.num_gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pgs[slot.group], placement_group_bundle_index=slot.bundle_index,
                placement_group_capture_child_tasks=True),
        })

    def _slot(self, role: str, index: int) -> RoleSlot:
        slots = self.rollout_slots if role == "rollout" else dict(enumerate(self.plan.slots.get(role, ())))
        if index not in slots:
            raise IndexError(f"role {role!r} has placement slots {sorted(slots)}; no slot {index}")
        return slots[index]

    def actor_options(self, role: str, offset: int = 0) -> "RoleOptions":
        """An ActorGroup `options_fn` for `role`: actor id i takes slot offset + i. Rollout slots
        are grown and freed with the pool (a new worker id gets its own slot)."""
        return RoleOptions(self, role, offset)

    def add_rollout_slot(self, worker_id: int) -> None:
        """A one-bundle placement group for rollout worker `worker_id` (added by scaling up)."""
        from ray.util.placement_group import placement_group

        name = f"rollout-{worker_id}"
        while name in self.pgs:
            name += "x"
        self.pgs[name] = placement_group([self.plan.rollout_bundle], strategy="STRICT_PACK", name=f"{self.prefix}-{name}")
        self._wait([name])
        self.rollout_slots[worker_id] = RoleSlot("rollout", name, 0, self.plan.rollout_bundle["CPU"],
                                                 self.plan.rollout_bundle.get("GPU", 0.0))

    def release_rollout_slot(self, worker_id: int) -> None:
        """Free a removed worker's slot: its own placement group goes; a shared bundle stays."""
        from ray.util.placement_group import remove_placement_group

        slot = self.rollout_slots.pop(worker_id, None)
        if slot is not None and slot.group.startswith("rollout-"):
            remove_placement_group(self.pgs.pop(slot.group))

    def node_of(self, role: str, index: int) -> str:
        """Node id hosting the bundle of actor `index` of `role` (for tests and logs)."""
        from ray.util.placement_group import placement_group_table

        slot = self._slot(role, index)
        return placement_group_table(self.pgs[slot.group])["bundles_to_node_id"][slot.bundle_index]

    def where(self) -> dict:
        """Where each role's actors run, for RUN/placement.json: {"mode", "roles": {role: [node id
        of actor i, ...]}, "nodes": {node id: {"address", "hostname", "resources"}}} (resources:
        CPUs, GPUs and the custom ones such as learner_node / rollout_node)."""
        import ray

        counts = {role: len(slots) for role, slots in self.plan.slots.items() if role != "rollout"}
        roles = {role: [self.node_of(role, i) for i in range(n)] for role, n in counts.items()}
        roles["rollout"] = [self.node_of("rollout", i) for i in sorted(self.rollout_slots)]
        used = {n for ids in roles.values() for n in ids}
        nodes = {n["NodeID"]: {"address": n["NodeManagerAddress"], "hostname": n["NodeManagerHostname"],
                               "resources": {k: v for k, v in n["Resources"].items()
                                             if "memory" not in k and not k.startswith(("node:", "accelerator_type"))}}
                 for n in ray.nodes() if n["NodeID"] in used}
        return {"mode": self.plan.mode, "roles": roles, "nodes": nodes}

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs.values():
            try:
                remove_placement_group(pg)
            except Exception:  # already gone with the cluster
                pass
        self.pgs.clear()


class RoleOptions:
    """Callable `options_fn` of an ActorGroup (see Placement.actor_options). The group calls
    `release` when it removes an actor, which frees a rollout worker's own placement group."""

    def __init__(self, placement: Placement, role: str, offset: int = 0):
        self.placement, self.role, self.offset = placement, role, offset

    def __call__(self, actor_id: int) -> dict:
        index = actor_id + self.offset
        if self.role == "rollout" and index not in self.placement.rollout_slots:
            self.placement.add_rollout_slot(index)
        return self.placement.options(self.role, index)

    def release(self, actor_id: int) -> None:
        if self.role == "rollout":
            self.placement.release_rollout_slot(actor_id + self.offset)
