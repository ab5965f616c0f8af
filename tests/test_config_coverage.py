"""No configuration field is inert: every leaf of the config tree is read by tidal's code
(outside the config modules and the tests). A field that nothing reads is a setting that
silently does nothing."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from tidal.common.config import TidalConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "actors", "driver", "commands", "rollout", "learner", "reward_service", "feedback")


def leaf_fields(cls: type = TidalConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted path, field name) of every leaf field, list entries (reward.terms[]) included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += leaf_fields(tp, path + ".")
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            out += leaf_fields(args[0], path + "[].")
        else:
            out.append((path, f.name))
    return out


def test_every_config_field_is_read_by_the_code():
    source = "\n".join(p.read_text() for pkg in PACKAGES for p in (ROOT / pkg).glob("**/*.py")
                       if p not in (ROOT / "common" / "config.py", ROOT / "common" / "config_schema.py"))
    inert = [path for path, name in leaf_fields() if not re.search(rf"\.{name}\b", source)]
    assert not inert, f"config fields no code reads (inert settings): {inert}"
