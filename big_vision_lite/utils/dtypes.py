"""The one kind of `dtype` value the package takes: a name ("float32", "bfloat16") or the jnp dtype itself.

Every public function, module and config that takes a dtype passes it through `as_dtype`, so both spellings work
everywhere and a typo is one `ValueError` naming the allowed values. Configs written to disk (JSON, ml_collections)
hold the name (`dtype_name`).
"""

from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.dtype(jnp.float32), "bfloat16": jnp.dtype(jnp.bfloat16)}


def as_dtype(value: Any) -> jnp.dtype:
    """`value` (a name in DTYPES or a jnp/numpy dtype of one) as a jnp dtype; ValueError for anything else."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {value!r} is not one of {sorted(DTYPES)}")
    return dtype


def dtype_name(value: Any) -> str:
    """The name ("float32" or "bfloat16") of a dtype `as_dtype` accepts."""
    return as_dtype(value).name
