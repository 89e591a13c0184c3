"""Statistics of attention probabilities: which keys carry a query's attention, and for how long.

Axis letters: L layers, B batch, N query heads, K kv heads, T query tokens (or decode steps), S key slots,
H head dim.

Every function takes plain arrays (the probabilities `[..., S]` that the decoder returns with `return_probs`, or
what the decode loop captured) and works under `jit`; the leading axes `...` are whatever the caller has (e.g.
`[L, B, N]`), so a statistic is per (layer, row, head) unless the caller reduces first (`membership.any(axis)`
for "in some head's set").

The time-based statistics (`forgotten_tokens`, `revived_tokens`) take a square membership `[..., T, S]` with
T == S where query t is the token stored in slot t: the prompt's rows (prefill) followed by one row per decode
step (`sequence_membership` builds it). With a left-padded row, padding slots are never attended and are left
out through `key_valid`.

Definitions (those of the seed notebook this module reproduces, with `p` = 0.95 there):
- top-p set of a query: the fewest keys whose probabilities, largest first, sum to at least p.
- forgotten key s: eligible (valid and s < S - 3 * look_back, so that at least 2 * look_back queries follow its
  window) and in no set of any query t >= s + look_back.
- revived key s: its activations are its insertion (query s) and every query t > s whose set holds it; it is
  revived when two consecutive activations t0 < t1 are separated by more than look_back queries without it
  (t1 - t0 - 1 > look_back), i.e. a cache evicting keys idle for more than look_back steps would have dropped
  it before it was needed again. Its largest gap is the largest t1 - t0.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _check_p(p: float) -> None:
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p mass p must be in (0, 1], got {p}")


def _check_look_back(look_back: int) -> None:
    if int(look_back) != look_back or look_back < 1:
        raise ValueError(f"look_back must be an integer >= 1, got {look_back}")


def top_p_mask(probs: jax.Array, p: float) -> jax.Array:
    """bool [..., S]: the fewest keys whose probabilities, largest first, sum to at least `p` (the top-p set).

    Keys tied with the smallest member are all included; keys of zero probability never are. Rather than sort
    (~30x slower on XLA's CPU backend, and this runs on every layer of every decode step when a cache evicts by
    it), it bisects for the smallest member: the float32 bit patterns of non-negative numbers are ordered like
    the numbers, so 31 halvings of the integer range find the exact threshold.
    """
    _check_p(p)
    probs = probs.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # [..., S] ordered like probs (all >= 0)
    low = jnp.zeros((*probs.shape[:-1], 1), jnp.int32)  # invariant: the keys >= low hold mass >= p (or all mass)
    high = jnp.max(bits, axis=-1, keepdims=True) + 1  # the keys >= high hold nothing

    def halve(_, bounds):
        low, high = bounds
        middle = low + (high - low) // 2
        enough = jnp.sum(jnp.where(bits >= middle, probs, 0.0), axis=-1, keepdims=True) >= p
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    low, _ = jax.lax.fori_loop(0, 31, halve, (low, high))
    return (bits >= low) & (probs > 0)


def top_p_size(probs: jax.Array, p: float) -> jax.Array:
    """int32 [...]: how many keys the top-p set of each query holds (`top_p_mask(probs, p)` summed over S)."""
    return jnp.sum(top_p_mask(probs, p), axis=-1, dtype=jnp.int32)


def sink_mass(probs: jax.Array, num_sinks: int, key_positions: jax.Array | None = None) -> jax.Array:
    """float32 [...]: each query's attention mass on the first `num_sinks` positions (the attention sinks).

    probs [..., S]; `key_positions` (broadcastable to probs, e.g. [B, 1, S] for probs [B, N, S]) are the keys'
    token positions, so left padding does not shift the sinks; None means slot s holds position s.
    """
    if int(num_sinks) != num_sinks or num_sinks < 1:
        raise ValueError(f"num_sinks must be an integer >= 1, got {num_sinks}")
    if key_positions is None:
        key_positions = jnp.arange(probs.shape[-1])
    return jnp.sum(jnp.where(key_positions < num_sinks, probs.astype(jnp.float32), 0.0), axis=-1)


def sequence_membership(prefill: jax.Array, steps: jax.Array) -> jax.Array:
    """bool [..., T + M, S]: the prompt's top-p sets followed by the decode steps', one query row per slot.

    prefill [..., T, T] (the prefill's queries over the prompt's keys) and steps [M, ..., S] (the scan output of
    the decode loop, step t being the query in slot T + t) with S = T + M.
    """
    num_prompt, num_steps = prefill.shape[-1], steps.shape[0]
    if steps.shape[-1] != num_prompt + num_steps:
        raise ValueError(f"decode steps have {steps.shape[-1]} key slots, expected prompt {num_prompt} + steps "
                         f"{num_steps} = {num_prompt + num_steps}")
    pad = [(0, 0)] * (prefill.ndim - 1) + [(0, num_steps)]
    return jnp.concatenate([jnp.pad(prefill, pad), jnp.moveaxis(steps, 0, -2)], axis=-2)


def key_steps(step_membership: jax.Array, head_axis: int = -2) -> jax.Array:
    """bool [..., S, T]: for each key, the decode steps at which it was in some head's top-p set.

    step_membership [T, ..., S] is the decode loop's scan output (e.g. [T, L, B, N, S]); the heads (axis
    `head_axis` of it, N by default) are reduced with any, so [T, L, B, N, S] gives [L, B, S, T].
    """
    in_some_head = jnp.any(step_membership, axis=head_axis)  # [T, ..., S]
    return jnp.moveaxis(in_some_head, 0, -1)


def _square(membership: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Query and key index grids [T, 1] and [1, S] of a square membership (query t is the token in slot t)."""
    num_queries, num_keys = membership.shape[-2:]
    if num_queries != num_keys:
        raise ValueError(f"membership must be square [..., T, S] with query t in slot t, got T={num_queries}, "
                         f"S={num_keys}")
    return jnp.arange(num_queries)[:, None], jnp.arange(num_keys)[None, :]


