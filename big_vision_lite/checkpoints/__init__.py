"""Checkpoint loading: whatever the source, `load_decoder` returns a Linen module and its params."""

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from big_vision_lite.checkpoints.hf import load_hf
from big_vision_lite.models.gemma import Decoder, DecoderConfig, unstack_layers

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str) -> jnp.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_decoder(
    name_or_path: str | Path,
    dtype: str = "float32",
    *,
    scan_layers: bool = True,
    **module_kwargs: Any,
) -> tuple[Decoder, dict[str, Any], DecoderConfig]:
    """A packaged model name or HF folder -> (Decoder, params on device in `dtype`, config).

    Params and compute share `dtype` here; pass `param_dtype` in `module_kwargs` to store them differently.
    """
    from big_vision_lite.checkpoints.packaged import resolve_model_path

    cfg, params = load_hf(resolve_model_path(str(name_or_path)))
    compute = parse_dtype(dtype)
    param_dtype = module_kwargs.pop("param_dtype", compute)
    if not scan_layers:
        params = unstack_layers(params, cfg.depth)
    params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
    module = Decoder((cfg,), dtype=compute, param_dtype=param_dtype, scan_layers=scan_layers, **module_kwargs)
    return module, params, cfg
