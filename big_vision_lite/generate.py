"""Greedy decoding with the concatenation KV cache (openpi semantics: the cache grows by one token a step).

Axis letters: B batch, T prompt tokens, S cached tokens, V vocab.

Prompts are left-padded; `input_mask` [B, T] marks real tokens. Masks are always derived from the stored key
positions and validity, never from a "causal" shortcut.
"""

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


def greedy_concat_cache(
    module: nn.Module, params: Any, tokens: np.ndarray, input_mask: np.ndarray, max_new_tokens: int
) -> np.ndarray:
    """Greedy ids [B, max_new_tokens] after left-padded prompts `tokens` [B, T] (no early stop at EOS).

    One jitted prefill, then one jitted step per token; each step compiles once per cache length, which is fine
    for checks and short continuations (the fixed-capacity jitted loop serves real generation).
    """
    if tokens.ndim != 2 or tokens.shape != input_mask.shape:
        raise ValueError(f"tokens {tokens.shape} and input_mask {input_mask.shape} must both be [B, T]")
    if not np.asarray(input_mask)[:, -1].all():
        raise ValueError("prompts must be left-padded: the last column of input_mask must be all ones")
    apply = make_apply(module)
    input_mask = jnp.asarray(input_mask, bool)
    positions = positions_from_mask(input_mask)
    logits, cache, _ = apply(params, jnp.asarray(tokens), positions, prefill_mask(input_mask), None)
    key_valid = input_mask
    next_token = jnp.argmax(logits[:, -1], axis=-1)  # [B]
    position = positions[:, -1:]
    generated = [next_token]
    for _ in range(max_new_tokens - 1):
        position = position + 1
        key_valid = jnp.concatenate([key_valid, jnp.ones_like(key_valid[:, :1])], axis=1)
        key_positions = jnp.concatenate([cache.positions, position], axis=1)
        mask = causal_mask(position, key_positions, key_valid)  # [B, 1, S + 1]
        logits, cache, _ = apply(params, next_token[:, None], position, mask, cache)
        next_token = jnp.argmax(logits[:, -1], axis=-1)
        generated.append(next_token)
    return np.asarray(jnp.stack(generated, axis=1))
