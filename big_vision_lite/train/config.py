"""Experiment configs, big_vision style: a Python file whose `get_config(arg=None)` returns a `ConfigDict`.

`load_config("siglip_shapes:arg")` imports the packaged config `big_vision_lite/configs/siglip_shapes.py` and
calls `get_config("arg")` (no argument when there is no `:`): a bare name (no "/", no ".py") always means a
packaged config, from any working directory and from a wheel install; anything else is a path to a config file,
which must exist. `apply_overrides(config, ["optimizer.lr=3e-4", ...])` sets dotted keys from the command line;
an unknown key is an error naming the closest valid keys, and a value is converted to the type the key already
holds, so `--set total_steps=10` stays an int and `--set data.image_size=abc` (or `=True`) is refused.
`config_changes(saved, config)` lists what a resumed run would change against the config it was started with.
"""

import ast
import difflib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_collections

import big_vision_lite.configs


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


PACKAGED_CONFIG_DIR = Path(big_vision_lite.configs.__file__).parent


def packaged_configs() -> list[str]:
    """The names of the configs that ship inside the package."""
    return sorted(p.stem for p in PACKAGED_CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def config_path(name: str) -> Path:
    """The file a config spec's name part means: a packaged config for a bare name, else the path itself."""
    if "/" not in name and not name.endswith(".py"):
        path = PACKAGED_CONFIG_DIR / f"{name}.py"
        if name == "__init__" or not path.is_file():
            raise ConfigError(f"unknown config {name!r}: packaged configs are {', '.join(packaged_configs())}; "
                              f"anything with a '/' or ending in .py is a path to a config file")
        return path
    path = Path(name).expanduser()
    if path.exists() and not path.is_file():
        raise ConfigError(f"config file {path} is a {'directory' if path.is_dir() else 'FIFO or device'}, expected "
                          "a Python file with get_config(arg=None)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (packaged configs are named without a path: "
                          f"{', '.join(packaged_configs())})")
    return path


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Imports `NAME[:arg]` (a packaged config) or `path.py[:arg]` and returns its `get_config(arg)`."""
    name, _, arg = spec.partition(":")
    path = config_path(name)
    module_spec = importlib.util.spec_from_file_location(f"bvl_config_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"config file {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:  # also what Python raises for a file that is not UTF-8
        raise ConfigError(f"config file {path}:{e.lineno}: not valid Python ({e.msg})") from None
    except Exception as e:  # the file's own code failed: name the file, not our import machinery
        raise ConfigError(f"config file {path} failed to import: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg=None)")
    try:
        config = module.get_config(arg or None)
    except Exception as e:
        raise ConfigError(f"config file {path}: get_config({arg or None!r}) failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, expected ml_collections.ConfigDict")
    return config


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Every leaf key of `config` as a dotted path."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _parse_value(text: str, current: Any, key: str) -> Any:
    """`text` as the type of the value `key` holds now (str values are taken verbatim)."""
    if isinstance(current, str):  # verbatim, or the string a quoted literal ('ring', "a b") spells
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return text
        return value if isinstance(value, str) else text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # e.g. {[1]: 2} is unhashable
        if current is None:  # an unset optional: keep the raw string
            return text
        raise ConfigError(f"--set {key}={text}: expected {type(current).__name__} like {current!r}, "
                          "got text that is not a Python literal") from None
    if isinstance(value, bool) != isinstance(current, bool) and current is not None:  # bool is an int subclass
        raise ConfigError(f"--set {key}={text}: expected {type(current).__name__} like {current!r}, "
                          f"got {type(value).__name__}")
    if current is None or isinstance(value, type(current)):
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple | list) and isinstance(value, tuple | list):
        return type(current)(value)
    raise ConfigError(f"--set {key}={text}: expected {type(current).__name__} like {current!r}, "
                      f"got {type(value).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Sets each `dotted.key=value` in place; unknown keys name the closest valid ones."""
    valid = list(flat_keys(config))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            if not close:  # fall back to keys sharing the last component
                close = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--set {key}: unknown config key{hint}")
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = _parse_value(text.strip(), node[leaf], key)
    return config


# Keys a resumed run may change without changing what it computes: how often it logs, evaluates and checkpoints,
# and how the state is laid out over devices (checkpoints restore into any mesh).
RESUMABLE_CHANGES = ("log_every", "eval_every", "ckpt_every", "keep_ckpts", "mesh.", "sharding_rules")


def _flat_json(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> JSON value (tuples as lists) of a config converted to JSON."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat_json(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """`key: old -> new` for every key whose value differs between a run's saved config and `config` (keys only
    in one of them included), except RESUMABLE_CHANGES."""
    old = _flat_json(json.loads(saved.to_json_best_effort()))
    new = _flat_json(json.loads(config.to_json_best_effort()))
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE_CHANGES) or old.get(key, missing) == new.get(key, missing):
            continue
        before = repr(old[key]) if key in old else "(absent)"
        after = repr(new[key]) if key in new else "(absent)"
        changes.append(f"{key}: {before} -> {after}")
    return changes
