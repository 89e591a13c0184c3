"""big_vision `.npz` checkpoints <-> our params pytree (PaliGemma's `img` + `llm`, or any nested dict of arrays).

Axis letters: L layers (decoder layers or ViT encoder blocks).

File format (big_vision's `utils.save_checkpoint` / `load_checkpoint_np`): one `np.savez` archive whose keys are
the '/'-joined paths of the tree, params under `params/`, e.g. "params/img/embedding/kernel",
"params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel", "params/llm/layers/attn/q_einsum/w",
"params/llm/layers/mlp/gating_einsum". numpy has no bfloat16, so `np.save` stores such arrays as raw 2-byte void
("|V2"); reading views those bytes as bfloat16 again (big_vision's `recover_dtype`): the same bits, no rounding.

Layout: big_vision stores the scanned layout, the decoder's layers under `llm/layers` and the ViT's blocks under
`img/Transformer/encoderblock`, each with a leading L axis. `save_npz_params` writes that layout whatever layout
it is given; `load_npz_params` returns it, or with a config checks every shape and relays the blocks out as the
module asks.
"""

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from big_vision_lite.checkpoints.files import CheckpointError
from big_vision_lite.models.gemma import stack_layers
from big_vision_lite.models.paligemma import PaliGemma, PaliGemmaConfig, init_params, relayout_paligemma
from big_vision_lite.models.vit import stack_encoder_blocks
from big_vision_lite.utils.atomic import atomic_file

PARAMS_PREFIX = "params/"
_BFLOAT16_BYTES = np.dtype("V2")  # how np.save writes an ml_dtypes bfloat16 array


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if "/" in str(key):
            raise ValueError(f"parameter name {prefix + str(key)!r} contains '/', the npz path separator")
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}/")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{source}: {'/'.join(parents[:depth + 1])!r} is both an array and a prefix "
                                      f"of {name!r}")
        if leaf in node:
            raise CheckpointError(f"{source}: {name!r} is both an array and a prefix of other names")
        node[leaf] = value
    return tree


def _recover_dtype(a: np.ndarray, name: str, source: str) -> np.ndarray:
    if a.dtype.type is not np.void:
        return a
    if a.dtype.itemsize != 2:
        raise CheckpointError(f"{source}: array {name!r} has raw dtype {a.dtype.str}; only 2-byte void (bfloat16 as "
                              f"np.save writes it) can be recovered")
    return a.view(ml_dtypes.bfloat16)


def to_big_vision_layout(params: Mapping[str, Any]) -> dict[str, Any]:
    """Our PaliGemma params in whichever block layouts -> the scanned layout big_vision stores."""
    params = dict(params)
    if "llm" in params and "layers_0" in params["llm"]:
        depth = sum(1 for k in params["llm"] if k.startswith("layers_"))
        params["llm"] = stack_layers(params["llm"], depth)
    encoder = params.get("img", {}).get("Transformer", {})
    if "encoderblock_0" in encoder:
        depth = sum(1 for k in encoder if k.startswith("encoderblock_"))
        params["img"] = {**params["img"], "Transformer": stack_encoder_blocks(encoder, depth)}
    return params


def save_npz_params(path: str | Path, params: Mapping[str, Any]) -> Path:
    """Writes `params` as a big_vision checkpoint (scanned layout, keys "params/..."); bfloat16 arrays as raw
    2-byte void. The file is written next to `path` and renamed over it: old or new, never half."""
    path = Path(path)
    arrays = {}
    for name, value in _flatten(to_big_vision_layout(params), PARAMS_PREFIX).items():
        a = np.asarray(value)
        arrays[name] = a.view(_BFLOAT16_BYTES) if a.dtype == ml_dtypes.bfloat16 else a
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **arrays)
    return path


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read as an npz archive ({e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: holds a single array, not an npz archive of named arrays")
    with loaded as npz:
        flat = {name: npz[name] for name in npz.files}
    # Training checkpoints hold more than params (optimizer state, ...); released ones may hold bare params.
    if any(name.startswith(PARAMS_PREFIX) for name in flat):
        flat = {name.removeprefix(PARAMS_PREFIX): a for name, a in flat.items() if name.startswith(PARAMS_PREFIX)}
    return {name: _recover_dtype(a, name, str(path)) for name, a in flat.items()}


def _check_shapes(flat: Mapping[str, np.ndarray], cfg: PaliGemmaConfig, source: str) -> None:
    """Every parameter a scanned `PaliGemma(cfg)` has is in `flat` with its shape, and nothing else is."""
    shapes = jax.eval_shape(lambda: init_params(PaliGemma(cfg, scan_layers=True), jax.random.key(0)))
    expected = {name: tuple(s.shape) for name, s in _flatten(shapes).items()}
    for name, shape in expected.items():
        if name not in flat:
            raise CheckpointError(f"{source}: array {PARAMS_PREFIX + name!r} is missing (expected shape {shape})")
        if tuple(flat[name].shape) != shape:
            raise CheckpointError(f"{source}: array {PARAMS_PREFIX + name!r} has shape {tuple(flat[name].shape)}, "
                                  f"the config implies {shape}")
    if unexpected := sorted(set(flat) - set(expected)):
        raise CheckpointError(f"{source}: unexpected arrays {[PARAMS_PREFIX + n for n in unexpected[:5]]} (not part "
                              f"of a PaliGemma of this config)")


def load_npz_params(path: str | Path, cfg: PaliGemmaConfig | None = None,
                    scan_layers: bool = False) -> dict[str, Any]:
    """The params tree of a big_vision `.npz` (numpy arrays, dtypes as stored, bfloat16 recovered).

    Without `cfg`: the tree as stored (big_vision's scanned layout). With `cfg`: every shape is checked against a
    `PaliGemma(cfg)` (CheckpointError naming the array otherwise), then ViT blocks and decoder layers are laid out
    as `PaliGemma(cfg, scan_layers=scan_layers)` expects.
    """
    path = Path(path)
    flat = _read_npz(path)
    if cfg is None:
        return _unflatten(flat, str(path))
    _check_shapes(flat, cfg, str(path))
    return relayout_paligemma(_unflatten(flat, str(path)), cfg, scan_layers)