def eligible_keys(num_keys: int, look_back: int, key_valid: jax.Array | None = None) -> jax.Array:
    """bool [..., S]: the keys `forgotten_tokens` judges: valid and s < S - 3 * look_back (the seed's range)."""
    _check_look_back(look_back)
    eligible = jnp.arange(num_keys) < num_keys - 3 * look_back
    return eligible if key_valid is None else eligible & key_valid.astype(bool)


def forgotten_tokens(membership: jax.Array, look_back: int, key_valid: jax.Array | None = None) -> jax.Array:
    """bool [..., S]: eligible keys in no top-p set of any query at or after s + look_back.

    membership [..., T, S] square (query t in slot t); key_valid broadcastable to [..., S] (None: all valid).
    Ineligible keys (see `eligible_keys`) are never forgotten.
    """
    query, key = _square(membership)
    late = query >= key + look_back  # [T, S]
    recalled = jnp.any(membership & late, axis=-2)  # [..., S]
    return eligible_keys(membership.shape[-1], look_back, key_valid) & ~recalled


def revived_tokens(membership: jax.Array, look_back: int,
                   key_valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(revived bool [..., S], largest_gap int32 [..., S]) of each key (definitions in the module docstring).

    membership [..., T, S] square (query t in slot t). A key's insertion (query s) counts as its first
    activation; `largest_gap` is the largest difference between consecutive activations (0 for a key never
    active after its insertion) and the key is revived when largest_gap - 1 > look_back. Invalid keys: False, 0.
    """
    _check_look_back(look_back)
    query, key = _square(membership)
    active = (membership & (query > key)) | (query == key)  # [..., T, S]
    stamp = jnp.where(active, query, -1)  # [..., T, S] the query index where active
    last = jax.lax.cummax(stamp, axis=stamp.ndim - 2)  # [..., T, S] last activation at or before t
    previous = jnp.concatenate([jnp.full_like(last[..., :1, :], -1), last[..., :-1, :]], axis=-2)
    gaps = jnp.where(active & (previous >= 0), query - previous, 0)  # [..., T, S]
    largest = jnp.max(gaps, axis=-2).astype(jnp.int32)  # [..., S]
    if key_valid is not None:
        largest = jnp.where(key_valid.astype(bool), largest, 0)
    return largest - 1 > look_back, largest


class KVSimilarity(NamedTuple):
    """Pairwise cosine similarity of cached keys and of cached values, over the pairs i < j of valid slots.

    key_pairs, value_pairs, both_pairs: int32 [..., K], the pairs whose key (value, both) cosine is at least the
    threshold; key_mean, value_mean: float32 [..., K], the mean cosine over all pairs; num_pairs: int32 [...].
    """

    key_pairs: jax.Array
    value_pairs: jax.Array
    both_pairs: jax.Array
    key_mean: jax.Array
    value_mean: jax.Array
    num_pairs: jax.Array


def _cosine(x: jax.Array) -> jax.Array:
    """[..., S, K, H] -> [..., K, S, S] cosine similarity of every pair of slots, per kv head."""
    x = jnp.moveaxis(x.astype(jnp.float32), -2, -3)  # [..., K, S, H]
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return jnp.einsum("...KSH,...KRH->...KSR", x, x)


def kv_cosine_similarity(k: jax.Array, v: jax.Array, threshold: float,
                         key_valid: jax.Array | None = None) -> KVSimilarity:
    """Cosine similarity between cached keys and between cached values, per kv head (e.g. per layer and row).

    k, v [..., S, K, H] (a whole cache [L, B, S, K, H] gives [L, B, K] counts); key_valid [..., S] marks the
    slots that hold tokens (None: all). Counts the upper-triangle pairs (i < j, both valid) whose cosine is at
    least `threshold` for keys, for values and for both, as the seed notebook does per layer (it averages the
similarity over kv heads first; here each kv head counts on its own).
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"cosine threshold must be in [-1, 1], got {threshold}")
    if k.shape != v.shape:
        raise ValueError(f"keys {k.shape} and values {v.shape} must have the same shape [..., S, K, H]")
    num_slots = k.shape[-3]
    valid = jnp.broadcast_to(True if key_valid is None else key_valid.astype(bool), k.shape[:-2])  # [..., S]
    upper = jnp.arange(num_slots)[:, None] < jnp.arange(num_slots)[None, :]  # [S, S]
    pairs = (upper & valid[..., :, None] & valid[..., None, :])[..., None, :, :]  # [..., 1, S, S]
    k_sim, v_sim = _cosine(k), _cosine(v)  # [..., K, S, S]
    k_hit, v_hit = pairs & (k_sim >= threshold), pairs & (v_sim >= threshold)
    count = lambda hit: jnp.sum(hit, axis=(-2, -1), dtype=jnp.int32)  # noqa: E731
    num_pairs = jnp.sum(pairs, axis=(-3, -2, -1), dtype=jnp.int32)  # [...]
    denominator = jnp.maximum(num_pairs, 1)[..., None].astype(jnp.float32)
    mean = lambda sim: jnp.sum(jnp.where(pairs, sim, 0.0), axis=(-2, -1)) / denominator  # noqa: E731
    return KVSimilarity(count(k_hit), count(v_hit), count(k_hit & v_hit), mean(k_sim), mean(v_sim), num_pairs)
