"""The one config tree: frozen dataclasses (their schema in `tidal.common.config_schema`, re-exported
here), loaded from YAML with dotted overrides.

`load_config("configs/demo.yaml", ["learner.lr=1e-6"])` reads the file, applies the overrides,
and validates everything up front: an unknown key, a wrong type or an out-of-range value raises
`ConfigError` naming the key path, the bad value, what is expected and, for a misspelled key,
the closest valid key. Nothing is rewritten silently after validation.

Every field carries its documentation as `field(metadata={"doc": ...})`; `describe()` prints it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tidal.common.config_schema import (AlgorithmConfig, ClusterConfig, ConfigError, DataConfig, DPOStage,
                                        FeedbackConfig, LearnerConfig, LoggingConfig, ModelConfig, RewardConfig,
                                        RewardTerm, RMStage, RolloutConfig, SFTStage, StagesConfig, TidalConfig, doc,
                                        RAY_TEMP_DIR_MAX)

__all__ = ["RAY_TEMP_DIR_MAX", "AlgorithmConfig", "ClusterConfig", "ConfigError", "DataConfig", "DPOStage", "FeedbackConfig",
           "LearnerConfig", "LoggingConfig", "ModelConfig", "RewardConfig", "RewardTerm", "RMStage", "RolloutConfig",
           "SFTStage", "StagesConfig", "TidalConfig", "doc", "load_config", "from_dict", "to_dict", "to_yaml", "describe"]


# ----------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-6` as a float: PyYAML follows YAML 1.1, where a float needs a
    dot, so `lr: 1e-5` and `learner.lr=1e-6` would otherwise arrive as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict:
    """YAML keeps the last of two equal keys; a config that says one thing twice is a mistake."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key '{key}' (first at line {seen[key]}); "
                              f"keep one of them.")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


# Keys that were renamed: the old name in a file or an override is an error naming the new one
# (a silent alias would let two names for one setting drift apart in configs and docs).
RENAMED_KEYS = {"algorithm.ppo_epochs": "algorithm.update_epochs"}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TidalConfig:
    """Read YAML (or start from defaults when path is None), apply `a.b=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8.") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        if raw is None:  # an empty file is more likely a wrong path or an unsaved editor than a wish for defaults
            raise ConfigError(f"{p}: the file is empty; write the sections to change (e.g. 'algorithm: {{steps: 5}}'), "
                              f"or omit the file to use the defaults.")
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for ov in overrides:
        _apply_override(raw, ov)
    return from_dict(TidalConfig, raw, "")


def _apply_override(raw: dict, override: str) -> None:
    """`a.b=v`; list entries by index in either notation: `reward.terms.0.weight=0.5` or
    `reward.terms[0].weight=0.5` (the one error messages use). Index len(list) appends an entry."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value (e.g. learner.lr=1e-6)")
    key, value = override.split("=", 1)
    parts = re.sub(r"\[(\d+)\]", r".\1", key.strip()).split(".")
    node: Any = raw
    defaults: Any = to_dict(TidalConfig())  # a list indexed but not in the file starts as its default
    for i, part in enumerate(parts):
        where, last = ".".join(parts[:i]), i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(f"override {override!r}: {where} is a list of {len(node)} entries; index it with "
                                  f"0..{len(node) - 1} (or {len(node)} to add one), e.g. {where}.0")
            part = int(part)
            if part == len(node):
                node.append({})
            defaults = defaults[part] if isinstance(defaults, list) and part < len(defaults) else {}
        elif isinstance(node, dict):
            defaults = defaults.get(part) if isinstance(defaults, dict) else None
        else:
            raise ConfigError(f"override {override!r}: {where} is not a section")
        if last:
            try:
                node[part] = yaml.load(value, Loader=_Loader) if value.strip() else None
            except yaml.YAMLError as e:
                raise ConfigError(f"override value {value!r} is not valid YAML: {e}") from None
            return
        if (node[part] if isinstance(node, list) else node.get(part)) is None:
            # absent, or an empty section (`stages:` in YAML reads as null)
            node[part] = copy.deepcopy(defaults) if isinstance(defaults, list) else {}
        node = node[part]


def from_dict(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and ranges."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if _join(path, key) in RENAMED_KEYS:
            new = RENAMED_KEYS[_join(path, key)]
            raise ConfigError(f"'{_join(path, key)}' was renamed to '{new}'; write {new.rsplit('.', 1)[1]}: "
                              f"{raw[key]!r} in the {path or 'top'} section (or the override {new}={raw[key]!r}).")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" Did you mean '{_join(path, close[0])}'?" if close else ""
            raise ConfigError(f"unknown key '{_join(path, key)}'.{hint} Valid keys here: {', '.join(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], _join(path, name), f.metadata)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{path or '<root>'}: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, path: str, meta: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, meta)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value is False and "off" in args:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}.{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{path}[{i}]", meta) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise ConfigError(f"{path}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
        value = tp(value)
        if not math.isfinite(value):  # NaN passes every range check; no setting means infinity (None is "off")
            raise ConfigError(f"{path}: {value!r} is not a finite number; give a number (e.g. {path}=1e-5).")
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(f"{path}: {value!r} is out of range; expected a value {rng}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def to_yaml(cfg: TidalConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cfg: Any = None, prefix: str = "") -> list[str]:
    """One line per leaf field of a resolved config (default: all defaults): key path, value,
    the default when the value differs from it, and the documentation."""
    cfg = TidalConfig() if cfg is None else cfg
    lines = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key, value = _join(prefix, f.name), getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(value, key)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        changed = "" if to_dict(value) == to_dict(default) else f"  (default {to_dict(default)!r})"
        lines.append(f"{key} = {to_dict(value)!r}{changed}  # {f.metadata.get('doc', '')}")
        if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for i, entry in enumerate(value):  # fields of each list entry (e.g. reward.terms[0].kind)
                lines += describe(entry, f"{key}[{i}]")
    return lines
