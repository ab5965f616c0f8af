"""Driver overhead per RL step against the number of rollout workers, and the per-byte cost of
the object-store weight transport, measured on one machine with stand-in actors. Writes
bench/results/scale.json (docs/scaling.md reads it).

    .venv/bin/python bench/scale.py [--workers 16 64 128 256] [--steps 5] [--transport-mb 64 256 512]

Only the actors are stand-ins; the driver runs tidal's own code:
  * `RolloutPool` (its `ActorGroup`, chunking, least-outstanding dispatch, result collection,
    order_by_prompt, `scale()`) drives `StandInWorker` actors that answer a chunk at once with
    fixed-length fake completions and pull pushed weights through `tidal.actors.weights.pull`
    without loading them into any engine;
  * `StandInLearner` publishes weights the way learner rank 0 does in
    `LearnerGroup.export_weights`: `ObjectStoreTransport.publish` inside the learner process, so
    the bucket refs are owned there and the driver only passes the `WeightHandle` on.
One measured step is what `driver/rl_loop.py` does around the model work: the export call, then
`pool.load_weights(handle)` (idle probe of every worker + `ObjectStoreTransport.sync`), then
`pool.generate`. Each part is reported as wall time and as the driver process's CPU time
(`time.process_time`, all its threads, Ray's included): on this shared 2-core machine the
stand-ins' own work competes with the driver for cores, which it would not on a cluster, so the
CPU time is the cleaner per-worker cost. The pool grows between points with `pool.scale(n)`.

Transport: for each --transport-mb size, the learner publishes that many bytes in
rollout.weight_bucket_mb buckets (timed inside the learner: the put), and 1 and 2 `CopyReceiver`
actors (an ActorGroup) pull every bucket and copy it into preallocated tensors (timed inside
each receiver), through `ObjectStoreTransport.sync` (timed by the driver).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
PROMPT_TOKENS, RESPONSE_TOKENS, SAMPLES = 32, 64, 4
TRANSPORT_BUCKET_MB = 64  # rollout.weight_bucket_mb's default
TENSOR_MB = 16  # size of each stand-in weight tensor in the transport measurement


def fit_linear(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least squares y = a + b*x; returns a, b and r2 (1.0 for a perfect fit)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"fit_linear needs >= 2 paired points, got {len(xs)} and {len(ys)}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_linear needs at least two different x values")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return {"a": a, "b": b, "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


# ----------------------------------------------------------------------------- stand-in actors

class StandInWorker:
    """A rollout worker with the RolloutWorker interface and no engine."""

    backend = "stand-in"

    def __init__(self, model_path: str, rollout, dtype: str = "float32", seed: int = 0, worker_id: int = 0, *_rest):
        self.worker_id, self.weight_version, self.loaded_bytes = worker_id, 0, 0

    def generate(self, prompts, sampling):
        from tidal.common.types import RolloutBatch

        rows = [(k, j) for k in range(len(prompts)) for j in range(sampling.n)]
        length = min(RESPONSE_TOKENS, sampling.max_new_tokens)
        return RolloutBatch(
            [prompts.index[k] for k, _ in rows], [prompts.text[k] for k, _ in rows],
            [prompts.token_ids[k] for k, _ in rows], ["x" * length] * len(rows),
            [[7] * length for _ in rows], [[-1.0] * length for _ in rows], ["length"] * len(rows),
            [self.weight_version] * len(rows), [None] * len(rows))

    def load_weights(self, handle) -> int:
        from tidal.actors.weights import pull

        # Every bucket is resolved (the real pull), but loaded into nothing.
        self.loaded_bytes = sum(t.numel() * t.element_size() for _, t in pull(handle))
        self.weight_version = handle.version
        return self.weight_version

    def info(self):
        from tidal.rollout.worker import WorkerInfo

        return WorkerInfo(self.worker_id, os.getpid(), self.weight_version, self.backend)


class CopyReceiver:
    """Pulls a handle and copies every tensor into its preallocated parameter (an engine's load,
    minus the engine); returns its own seconds."""

    def __init__(self):
        self.params: dict = {}

    def allocate(self, shapes: dict) -> None:
        import torch

        self.params = {n: torch.empty(s, dtype=torch.float32) for n, s in shapes.items()}

    def load_weights(self, handle) -> float:
        from tidal.actors.weights import pull

        start = time.perf_counter()
        for name, tensor in pull(handle):
            self.params[name].copy_(tensor)
        return time.perf_counter() - start


class StandInLearner:
    """Learner rank 0's side of `export_weights`: publish its tensors through the object store."""

    def __init__(self):
        self.weights: list = []

    def set_weights(self, megabytes: int, tensor_mb: float) -> dict:
        import torch

        n, numel = max(1, round(megabytes / tensor_mb)), int(tensor_mb * 2**20) // 4
        self.weights = [(f"layer{i}.weight", torch.randn(numel)) for i in range(n)]
        return {name: tuple(t.shape) for name, t in self.weights}

    def export(self, version: int, bucket_mb: float):
        from tidal.actors.weights import ObjectStoreTransport

        start = time.perf_counter()
        handle = ObjectStoreTransport().publish(self.weights, version, bucket_mb)
        return handle, time.perf_counter() - start


