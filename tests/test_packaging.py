"""One import package `tidal`: no stray top-level modules, and a wheel that installs and imports."""

import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["common", "actors", "driver", "commands", "learner", "rollout", "reward_service", "feedback"]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


@pytest.mark.parametrize("name", ["tidal", *[f"tidal.{s}" for s in SUBPACKAGES]])
def test_subpackages_import(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(REPO)


def test_no_top_level_subpackage_names_outside_the_repo(tmp_path):
    code = ("import importlib.util, sys; "
            f"found = [m for m in {SUBPACKAGES!r} if importlib.util.find_spec(m)]; "
            "print(found); sys.exit(bool(found))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"top-level modules importable from the venv: {res.stdout}{res.stderr}"
    # ...while the one package is
    res = subprocess.run([sys.executable, "-c", "import tidal.common.config"], cwd=tmp_path, env=clean_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy: setuptools writes build/ and egg-info next to the sources, and a stale
    # build/lib in the checkout could hide a missing file (and would race other test runs).
    src = tmp_path_factory.mktemp("src")
    for name in ["pyproject.toml", "README.md", "__init__.py"]:
        shutil.copy2(REPO / name, src / name)
    for name in SUBPACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
                         cwd=src, env=clean_env(PIP_NO_INPUT="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list(out.glob("tidal-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_only_the_tidal_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tidal"}, top
    for path in ["tidal/__init__.py", "tidal/common/config.py", "tidal/common/metrics.py", "tidal/commands/cli.py",
                 *[f"tidal/{s}/__init__.py" for s in SUBPACKAGES]]:
        assert path in names, f"{path} missing from the wheel"
    # every source file of the checkout's package folders made it in (a nested folder must be
    # listed in pyproject's packages, or it silently stays out of the wheel)
    for sub in SUBPACKAGES:
        for py in (REPO / sub).rglob("*.py"):
            rel = py.relative_to(REPO).as_posix()
            assert "__pycache__" in rel or f"tidal/{rel}" in names, f"{rel} missing from the wheel"
    # the labeling app's pages, script and stylesheet ship in the package (no CDN)
    for asset in (REPO / "feedback" / "static").iterdir():
        assert f"tidal/feedback/static/{asset.name}" in names, f"{asset.name} missing from the wheel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "tidal = tidal.commands.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_installs_and_imports(wheel, tmp_path):
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                         env=clean_env(PIP_NO_INPUT="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not any((target / s).exists() for s in SUBPACKAGES)
    code = ("import tidal, tidal.common.config, tidal.commands.cli, tidal.rollout, tidal.learner, tidal.reward_service; "
            "print(tidal.__file__); print(tidal.common.config.__file__); "
            "tidal.common.config.load_config(None, ['learner.lr=1e-6'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(PYTHONPATH=str(target)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for line in res.stdout.split():
        assert Path(line).is_relative_to(target), f"imported {line}, not the installed wheel"
