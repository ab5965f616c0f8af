"""Shared test setup: offline, single-threaded, CPU, private Ray cluster, tiny model."""

import os

# The same environment `tidal train` gives its Ray workers (driver/runtime.py explains each).
from tidal.driver.runtime import RUNTIME_ENV_VARS as _ENV  # noqa: E402  (imports no torch)

for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)
# One model cache for the whole test session (and CI run): tiny-random builds once.
os.environ.setdefault("TIDAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tidal"))
# One torch compile cache too, fixed before tests point TMPDIR elsewhere for their subprocesses
# (it defaults to TMPDIR/torchinductor_USER: vLLM's sampler would recompile in every run).
from tidal.driver.runtime import inductor_cache_dir  # noqa: E402

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """Path of the tiny-random HF folder (tokenizer included)."""
    from tidal.common.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster shared by all Ray tests of the session: tidal's own
    `ray_session` (the workers' environment of `tidal train`), temp folder removed afterwards."""
    import ray

    from tidal.common.config import ClusterConfig
    from tidal.driver.runtime import ray_session

    with ray_session(ClusterConfig(num_cpus=8), verbose=False):
        yield ray
