"""Attention masks and token positions, all built from positions and validity, never from a "causal" shortcut.

Axis letters: B batch, T query tokens, S key tokens, K kv heads.

A mask is boolean, True where a query may attend to a key: `[B, T, S]`, or `[B, K, T, S]` when every kv head
holds its own keys (an evicting cache). It stays boolean until Attention applies it to the logits. Because every
mask here is derived from stored key positions and validity, cache slots can be freed or refilled without any
shape change.
"""

import jax
import jax.numpy as jnp


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
    """Positions [B, T] of the valid tokens in a (left-)padded batch: cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(query_positions: jax.Array, key_positions: jax.Array, key_valid: jax.Array) -> jax.Array:
    """[B, T, S]: a query sees valid keys at the same or earlier positions."""
    return (key_positions[:, None, :] <= query_positions[:, :, None]) & key_valid[:, None, :]


def window_mask(query_positions: jax.Array, key_positions: jax.Array, window: int) -> jax.Array:
    """[B, T, S]: keys fewer than `window` positions behind the query (the query itself included)."""
    return query_positions[:, :, None] - key_positions[:, None, :] < window


def prefill_mask(input_mask: jax.Array) -> jax.Array:
    """[B, T, T] causal mask of a padded batch of prompts (padding is never attended, nor attends)."""
    positions = positions_from_mask(input_mask)
    valid = input_mask.astype(bool)
    return causal_mask(positions, positions, valid) & valid[:, :, None]


def prefix_lm_mask(input_mask: jax.Array, mask_ar: jax.Array) -> jax.Array:
    """[B, T, T] prefix-LM mask (big_vision / openpi `make_attn_mask`) from input_mask [B, T] (valid tokens) and
    mask_ar [B, T] (1 = a causal step).

    A token sees every valid token whose running count of `mask_ar` ones is not larger than its own: a run of zeros
    (PaliGemma's image + prompt) is one bidirectional block, each one (a suffix token) starts a causal step, and
    padding is never seen.
    """
    steps = jnp.cumsum(mask_ar.astype(jnp.int32), axis=1)  # [B, T]
    valid = input_mask.astype(bool)
    return (steps[:, None, :] <= steps[:, :, None]) & valid[:, None, :] & valid[:, :, None]


def mutual_mask(attn_mask: jax.Array, key_offset: int | jax.Array) -> jax.Array:
    """[B, T, S]: pairs of this call's tokens that see each other, i.e. a bidirectional block such as PaliGemma's
    image + prefix. The call's T tokens are keys `key_offset .. key_offset + T - 1` of `attn_mask` [B, T, S].

    Sliding layers OR this onto the window, as transformers' blockwise overlay does: a prefix longer than the
    window (PaliGemma 2 at 896 pixels: 4096 image tokens) stays fully bidirectional. Keys from earlier calls are
    never in the block, which holds for a prefix that is prefilled in one call.
    """
    t = attn_mask.shape[1]
    new = jax.lax.dynamic_slice_in_dim(attn_mask, key_offset, t, axis=2)  # [B, T, T]: query i, new token j
    mutual = new & jnp.swapaxes(new, 1, 2)
    return jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(attn_mask), mutual, key_offset, axis=2)


def sliding_mask(attn_mask: jax.Array, query_positions: jax.Array, key_positions: jax.Array, window: int,
                 new_keys_at: int | jax.Array, keep_blocks: bool = True) -> jax.Array:
    """[B, T, S]: `attn_mask` narrowed to the sliding window, except inside this call's bidirectional block when
    `keep_blocks` (PaliGemma 2); without, the window cuts through a block too (Gemma 3: keys of its own image
    further back than the window are dropped, later ones kept, as `window_mask` bounds the past only)."""
    narrowed = attn_mask & window_mask(query_positions, key_positions, window)
    if attn_mask.shape[1] == 1 or not keep_blocks:  # a decode step is its own block, always in its window
        return narrowed
    return narrowed | (attn_mask & mutual_mask(attn_mask, new_keys_at))


def slot_mask(query_positions: jax.Array, slot_positions: jax.Array, window: int | None) -> jax.Array:
    """[B, K, T, S] for a cache whose kv heads each hold their own tokens: slot_positions [B, K, S] holds each
    slot's token position, or -1 where the slot is free. A query sees the filled slots at or before its position
    (and within `window` of it, on sliding layers)."""
    query = query_positions[:, None, :, None]  # [B, 1, T, 1]
    key = slot_positions[:, :, None, :]  # [B, K, 1, S]
    mask = (key >= 0) & (key <= query)
    if window is not None:
        mask &= query - key < window
    return mask
