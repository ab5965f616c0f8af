"""The rollout pool when every worker is lost and none comes back (the only rollout node died):
the call stops after cluster.node_wait_s with WorkersLost instead of waiting forever. Here the
restarted worker never finishes starting, which is what a worker pending on a dead node's
placement group looks like to the pool (tests/test_e2e_multinode.py kills a real node)."""

import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from tidal.common.config import load_config
from tidal.common.types import PromptBatch
from tidal.rollout.hf_backend import HFRolloutWorker
from tidal.rollout.pool import RolloutPool, WorkersLost
from tidal.rollout.sampling import Sampling

try:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
except ImportError:  # pragma: no cover
    pass

STARTED = Path(tempfile.gettempdir()) / f"tidal-lost-{uuid.uuid4().hex}"  # exists once the first worker is up


class NeverRestarts(HFRolloutWorker):
    """A real (transformers) rollout worker whose replacement never finishes starting."""

    def __init__(self, *args):
        if STARTED.exists():
            time.sleep(3600)
        super().__init__(*args)
        STARTED.touch()


@pytest.mark.ray
def test_a_pool_whose_workers_are_all_lost_stops_after_node_wait_s(ray_cluster, tiny_model):
    cfg = load_config(None, ["rollout.backend=hf", "rollout.max_model_len=64", "cluster.node_wait_s=5"])
    pool = RolloutPool(cfg, tiny_model, worker_cls=NeverRestarts)
    worker = None
    try:
        os.kill(pool.worker_infos()[0].pid, signal.SIGKILL)
        prompts = PromptBatch([0, 1], ["a b", "c d"], [[5, 6], [7, 8]])
        outcome = {}

        def call():
            try:
                pool.generate(prompts, Sampling(n=1, max_new_tokens=4, seed=0))
            except Exception as e:  # noqa: BLE001 - the test looks at which
                outcome["error"] = e

        t0 = time.monotonic()
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(timeout=90)  # before: generate waited for the restart forever
        assert not worker.is_alive(), "generate still waits for a worker that never restarts"
        assert isinstance(outcome.get("error"), WorkersLost), outcome
        assert "rollout-0" in str(outcome["error"]) and "cluster.node_wait_s" in str(outcome["error"])
        assert 5 <= time.monotonic() - t0 < 60
    finally:
        if worker is not None and worker.is_alive():  # a hung generate holds the pool's lock: end the actors only
            pool.group.shutdown()
        else:
            pool.shutdown()
        STARTED.unlink(missing_ok=True)
