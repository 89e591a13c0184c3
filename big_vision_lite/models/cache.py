"""Every KV cache kind, and how one layer's new keys and values are written into each.

Axis letters: L layers, B batch, S cache slots (key tokens), T new tokens, K kv heads, H head dim.

- Concatenation cache (`KVCache` with `index` None): openpi's semantics, `(k, v)` in, grown `(k, v)` out. What a
  prefill returns, and what teacher-forced checks and prefix reuse (a pi0 prefix, then any number of suffixes) use.
- Fixed-capacity cache (`KVCache` with an int32 `index`): preallocated buffers of S slots; a call writes its T
  tokens at `index .. index + T - 1` and advances `index`. What the jitted decode loop uses: shapes never change.
- Slot cache (`SlotCache`): every batch row and kv head holds its own set of tokens in S_i slots per layer, so an
  eviction policy can free different slots per row and head.

Masks are never implied by a cache kind: every kind stores its keys' positions, and the masks in `masks.py` are
derived from them. `LayerKV` is one layer's view of any of the three: Attention calls `write` and gets the keys and
values to attend to, whatever the kind.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from big_vision_lite.models.masks import positions_from_mask


class LayerKV(NamedTuple):
    """One layer's cached keys and values [B, S, K, H] and where a call's new ones go (`write_at`):

    - None: after the cached ones (concatenation; S grows by T);
    - an int32 scalar: slots `write_at .. write_at + T - 1` (fixed capacity; S stays);
    - int32 [B, K]: one slot per row and kv head, for one new token (a slot cache; T must be 1).
    """

    k: jax.Array
    v: jax.Array
    write_at: jax.Array | None = None

    def write(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The keys and values [B, S', K, H] to attend to once the new k, v [B, T, K, H] are written."""
        if self.write_at is None:
            return (jnp.concatenate([self.k.astype(k.dtype), k], axis=1),
                    jnp.concatenate([self.v.astype(v.dtype), v], axis=1))
        if jnp.ndim(self.write_at) == 0:
            at = (0, self.write_at, 0, 0)
            return (jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
                    jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at))
        # Per-head slots: each row and kv head writes its one new token into its own slot.
        assert k.shape[1] == 1, f"per-head slots take one new token at a time, got {k.shape[1]}"
        rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
        heads = jnp.arange(k.shape[2])[None, :]  # [1, K]
        return (self.k.at[rows, self.write_at, heads].set(k[:, 0].astype(self.k.dtype)),
                self.v.at[rows, self.write_at, heads].set(v[:, 0].astype(self.v.dtype)))


class KVCache(NamedTuple):
    """A whole decoder's cache: k, v [L, B, S, K, H] and the keys' positions [B, S].

    `index` None: a concatenation cache; an int32 scalar: a fixed-capacity cache whose slots from `index` on are
    free (which slots hold real keys is the caller's key mask, so free slots are never attended). With unrolled
    layers k and v may also be tuples of L arrays [B, S, K, H] (`per_layer`): what the decode loop carries, so each
    step updates every layer's buffer in place instead of restacking all of them.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    positions: jax.Array
    index: jax.Array | None = None

    @property
    def is_per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    def key_positions(self, positions: jax.Array) -> tuple[jax.Array, int | jax.Array]:
        """(positions [B, S'] of every key once a call's tokens at `positions` [B, T] are written, the slot the
        first of them goes to)."""
        if self.index is None:
            return jnp.concatenate([self.positions, positions], axis=1), self.positions.shape[1]
        return jax.lax.dynamic_update_slice(self.positions, positions, (0, self.index)), self.index

    def written(self, k: Sequence[jax.Array] | jax.Array, v: Sequence[jax.Array] | jax.Array,
                key_positions: jax.Array, count: int) -> "KVCache":
        """This cache after a call wrote `count` tokens: the layers' new k, v and the keys' positions."""
        index = None if self.index is None else self.index + count
        return KVCache(k, v, key_positions, index)

    def with_capacity(self, capacity: int) -> "KVCache":
        """This concatenation cache as a fixed-capacity one of `capacity` slots (the rest free)."""
        if self.index is not None:
            raise ValueError("the cache already has a fixed capacity")
        length = self.positions.shape[1]
        if capacity < length:
            raise ValueError(f"capacity {capacity} is smaller than the {length} cached tokens")
        pad = [(0, 0), (0, 0), (0, capacity - length), (0, 0), (0, 0)]
        stacked = self.stacked()
        return KVCache(jnp.pad(stacked.k, pad), jnp.pad(stacked.v, pad),
                       jnp.pad(self.positions, [(0, 0), (0, capacity - length)]), jnp.asarray(length, jnp.int32))

    def per_layer(self) -> "KVCache":
        """k and v as tuples of L arrays (unrolled layers update each buffer in place)."""
        return self if self.is_per_layer else self._replace(k=tuple(self.k), v=tuple(self.v))

    def stacked(self) -> "KVCache":
        """k and v as [L, ...] arrays (what scanned layers and callers that index layers take)."""
        return self._replace(k=jnp.stack(self.k), v=jnp.stack(self.v)) if self.is_per_layer else self


class SlotCache(NamedTuple):
    """A per-layer cache in which every batch row and kv head holds its own set of tokens (what eviction needs).

    Layer i: `k[i]`, `v[i]` [B, S_i, K, H] and `positions[i]` [B, K, S_i], the absolute position of the token in
    each slot or -1 where the slot is free. S_i may differ between layers. `slots[i]` [B, K] is where the call's
    one new token goes; the caller has already written its position there, so masks come from `positions` alone
    (`masks.slot_mask`).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions: tuple[jax.Array, ...]
    slots: tuple[jax.Array, ...]

    def layer(self, i: int) -> LayerKV:
        return LayerKV(self.k[i], self.v[i], self.slots[i])


def slot_cache_from(cache: KVCache, input_mask: jax.Array, slots: Sequence[int]) -> SlotCache:
    """A prefill's concatenation cache (k, v [L, B, T, K, H]) as a `SlotCache` of `slots[i]` slots in layer i:
    the prompt's tokens in the first T slots of every kv head, padding and the rest free (position -1)."""
    cache = cache.stacked()
    layers, batch, prompt_len, num_kv_heads, _ = cache.k.shape
    if len(slots) != layers:
        raise ValueError(f"got slot counts for {len(slots)} layers, the cache has {layers}")
    if short := [i for i, s in enumerate(slots) if s <= prompt_len]:
        raise ValueError(f"layers {short} get {min(slots[i] for i in short)} slots, not more than the "
                         f"{prompt_len}-token prompt")
    held = jnp.where(input_mask, positions_from_mask(input_mask), -1)  # [B, T]
    ks, vs, positions = [], [], []
    for i, size in enumerate(slots):
        pad = [(0, 0), (0, size - prompt_len), (0, 0), (0, 0)]
        ks.append(jnp.pad(cache.k[i], pad))
        vs.append(jnp.pad(cache.v[i], pad))
        positions.append(jnp.pad(jnp.broadcast_to(held[:, None], (batch, num_kv_heads, prompt_len)),
                                 [(0, 0), (0, 0), (0, size - prompt_len)], constant_values=-1))  # [B, K, S_i]
    empty = tuple(jnp.zeros((batch, num_kv_heads), jnp.int32) for _ in slots)
    return SlotCache(tuple(ks), tuple(vs), tuple(positions), empty)
