"""Attention-guided KV-cache eviction inside the jitted decode step, with fixed shapes.

Axis letters: L layers, B batch, N query heads, K kv heads, G = N / K, S cache slots, V vocab, T tokens.

The cache is a `SlotCache`: per layer, k and v [B, S, K, H] and the absolute position held in every slot
[B, K, S] (-1: free). A decode step writes its token into the first free slot of every row and kv head, runs the
decoder (masks come from the stored positions, RoPE from the absolute ones), updates each policy's per-slot
score [B, K, S] from the step's attention, and frees slots so that the next token finds one. Nothing changes
shape, so the step compiles once.

A row's `capacity` bounds how many tokens each of its kv heads may hold on the evicting layers; a row whose
capacity is at least the slot count never evicts at all (the full-cache reference; recently_activated's threshold
evictions included, so with room for every token each policy equals the full cache exactly). Sinks (the first
`num_sinks` positions) and a recent window (the last `recent_window` positions, the current token included) are
never evicted. Decisions are per row and per kv head: a kv head's score sums (or, for top-p sets, unites) over
its G query heads; `scope="layer"` takes one decision per layer over all heads, as the seed notebook did.

Policies (the score each keeps per slot; the lowest eligible one is evicted when a row is at capacity):
- `full`: never evicts (a control).
- `streaming` (StreamingLLM): the position; the oldest non-sink token goes first.
- `h2o` (heavy hitters): the attention the token has received so far, prefill included.
- `tova`: the attention the token received from the current query.
- `random`: a fresh uniform draw each step (a control).
- `recently_activated` (the seed's): steps since the token was last in some head's top-p set; tokens out of
  every set for more than `threshold` steps are evicted at once, and at capacity the largest counter goes
  (a "forced" eviction, counted).
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.decoding.attention_stats import top_p_mask
from big_vision_lite.decoding.engine import prefill, slot_step
from big_vision_lite.models.cache import KVCache, SlotCache, slot_cache_from

POLICIES = ("full", "streaming", "h2o", "tova", "random", "recently_activated")
SCOPES = ("head", "layer")


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
    """What to evict and what to protect; hashable, so a jitted step specialises on it."""

    name: str = "recently_activated"
    num_sinks: int = 4
    recent_window: int = 16  # the current token is always inside it
    top_p: float = 0.95  # recently_activated: the attention mass a head's set must hold
    threshold: int = 50  # recently_activated: steps out of every set before a token is evicted
    scope: str = "head"

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"eviction policy {self.name!r} is not one of {POLICIES}")
        if self.scope not in SCOPES:
            raise ValueError(f"eviction scope {self.scope!r} is not one of {SCOPES}")
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if self.recent_window < 1:
            raise ValueError(f"recent_window must be >= 1 (it protects the current token), got {self.recent_window}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.threshold < 1:
            raise ValueError(f"threshold must be >= 1 step, got {self.threshold}")

    @property
    def protected(self) -> int:
        """Tokens a head may be left with when everything evictable is gone."""
        return self.num_sinks + self.recent_window


class EvictionState(NamedTuple):
    """The cache, each layer's per-slot score [B, K, S], and per row how many (layer, kv head, token) entries were
    evicted in all and how many of those a full cache forced (the rest: recently_activated's threshold)."""

    cache: SlotCache
    scores: tuple[jax.Array, ...]
    evicted: jax.Array  # [B] int32
    forced: jax.Array  # [B] int32


def check_capacity(policy: EvictionPolicy, capacity: Sequence[int] | np.ndarray, slots: int, prompt_len: int) -> None:
    """Refuses capacities a step could not honour (raised before anything is compiled)."""
    for row, cap in enumerate(np.asarray(capacity).tolist()):
        if cap >= slots:
            continue  # a full row: it holds every token
        if cap <= policy.protected:
            raise ValueError(f"capacity {cap} (row {row}) must exceed num_sinks + recent_window = "
                             f"{policy.protected}: those tokens are never evicted")
        if cap <= prompt_len:
            raise ValueError(f"capacity {cap} (row {row}) must exceed the {prompt_len}-token prompt: the prompt is "
                             f"cached whole before eviction starts")


def init_state(cache: KVCache, input_mask: jax.Array, slots: Sequence[int], policy: EvictionPolicy,
               prefill_probs: jax.Array | None = None) -> EvictionState:
    """A prefill's concatenation cache (k, v [L, B, T, K, H]) as a `SlotCache` of `slots[i]` slots per layer.

    Padding gets no slot (position -1). h2o's scores start from the attention the prompt tokens received in the
    prefill (`prefill_probs` [L, B, N, T, T]); every other score starts at zero.
    """
    slot_cache = slot_cache_from(cache, input_mask, slots)
    batch, num_kv_heads, _ = slot_cache.positions[0].shape
    prompt_len = input_mask.shape[1]
    scores = []
    for i, size in enumerate(slots):
        score = jnp.zeros((batch, num_kv_heads, size), jnp.float32)
        if policy.name == "h2o" and prefill_probs is not None:
            received = _per_kv_head(prefill_probs[i].sum(axis=2), num_kv_heads, policy.scope)  # [B, K, T]
            score = score.at[:, :, :prompt_len].set(received)
        scores.append(score)
    zeros = jnp.zeros((batch,), jnp.int32)
    return EvictionState(slot_cache, tuple(scores), zeros, zeros)


def _per_kv_head(values: jax.Array, num_kv_heads: int, scope: str) -> jax.Array:
    """[B, N, S] -> [B, K, S]: summed over each kv head's query heads (over all heads for the layer scope)."""
    batch, num_heads, slots = values.shape
    grouped = values.reshape(batch, num_kv_heads, num_heads // num_kv_heads, slots).sum(axis=2)
    if scope == "layer":
        grouped = jnp.broadcast_to(grouped.sum(axis=1, keepdims=True), grouped.shape)
    return grouped


def _in_top_p(probs: jax.Array, num_kv_heads: int, policy: EvictionPolicy) -> jax.Array:
    """[B, N, S] -> bool [B, K, S]: in the top-p set of some query head of the kv head (of the layer)."""
    batch, num_heads, slots = probs.shape
    member = top_p_mask(probs, policy.top_p).reshape(batch, num_kv_heads, num_heads // num_kv_heads, slots).any(2)
    if policy.scope == "layer":
        member = jnp.broadcast_to(member.any(axis=1, keepdims=True), member.shape)
    return member


def _update_score(policy: EvictionPolicy, score: jax.Array, probs: jax.Array) -> jax.Array:
    """The per-slot score [B, K, S] after a step whose attention was `probs` [B, N, S]."""
    num_kv_heads = score.shape[1]
    if policy.name == "h2o":
        return score + _per_kv_head(probs, num_kv_heads, policy.scope)
    if policy.name == "tova":
        return _per_kv_head(probs, num_kv_heads, policy.scope)
    if policy.name == "recently_activated":
        return jnp.where(_in_top_p(probs, num_kv_heads, policy), 0.0, score + 1.0)
    return score


def _keep_score(policy: EvictionPolicy, positions: jax.Array, score: jax.Array, rng: jax.Array) -> jax.Array:
    """[B, K, S]: higher is kept longer; the lowest eligible slot is evicted at capacity."""
    if policy.name == "streaming":
        return positions.astype(jnp.float32)
    if policy.name == "random":
        batch, heads, slots = positions.shape
        draw = jax.random.uniform(rng, (batch, 1 if policy.scope == "layer" else heads, slots))
        return jnp.broadcast_to(draw, positions.shape)
    if policy.name == "recently_activated":
        return -score
    return score


def _evict(policy: EvictionPolicy, positions: jax.Array, score: jax.Array, position: jax.Array,
           capacity: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Frees slots of one layer: returns the new positions [B, K, S] and per row the (all, forced) evictions."""
    slots = positions.shape[-1]
    valid = positions >= 0
    protected = (positions < policy.num_sinks) | (positions > position[:, None, None] - policy.recent_window)
    limited = (capacity < slots)[:, None, None]  # full rows never evict
    eligible = valid & ~protected & limited
    stale = eligible & (score > policy.threshold) if policy.name == "recently_activated" else jnp.zeros_like(eligible)
    candidates = eligible & ~stale
    at_capacity = (valid & ~stale).sum(-1) >= capacity[:, None]  # [B, K]: no room for the next token
    forced = at_capacity & candidates.any(-1)
    victim = jnp.argmin(jnp.where(candidates, _keep_score(policy, positions, score, rng), jnp.inf), axis=-1)
    drop = stale | (forced[..., None] & (jnp.arange(slots) == victim[..., None]))  # [B, K, S]
    return jnp.where(drop, -1, positions), drop.sum((1, 2)), forced.sum(-1)


def step(module: nn.Module, params: Any, state: EvictionState, token: jax.Array, position: jax.Array,
         capacity: jax.Array, policy: EvictionPolicy, evict_layers: tuple[bool, ...], rng: jax.Array
         ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...], EvictionState]:
    """One decode step: writes `token` [B] at `position` [B] into a free slot per row and kv head, runs `module`
    (unrolled layers), then updates the scores and evicts on `evict_layers`.

    Returns logits [B, V], the step's attention [B, N, S_i] per layer, the positions each head held during
    the step [B, K, S_i] per layer, and the new state. Call it inside `jit`.
    """
    cache = state.cache
    free_slot = tuple(jnp.argmax(p < 0, axis=-1) for p in cache.positions)  # [B, K] the first free slot
    held, scores = [], []
    for pos, score, slot in zip(cache.positions, state.scores, free_slot, strict=True):
        here = jnp.arange(pos.shape[-1]) == slot[..., None]  # [B, K, S]
        held.append(jnp.where(here, position[:, None, None], pos))
        scores.append(jnp.where(here, 0.0, score))  # a new token starts with a clean score
    cache = SlotCache(cache.k, cache.v, tuple(held), free_slot)
    module = module.clone(return_probs=True)  # the scores feed on every layer's attention
    logits, cache, out = slot_step(module, params, token, cache, position)
    probs = tuple(p[:, :, 0] for p in out["attn_probs"])  # [B, N, S_i]

    evicted, forced = state.evicted, state.forced
    new_positions = list(held)
    if policy.name != "full":
        for i, evict in enumerate(evict_layers):
            if not evict:
                continue
            scores[i] = _update_score(policy, scores[i], probs[i])
            new_positions[i], dropped, pushed = _evict(policy, held[i], scores[i], position, capacity,
                                                       jax.random.fold_in(rng, i))
            evicted, forced = evicted + dropped, forced + pushed
    cache = cache._replace(positions=tuple(new_positions))
    return logits[:, -1], probs, tuple(held), EvictionState(cache, tuple(scores), evicted, forced)


def global_layers(config: Any) -> tuple[bool, ...]:
    """Which layers evict: the full-attention ones (sliding layers already keep only their window)."""
    return tuple(not s for s in config.is_sliding)


def by_position(values: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-slot `values` [..., S] re-indexed by the position each slot holds (`positions` [..., S], -1 free); a
    position no slot holds gets 0. Assumes positions < S, as in a cache that has never evicted."""
    slots = values.shape[-1]
    flat_values, flat_positions = values.reshape(-1, slots), positions.reshape(-1, slots)
    target = jnp.where(flat_positions >= 0, flat_positions, slots)  # free slots scatter out of range: dropped
    rows = jnp.arange(flat_values.shape[0])[:, None]
    return jnp.zeros_like(flat_values).at[rows, target].add(flat_values, mode="drop").reshape(values.shape)


@functools.partial(jax.jit, static_argnames=("module", "policy", "evict_layers", "prompt_len", "greedy_steps",
                                             "reference_row"))
def _teacher_forced(module: nn.Module, params: Any, tokens: jax.Array, capacity: jax.Array, rng: jax.Array, *,
                    policy: EvictionPolicy, evict_layers: tuple[bool, ...], prompt_len: int, greedy_steps: int,
                    reference_row: int) -> dict[str, jax.Array]:
    batch, length = tokens.shape
    slots = length + greedy_steps
    prompt_mask = jnp.ones((batch, prompt_len), bool)
    first_logits, cache, prefill_out = prefill(module, params, tokens[:, :prompt_len], prompt_mask)
    first_logits, prefill_probs = first_logits[:, -1], prefill_out["attn_probs"]
    state = init_state(cache, prompt_mask, [slots] * len(evict_layers), policy, prefill_probs)
    forced_steps = length - prompt_len  # inputs taken from `tokens`; later inputs are the rows' own argmax
    layers = [i for i, e in enumerate(evict_layers) if e]
    num_heads = prefill_probs.shape[2]

    def body(carry, j):
        state, previous = carry
        position = jnp.full((batch,), prompt_len, jnp.int32) + j
        token = jnp.where(j < forced_steps, tokens[:, jnp.minimum(prompt_len + j, length - 1)], previous)
        logits, probs, held, state = step(module, params, state, token, position, capacity, policy, evict_layers,
                                          jax.random.fold_in(rng, j))
        logp = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
        reference = logp[reference_row]
        target = tokens[:, jnp.minimum(prompt_len + j + 1, length - 1)]
        lost = []
        for i in layers:
            group = num_heads // held[i].shape[1]
            kept = jnp.repeat(by_position((held[i] >= 0).astype(jnp.float32), held[i]), group, axis=1)  # [B, N, S]
            reference_probs = by_position(probs[i][reference_row], jnp.repeat(held[i][reference_row], group, 0))
            lost.append(1.0 - (kept * reference_probs[None]).sum(-1).mean(-1))  # [B]
        metrics = {
            "nll": -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0],
            "kl": jnp.sum(jnp.exp(reference) * (reference - logp), axis=-1),
            "top1": jnp.argmax(logp, -1) == jnp.argmax(reference),
            "mass_lost": jnp.mean(jnp.stack(lost), axis=0) if lost else jnp.zeros((batch,)),
            "held": jnp.mean(jnp.stack([(held[i] >= 0).sum(-1).mean(-1) for i in layers] or [jnp.zeros(batch)]), 0),
            "argmax": jnp.argmax(logp, -1),
        }
        return (state, jnp.argmax(logp, -1).astype(jnp.int32)), metrics

    steps = forced_steps + greedy_steps - 1
    (state, _), per_step = jax.lax.scan(body, (state, jnp.argmax(first_logits, -1).astype(jnp.int32)),
                                        jnp.arange(steps))
    per_step["evicted"] = state.evicted
    per_step["forced"] = state.forced
    return per_step


def teacher_forced(module: nn.Module, params: Any, tokens: np.ndarray, capacity: Sequence[int], *,
                   policy: EvictionPolicy, evict_layers: tuple[bool, ...] | None = None, prompt_len: int = 32,
                   greedy_steps: int = 0, reference_row: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds `tokens` [B, T] token by token through evicting decode steps after a `prompt_len` prefill, then
    lets each row continue greedily for `greedy_steps` tokens.

    Row `reference_row` must be a full row (capacity >= T + greedy_steps); the others are compared with it.
    Returns per step s (predicting token prompt_len + s + 1) and row: `nll`, `kl` (reference || row),
    `top1` (same argmax as the reference), `mass_lost` (the reference's attention on keys this row no longer
    holds, averaged over evicting layers and heads), `argmax` (the greedy continuation starts at step
    T - prompt_len - 1), the mean `held` tokens per head, and per row the `evicted` and `forced` totals.
    """
    module = module.clone(return_probs=True)
    module, params = module.for_decoding(params)
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    capacity = np.asarray(capacity, np.int32)
    if capacity.shape != (tokens.shape[0],):
        raise ValueError(f"capacity must give one value per row ({tokens.shape[0]}), got shape {capacity.shape}")
    if not 0 < prompt_len < tokens.shape[1]:
        raise ValueError(f"prompt_len must be in [1, {tokens.shape[1] - 1}] for {tokens.shape[1]} tokens, "
                         f"got {prompt_len}")
    slots = tokens.shape[1] + greedy_steps
    if capacity[reference_row] < slots:
        raise ValueError(f"the reference row {reference_row} must be full: capacity >= {slots}, got "
                         f"{capacity[reference_row]}")
    check_capacity(policy, capacity, slots, prompt_len)
    cfg = module.configs[0]
    evict_layers = global_layers(cfg) if evict_layers is None else tuple(bool(e) for e in evict_layers)
    if len(evict_layers) != cfg.depth:
        raise ValueError(f"evict_layers has {len(evict_layers)} entries, the model has {cfg.depth} layers")
    out = _teacher_forced(module, params, jnp.asarray(tokens), jnp.asarray(capacity), jax.random.key(seed),
                          policy=policy, evict_layers=evict_layers, prompt_len=prompt_len,
                          greedy_steps=greedy_steps, reference_row=reference_row)
    return jax.tree.map(np.asarray, out)
