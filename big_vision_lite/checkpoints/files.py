"""Hugging Face folders on disk: config.json plus one or many *.safetensors files, read and written for every model
kind (decoders, SigLIP, PaliGemma). Folders are written atomically: complete or not at all.
"""

import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
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


SAFETENSORS_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def stored_tensor_dtypes(folder: str | Path) -> dict[str, str]:
    """Tensor name -> dtype as stored (safetensors' names: "BF16", "F32", ...) of an HF folder, from the files'
    headers alone (8-byte little-endian length, then JSON): no tensor is read."""
    dtypes = {}
    for path in _safetensors_files(Path(folder)):
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read the safetensors header ({e})") from None
        dtypes |= {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}
    return dtypes


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


ExtraFile = Path | tuple[str, Path]  # a file copied under its own name, or (relative name, file)


def write_hf_folder(folder: str | Path, hf_config: Mapping[str, Any], state: Mapping[str, np.ndarray],
                    extra_files: Iterable[ExtraFile] = ()) -> Path:
    """Writes config.json, model.safetensors (tensors as given) and copies of `extra_files` (e.g. the tokenizer's:
    a path is copied under its own name, a (relative name, path) pair under that name, e.g. "adapter/..."); the
    folder appears only once complete."""
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=2))
        # "format": "pt" is what transformers' safetensors loader expects in the header.
        save_file(dict(state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for item in extra_files:
            name, path = item if isinstance(item, tuple) else (Path(item).name, item)
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / name)
    return Path(folder)