# ----------------------------------------------------------------------------- measurement

def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def process_pss_gib(pid: int) -> float:
    """Proportional set size: private memory plus a share of shared pages (the torch libraries
    every worker maps), so the sum over workers is what they really use."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, driver CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def med(pairs: list[tuple[float, float]], keep_all: bool = True) -> dict:
    out = {"wall_s": statistics.median(p[0] for p in pairs), "cpu_s": statistics.median(p[1] for p in pairs)}
    if keep_all:
        out["wall_s_all"] = [round(p[0], 5) for p in pairs]
    return out


def measure_transport(sizes_mb: list[int], bucket_mb: float, learner, timeout_s: float) -> list[dict]:
    import ray

    from tidal.actors.actor_group import ActorGroup
    from tidal.actors.weights import ObjectStoreTransport

    out, version = [], 0
    group = ActorGroup(CopyReceiver, 2, options={"num_cpus": 0.01}, name="receiver", call_timeout_s=timeout_s)
    try:
        for mb in sizes_mb:
            shapes = ray.get(learner.set_weights.remote(mb, TENSOR_MB), timeout=timeout_s)
            nbytes = sum(s[0] * 4 for s in shapes.values())
            for r in group.call(lambda a: a.allocate.remote(shapes)):
                r.get()
            for receivers in (1, 2):
                puts, syncs, loads = [], [], []
                for rnd in range(4):  # the first round is a warm-up
                    version += 1
                    handle, put_s = ray.get(learner.export.remote(version, bucket_mb), timeout=timeout_s)
                    start = time.perf_counter()
                    results = ObjectStoreTransport().sync(group, handle, timeout_s, actor_ids=range(receivers))
                    if rnd > 0:
                        syncs.append(time.perf_counter() - start)
                        puts.append(put_s)
                        loads.append(max(r.get() for r in results))
                    del handle, results
                row = {"mb": mb, "bytes": nbytes, "buckets": -(-nbytes // int(bucket_mb * 2**20)),
                       "receivers": receivers, "put_s": statistics.median(puts),
                       "receiver_pull_copy_s": statistics.median(loads), "sync_s": statistics.median(syncs)}
                row.update({f"{k}_per_gb": row[k] / (nbytes / 1e9) for k in ("put_s", "receiver_pull_copy_s", "sync_s")})
                print(f"transport {mb:4d} MB -> {receivers} receiver(s): put {row['put_s']:.3f}s, pull+copy "
                      f"{row['receiver_pull_copy_s']:.3f}s, sync {row['sync_s']:.3f}s "
                      f"({row['put_s_per_gb'] + row['sync_s_per_gb']:.3f} s/GB put+sync)", flush=True)
                out.append(row)
    finally:
        group.shutdown()
        ray.get(learner.set_weights.remote(0, TENSOR_MB))  # free the learner's copy
    return out


def measure_point(pool, learner, args, prompts, sampling, version: list[int]) -> dict:
    import ray

    def export():
        version[0] += 1
        handle, _ = ray.get(learner.export.remote(version[0], args.bucket_mb), timeout=600)
        return handle

    def step_parts():
        handle = [None]
        t_exp = timed(lambda: handle.__setitem__(0, export()))
        t_load = timed(lambda: pool.load_weights(handle[0]))
        t_gen = timed(lambda: pool.generate(prompts, sampling))
        return t_exp, t_load, t_gen

    step_parts()  # warm-up
    parts = [step_parts() for _ in range(args.steps)]
    infos = pool.worker_infos()
    assert {i.weight_version for i in infos} == {version[0]}, "a worker missed a weight version"
    one = pool.group.actor(pool.worker_ids()[0])
    rtt = [timed(lambda: ray.get(one.info.remote())) for _ in range(30)]
    fan = [timed(lambda: pool.group.call(lambda a: a.info.remote(), timeout_s=120)) for _ in range(5)]
    steps = [(sum(p[k][0] for k in range(3)), sum(p[k][1] for k in range(3))) for p in parts]
    return {"workers": pool.num_workers, "chunks": pool.last_stats.chunks,
            "export": med([p[0] for p in parts]), "load_weights": med([p[1] for p in parts]),
            "generate": med([p[2] for p in parts]), "step": med(steps),
            "round_trip": med(rtt, keep_all=False), "fan_out_call": med(fan),
            "mem_gib_per_worker": statistics.mean(process_pss_gib(i.pid) for i in infos),
            "mem_available_gib": mem_available_gib(), "load_avg": os.getloadavg()}


def measure_local(workers: list[int], args, prompts, sampling, overrides: list[str]) -> list[dict]:
    """The same pool in local mode (tidal.actors.actor_group.LocalHandle: the stand-ins are
    objects in this process, no Ray): the pool's own scheduling and bookkeeping in Python, at
    worker counts whose processes would not fit on this machine. The stand-ins' work inside
    generate is the same for every count (same rows), so the growth with workers is the pool's."""
    import torch

    from tidal.common.config import load_config
    from tidal.rollout.pool import RolloutPool

    weights = [(f"layer{i}.weight", torch.zeros(int(args.bucket_mb * 2**20) // 4))
               for i in range(round(args.weight_mb / args.bucket_mb))]
    out = []
    for n in workers:
        cfg = load_config(None, overrides + [f"rollout.num_workers={n}"])
        pool = RolloutPool(cfg, "stand-in", worker_cls=StandInWorker, local=True)
        try:
            def step():
                handle = pool.publish(weights, pool.weight_version + 1)
                return timed(lambda: pool.load_weights(handle)), timed(lambda: pool.generate(prompts, sampling))

            step()
            parts = [step() for _ in range(args.steps)]
        finally:
            pool.shutdown()
        row = {"workers": n, "load_weights": med([p[0] for p in parts], False),
               "generate": med([p[1] for p in parts], False)}
        print(f"local workers={n:5d}: load_weights {row['load_weights']['cpu_s'] * 1e3:.1f} ms CPU, "
              f"generate {row['generate']['cpu_s'] * 1e3:.1f} ms CPU", flush=True)
        out.append(row)
    return out


def fits(points: list[dict]) -> dict:
    xs = [p["workers"] for p in points]
    return {f"{part}.{unit}": fit_linear(xs, [p[part][unit] for p in points])
            for part in ("step", "export", "load_weights", "generate", "fan_out_call") for unit in ("wall_s", "cpu_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    ap.add_argument("--local-workers", nargs="*", type=int, default=[16, 64, 128, 256, 1024])
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop growing the pool when the next point "
                    "would end the run after this many seconds (worker start-up dominates on 2 cores)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=512, help="prompts per step (x4 samples)")
    ap.add_argument("--weight-mb", type=int, default=16, help="weights pushed per step in the sweep")
    ap.add_argument("--bucket-mb", type=int, default=1, help="bucket size in the sweep (16 MB / 1 MB = 16 buckets)")
    ap.add_argument("--transport-mb", nargs="*", type=int, default=[64, 256, 512])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cpus-per-worker", type=float, default=0.01)
    ap.add_argument("--min-free-gib", type=float, default=4.0, help="stop growing before memory gets this low")
    args = ap.parse_args()

    from tidal.driver.runtime import RUNTIME_ENV_VARS

    for k, v in RUNTIME_ENV_VARS.items():
        os.environ.setdefault(k, v)
    import ray

    from tidal.driver.runtime import ray_session
    from tidal.common.config import ClusterConfig, load_config
    from tidal.common.types import PromptBatch
    from tidal.rollout.pool import RolloutPool
    from tidal.rollout.sampling import Sampling

    prompts = PromptBatch(list(range(args.prompts)), [f"prompt {i}" for i in range(args.prompts)],
                          [[1 + i % 100] * PROMPT_TOKENS for i in range(args.prompts)])
    sampling = Sampling(n=SAMPLES, temperature=1.0, max_new_tokens=RESPONSE_TOKENS, seed=0)
    workers = sorted(args.workers)
    overrides = [f"rollout.cpus_per_worker={args.cpus_per_worker}", "rollout.gpus_per_worker=0",
                 f"rollout.max_model_len={PROMPT_TOKENS + RESPONSE_TOKENS + 8}", "cluster.sync_timeout_s=600",
                 f"rollout.weight_bucket_mb={args.bucket_mb}"]
    cfg = load_config(None, overrides + [f"rollout.num_workers={workers[0]}"])
    results = {"machine": {"arch": platform.machine(), "cores": os.cpu_count(), "python": sys.version.split()[0],
                           "ray": ray.__version__, "mem_available_gib": mem_available_gib()},
               "load_avg_start": os.getloadavg(),
               "setup": {"prompts_per_step": args.prompts, "samples": SAMPLES, "prompt_tokens": PROMPT_TOKENS,
                         "response_tokens": RESPONSE_TOKENS, "weight_bytes_per_step": args.weight_mb * 2**20,
                         "buckets_per_step": round(args.weight_mb / args.bucket_mb), "steps": args.steps,
                         "chunks_per_worker": 1, "cpus_per_worker": args.cpus_per_worker,
                         "transport_bucket_mb": TRANSPORT_BUCKET_MB},
               "transport": [], "points": [], "stopped": None}
    t_start = time.perf_counter()
    with ray_session(ClusterConfig(num_cpus=8), verbose=False):
        learner = ray.remote(StandInLearner).options(num_cpus=0.01).remote()
        results["transport"] = measure_transport(args.transport_mb, TRANSPORT_BUCKET_MB, learner, 600)
        ray.get(learner.set_weights.remote(args.weight_mb, args.bucket_mb))
        version = [0]
        t0 = time.perf_counter()
        pool = RolloutPool(cfg, "stand-in", worker_cls=StandInWorker)
        start_s = time.perf_counter() - t0
        grow_per_worker_s, per_worker_gib, measure_s = start_s / workers[0], 0.2, 0.0
        try:
            for n in workers:
                more = n - pool.num_workers
                if more > 0:
                    projected = mem_available_gib() - more * per_worker_gib
                    end_s = time.perf_counter() - t_start + more * grow_per_worker_s + 2 * measure_s
                    if projected < args.min_free_gib or end_s > args.budget_s:
                        results["stopped"] = (
                            f"{n} workers not run: {more} more workers would need ~{more * per_worker_gib:.1f} GiB "
                            f"(leaving {projected:.1f}, --min-free-gib {args.min_free_gib}) and ~{more * grow_per_worker_s:.0f}s "
                            f"to start (the run would end at ~{end_s:.0f}s, --budget-s {args.budget_s:.0f})")
                        print(results["stopped"], flush=True)
                        break
                    t0 = time.perf_counter()
                    pool.scale(n)
                    start_s = time.perf_counter() - t0
                    grow_per_worker_s = start_s / more
                t0 = time.perf_counter()
                point = {**measure_point(pool, learner, args, prompts, sampling, version), "grow_s": start_s,
                         "grow_s_per_worker": grow_per_worker_s}
                measure_s = time.perf_counter() - t0
                per_worker_gib = max(per_worker_gib, point["mem_gib_per_worker"])
                results["points"].append(point)
                print(f"workers={n:4d} (grew in {start_s:5.1f}s): step {point['step']['wall_s'] * 1e3:7.1f} ms wall, "
                      f"{point['step']['cpu_s'] * 1e3:6.1f} ms driver CPU = export {point['export']['wall_s'] * 1e3:.1f} + "
                      f"load_weights {point['load_weights']['wall_s'] * 1e3:.1f} + generate "
                      f"{point['generate']['wall_s'] * 1e3:.1f} ms; round trip {point['round_trip']['wall_s'] * 1e3:.2f} ms, "
                      f"fan-out {point['fan_out_call']['wall_s'] * 1e3:.1f} ms; {point['mem_gib_per_worker'] * 1024:.0f} "
                      f"MiB/worker; load {point['load_avg'][0]:.1f}", flush=True)
        finally:
            pool.shutdown()
    results["local"] = measure_local(args.local_workers, args, prompts, sampling, overrides)
    results["load_avg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - t_start
    if len(results["points"]) >= 2:
        results["fit"] = fits(results["points"])
        results["fit_note"] = "seconds = a + b * workers, least squares over the measured points"
    if len(results["local"]) >= 2 and len(set(p["workers"] for p in results["local"])) >= 2:
        xs = [p["workers"] for p in results["local"]]
        results["local_fit"] = {f"{part}.cpu_s": fit_linear(xs, [p[part]["cpu_s"] for p in results["local"]])
                                for part in ("load_weights", "generate")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} ({results['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
