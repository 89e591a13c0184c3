"""Hugging Face folders on disk: config.json plus one or many *.safetensors files, read and written for every model
kind (decoders, SigLIP, PaliGemma). Folders are written atomically: complete or not at all.
"""

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from big_vision_lite.utils.atomic import atomic_folder
from big_vision_lite.utils.inputs import read_text_file

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or tensor at fault."""


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file found")
    return files


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, Path, np.ndarray]]:
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, path, f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (an HF folder needs config.json and *.safetensors)")
    try:
        config = json.loads(read_text_file(path, "config file"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_folder_tensors(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """({name: tensor}, {name: the file it came from}) over every safetensors file of `folder`."""
    state, where = {}, {}
    for name, path, tensor in _read_tensors(_safetensors_files(folder)):
        state[name], where[name] = tensor, path
    return state, where


def check_tensor_shapes(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], source: str,
                        where: Mapping[str, Any] | None = None) -> None:
    """Every `expected` tensor is in `state` with its shape; the CheckpointError names the tensor and its file
    (`where[name]`, else `source`)."""
    where = where or {}
    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: tensor {name!r} is missing (expected shape {shape})")
        got = tuple(np.shape(state[name]))
        if got != shape:
            raise CheckpointError(f"{where.get(name, source)}: tensor {name!r} has shape {got}, "
                                  f"config.json implies {shape}")


def write_hf_folder(folder: str | Path, hf_config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Path:
    """Writes config.json and model.safetensors (tensors as given); the folder appears only once complete."""
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=2))
        # "format": "pt" is what transformers' safetensors loader expects in the header.
        save_file(dict(state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return Path(folder)
