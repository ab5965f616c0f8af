"""The package layers (docs/architecture.md): common at the bottom, the actor layer above it,
the roles above that, the driver (the job) above them, and the commands (the CLI) on top. A role never imports the driver's
package or another role; nothing below a layer imports what stands above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("rollout", "learner", "reward_service", "feedback")
# package -> the tidal packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "actors": {"common"},
    **{role: {"common", "actors"} for role in ROLES},
    "driver": {"common", "actors", *ROLES},
    "commands": {"common", "actors", *ROLES, "driver"},
}


def tidal_imports(source: str) -> set[str]:
    """The tidal subpackages a module imports (top-level, lazy and TYPE_CHECKING imports alike)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tidal" and len(parts) > 1:
                found.add(parts[1])
    return found


def violations(package: str, source: str) -> set[str]:
    return {p for p in tidal_imports(source) if p != package and p not in ALLOWED[package]}


def test_every_package_imports_only_the_layers_below_it():
    bad = []
    for package in ALLOWED:
        for path in sorted((ROOT / package).glob("**/*.py")):
            wrong = violations(package, path.read_text())
            if wrong:
                bad.append(f"{path.relative_to(ROOT)} imports tidal.{', tidal.'.join(sorted(wrong))}")
    assert not bad, "layering violated:\n" + "\n".join(bad)


@pytest.mark.parametrize("package, source", [
    ("rollout", "from tidal.driver.rl_loop import RLLoop"),  # a role importing the driver's package
    ("learner", "def f():\n    from tidal.rollout.pool import RolloutPool"),  # another role, lazily
    ("common", "import tidal.actors.actor_group"),  # the bottom layer importing upward
    ("actors", "from tidal.learner.group import LearnerGroup"),
    ("driver", "def f():\n    from tidal.commands.cli import main"),  # the job importing the commands above it
])
def test_the_check_catches_upward_and_sideways_imports(package, source):
    assert violations(package, source)


def test_the_check_allows_downward_imports():
    assert not violations("driver", "from tidal.learner.group import LearnerGroup\nfrom tidal.actors import placement")
    assert not violations("commands", "from tidal.driver.job import run_pipeline")
    assert not violations("rollout", "from tidal.actors.weights import pull\nfrom tidal.common.types import PromptBatch")
