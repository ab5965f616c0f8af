"""The workers' environment of an embedded cluster (driver/runtime.py): their temp files go with
the cluster's temp folder, torch's compile cache does not."""

import os

import pytest

from tidal.driver.runtime import inductor_cache_dir


def test_the_compile_cache_is_where_torch_puts_it_without_tidals_tmpdir(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert inductor_cache_dir() == default_cache_dir() and inductor_cache_dir().startswith(str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == str(tmp_path / "mine")  # a user's own setting wins


@pytest.mark.ray
def test_a_worker_keeps_its_temp_files_in_the_cluster_folder_and_compiles_into_the_lasting_cache(ray_cluster):
    @ray_cluster.remote(num_cpus=0)
    def where():
        import tempfile

        from torch._inductor import config
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return tempfile.gettempdir(), cache_dir(), config.cpp_cache_precompile_headers

    tmp, cache, pch = ray_cluster.get(where.remote())
    assert not pch  # torch would put the precompiled header in TMPDIR, rebuilt every run
    assert "tidal-ray-" in tmp  # the embedded cluster's folder, removed with it
    assert not os.path.abspath(cache).startswith(os.path.abspath(tmp)), (tmp, cache)
    assert cache == os.environ["TORCHINDUCTOR_CACHE_DIR"]
