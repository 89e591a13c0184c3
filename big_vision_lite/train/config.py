"""Experiment configs, big_vision style: a Python file whose `get_config(arg=None)` returns a `ConfigDict`.

`load_config("siglip_shapes:arg")` imports the packaged config `big_vision_lite/configs/siglip_shapes.py` and
calls `get_config("arg")` (no argument when there is no `:`): a bare name (no "/", no ".py") always means a
packaged config, from any working directory and from a wheel install; anything else is a path to a config file,
which must exist. `apply_overrides(config, ["optimizer.lr=3e-4", ...])` sets dotted keys from the command line;
an unknown key is an error naming the closest valid keys, and a value is converted to the type the key already
holds, so `--set total_steps=10` stays an int and `--set data.image_size=abc` is refused.
"""

import ast
import difflib
import importlib.util
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
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config(arg=None)")
    config = module.get_config(arg or None)
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
        except (ValueError, SyntaxError):
            return text
        return value if isinstance(value, str) else text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:  # an unset optional: keep the raw string
            return text
        raise ConfigError(f"--set {key}={text}: expected {type(current).__name__} like {current!r}, "
                          "got text that is not a Python literal") from None
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
