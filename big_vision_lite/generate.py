"""Greedy decoding: a prefill through the concatenation cache, then steps through a fixed-capacity cache.

Axis letters: B batch, T prompt tokens, S cache slots, V vocab.

Prompts are left-padded; `input_mask` [B, T] marks real tokens. Masks are always derived from the stored key
positions and validity, never from a "causal" shortcut. After the prefill the cache is given room for the new
tokens, so every decode step has the same shapes and compiles once.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models.attention import causal_mask
from big_vision_lite.models.gemma import KVCache, positions_from_mask, prefill_mask


def make_apply(module: nn.Module) -> Callable[..., tuple[jax.Array, KVCache, dict[str, Any]]]:
    """A jitted `(params, tokens, positions, attn_mask, cache) -> (logits, cache, out)` for `module`."""
    return jax.jit(lambda params, tokens, positions, mask, cache: module.apply({"params": params}, tokens, positions,
                                                                              mask, cache))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def _greedy_step(module: nn.Module, params: Any, token: jax.Array, cache: KVCache, key_valid: jax.Array,
                 position: jax.Array) -> tuple[jax.Array, KVCache, jax.Array]:
    """Feeds token [B] at `position` [B, 1] into the fixed cache; returns the next greedy token and the state."""
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones_like(key_valid[:, :1]), (0, cache.index))
    key_positions = jax.lax.dynamic_update_slice(cache.positions, position, (0, cache.index))
    mask = causal_mask(position, key_positions, key_valid)  # [B, 1, S]
    logits, cache, _ = module.apply({"params": params}, token[:, None], position, mask, cache)
    return jnp.argmax(logits[:, -1], axis=-1), cache, key_valid


def greedy(
    module: nn.Module, params: Any, tokens: np.ndarray, input_mask: np.ndarray, max_new_tokens: int
) -> np.ndarray:
    """Greedy ids [B, max_new_tokens] after left-padded prompts `tokens` [B, T] (no early stop at EOS)."""
    if tokens.ndim != 2 or tokens.shape != input_mask.shape:
        raise ValueError(f"tokens {tokens.shape} and input_mask {input_mask.shape} must both be [B, T]")
    if not np.asarray(input_mask)[:, -1].all():
        raise ValueError("prompts must be left-padded: the last column of input_mask must be all ones")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_mask = jnp.asarray(input_mask, bool)
    positions = positions_from_mask(input_mask)
    logits, cache, _ = make_apply(module)(params, jnp.asarray(tokens), positions, prefill_mask(input_mask), None)
    capacity = tokens.shape[1] + max_new_tokens - 1
    cache = cache.with_capacity(capacity)
    key_valid = jnp.pad(input_mask, [(0, 0), (0, capacity - tokens.shape[1])])
    token = jnp.argmax(logits[:, -1], axis=-1)  # [B]
    position = positions[:, -1:]
    generated = [token]
    for _ in range(max_new_tokens - 1):
        position = position + 1
        token, cache, key_valid = _greedy_step(module, params, token, cache, key_valid, position)
        generated.append(token)
    return np.asarray(jnp.stack(generated, axis=1))
