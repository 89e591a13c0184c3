"""The one place a model is run token by token: the prefill, a decode step (over a fixed-capacity or a slot cache),
and the jitted decode loop.

Axis letters: B batch, T prompt tokens, S cache slots, N new tokens, V vocab.

Prompts are left-padded; `input_mask` [B, T] marks real tokens. `prefill` runs the prompt through the
concatenation cache; `generate` gives that cache room for the new tokens (fixed capacity), then runs one jitted
`while_loop` of `decode_step`s: it compiles once, has no Python step per token, and stops when every row has
produced an end token or `max_new_tokens` ids. Masks always come from the stored key positions and validity, never
from a "causal" shortcut. A `record` function (a hashable callable, e.g. a frozen dataclass) sees every step's
model outputs (with that step's `logits`) and cache; what it returns is stacked over the steps: that is how
attention inspection and parity's logit margins observe the same loop that generation runs. Any model with the
decoder's call signature works: a `Decoder`, or a `PaliGemma` with `images` (their placeholders filled in the
prefill) and `mask_ar` (a prefix-LM prefill).
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.decoding.samplers import SamplerConfig, sample
from big_vision_lite.models.cache import KVCache, SlotCache
from big_vision_lite.models.gemma import DecoderConfig
from big_vision_lite.models.masks import causal_mask, positions_from_mask, prefill_mask, prefix_lm_mask
from big_vision_lite.models.paligemma import PaliGemma, check_image_tokens

Record = Callable[[dict[str, Any], KVCache], Any]  # (a step's `out` dict + `logits`, the cache after it) -> arrays


def prefill(module: nn.Module, params: Any, tokens: jax.Array, input_mask: jax.Array, *,
            mask_ar: jax.Array | None = None, images: jax.Array | None = None,
            last_logits_only: bool = True) -> tuple[jax.Array, KVCache, dict[str, Any]]:
    """Runs left-padded prompts `tokens` [B, T] through `module` without a cache: (logits [B, 1, V] of the last
    token, or [B, T, V] of every token without `last_logits_only`; the concatenation cache of the prompt; the
    model's `out` dict). The mask is causal, or prefix-LM with `mask_ar` [B, T] (0: one bidirectional prefix).
    Traceable: call it inside jit, or use `jitted_prefill`."""
    positions = positions_from_mask(input_mask)
    attn_mask = prefill_mask(input_mask) if mask_ar is None else prefix_lm_mask(input_mask, mask_ar)
    kwargs = {} if images is None else {"images": images}
    return module.apply({"params": params}, tokens, positions, attn_mask, None, last_logits_only=last_logits_only,
                        **kwargs)


# One jit for every caller: equal modules share its compilations, so a second `generate` compiles nothing.
jitted_prefill = jax.jit(prefill, static_argnums=0, static_argnames="last_logits_only")


def decode_step(module: nn.Module, params: Any, token: jax.Array, cache: KVCache, key_valid: jax.Array,
                position: jax.Array) -> tuple[jax.Array, KVCache, jax.Array, dict[str, Any]]:
    """One step over a fixed-capacity cache: writes `token` [B] at slot `cache.index` and position `position`
    [B, 1], masked from the stored key positions and validity `key_valid` [B, S].

    Returns the logits [B, 1, V], the cache, the new key_valid and the model's `out` dict.
    """
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones_like(key_valid[:, :1]), (0, cache.index))
    key_positions = jax.lax.dynamic_update_slice(cache.positions, position, (0, cache.index))
    mask = causal_mask(position, key_positions, key_valid)  # [B, 1, S]
    logits, cache, out = module.apply({"params": params}, token[:, None], position, mask, cache)
    return logits, cache, key_valid, out


def slot_step(module: nn.Module, params: Any, token: jax.Array, cache: SlotCache, position: jax.Array
              ) -> tuple[jax.Array, SlotCache, dict[str, Any]]:
    """One step over a slot cache (an evicting cache, `cache.SlotCache`): the caller chose each row's and kv head's
    slot and wrote the position [B] of `token` [B] there, so the masks come from the slot positions alone.
    Returns the logits [B, 1, V], the cache and the model's `out` dict."""
    return module.apply({"params": params}, token[:, None], position[:, None], None, cache)


class _LoopState(NamedTuple):
    step: jax.Array  # ids written so far
    token: jax.Array  # [B] the id to write at `step`
    cache: KVCache
    key_valid: jax.Array  # [B, S]
    position: jax.Array  # [B, 1] the position of `token`
    out: jax.Array  # [B, N]
    done: jax.Array  # [B] the row has written an end token
    records: Any  # [N, ...] buffers of `record`'s outputs (None without a record)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9, 11), donate_argnums=(3,))
def _decode_loop(module: nn.Module, params: Any, first: jax.Array, cache: KVCache, key_valid: jax.Array,
                 position: jax.Array, max_new_tokens: int, sampler: SamplerConfig, end_ids: tuple[int, ...],
                 pad_id: int, rng: jax.Array, record: Record | None) -> tuple[jax.Array, KVCache, Any]:
    """Writes `first` [B], then feeds each written id back until every row is done; returns (ids, cache, records).

    The cache comes back so its donated input buffers can be reused for it (updated in place, not copied).
    """
    ends = jnp.asarray(end_ids, jnp.int32)

    def step(s: _LoopState) -> tuple[jax.Array, KVCache, jax.Array, dict[str, Any]]:
        return decode_step(module, params, s.token, s.cache, s.key_valid, s.position)

    def cond(s: _LoopState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        out = s.out.at[:, s.step].set(jnp.where(s.done, pad_id, s.token))
        done = s.done | jnp.isin(s.token, ends)
        logits, cache, key_valid, model_out = step(s)
        records = s.records
        if record is not None:
            kept = record({**model_out, "logits": logits}, cache)
            records = jax.tree.map(lambda buf, r: buf.at[s.step].set(r), records, kept)
        token = sample(logits[:, -1], jax.random.fold_in(rng, s.step), sampler)
        return _LoopState(s.step + 1, token, cache, key_valid, s.position + 1, out, done, records)

    batch = first.shape[0]
    if not module.scan_layers:
        cache = cache.per_layer()  # unrolled layers update each layer's buffer in place (no restacking per step)
    state = _LoopState(jnp.asarray(0, jnp.int32), first, cache, key_valid, position + 1,
                       jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), bool), None)
    if record is not None:
        def first_record() -> Any:
            logits, cache, _, model_out = step(state)
            return record({**model_out, "logits": logits}, cache)

        shapes = jax.eval_shape(first_record)
        state = state._replace(records=jax.tree.map(lambda a: jnp.zeros((max_new_tokens, *a.shape), a.dtype), shapes))
    final = jax.lax.while_loop(cond, body, state)
    return final.out, final.cache.stacked(), final.records


def check_prompts(tokens: np.ndarray, input_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, input_mask as bool) of a left-padded prompt batch [B, T]; refuses empty rows and right padding."""
    tokens, input_mask = np.asarray(tokens), np.asarray(input_mask, bool)
    if tokens.ndim != 2 or tokens.shape != input_mask.shape:
        raise ValueError(f"tokens {tokens.shape} and input_mask {input_mask.shape} must both be [B, T]")
    if empty := [i for i, row in enumerate(input_mask) if not row.any()]:
        raise ValueError(f"prompt rows {empty} are empty: every prompt needs at least one token")
    if not input_mask[:, -1].all():
        raise ValueError("prompts must be left-padded: the last column of input_mask must be all ones")
    return tokens, input_mask


def check_context(config: DecoderConfig, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuses a generation whose longest row (`prompt_tokens` + `max_new_tokens`) passes the decoder's maximum
    context (`max_positions`; unknown when None): positions past it were never trained and RoPE would extrapolate
    silently."""
    limit = config.max_positions
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"the longest prompt ({prompt_tokens} tokens) + max_new_tokens {max_new_tokens} = "
                         f"{prompt_tokens + max_new_tokens} tokens passes the model's maximum context of {limit} "
                         f"(max_position_embeddings); shorten the prompt or lower --max-new-tokens to at most "
                         f"{max(limit - prompt_tokens, 0)}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists of different lengths -> left-padded tokens [B, T] int32 and input_mask [B, T] bool."""
    if not prompts:
        raise ValueError("no prompts given")
    if empty := [i for i, p in enumerate(prompts) if len(p) == 0]:
        raise ValueError(f"prompts {empty} are empty: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):] = ids
        mask[row, width - len(ids):] = True
    return tokens, mask


@dataclasses.dataclass(frozen=True)
class Generated:
    """What `generate` returns: on the host, the ids [B, N] (after a row's end token: `pad_id`) and per row how many
    ids it produced (end included); on the device, the cache after the last step (fixed capacity, layers stacked),
    the prefill's `out` dict and its last-token logits [B, V] (which chose the first id), and the stacked `record`
    outputs ([N, ...] each, step s seeing the logits that choose id s + 1; None without a record; steps after every
    row ended hold zeros)."""

    tokens: np.ndarray
    lengths: np.ndarray
    cache: KVCache
    prefill_out: dict[str, Any]
    first_logits: jax.Array
    records: Any = None


def generate(
    module: nn.Module,
    params: Any,
    tokens: np.ndarray,
    input_mask: np.ndarray,
    max_new_tokens: int,
    *,
    sampler: SamplerConfig | None = None,
    rng: jax.Array | None = None,
    end_ids: Sequence[int] = (),
    pad_id: int = 0,
    cache_length: int | None = None,
    images: np.ndarray | None = None,
    mask_ar: np.ndarray | None = None,
    record: Record | None = None,
) -> Generated:
    """Continues left-padded prompts `tokens` [B, T]: the prefill, then the jitted decode loop; greedy by default.
    Each row stops at one of `end_ids`; `record` (see the module docstring) keeps what it returns of every step.

    `sampler` None is greedy. `cache_length` is the number of cache slots (default T + max_new_tokens, the fewest
    that fit). For PaliGemma, `images` [B, R, R, 3] fill the prompts' image placeholders and `mask_ar` [B, T]
    (zeros: the whole prompt is one bidirectional prefix) makes the prefill mask prefix-LM instead of causal; new
    tokens are always causal.
    """
    tokens, input_mask = check_prompts(tokens, input_mask)
    sampler = sampler or SamplerConfig()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_len = tokens.shape[1]
    capacity = prompt_len + max_new_tokens if cache_length is None else cache_length
    if prompt_len > capacity:
        raise ValueError(f"the prompt batch is {prompt_len} tokens long (padding included), longer than the "
                         f"cache of {capacity} slots (cache_length)")
    check_context(module.config.llm if isinstance(module, PaliGemma) else module.configs[0],
                  int(input_mask.sum(1).max()), max_new_tokens)
    if prompt_len + max_new_tokens > capacity:
        raise ValueError(f"a cache of {capacity} slots (cache_length) is too small for {prompt_len} prompt tokens "
                         f"+ max_new_tokens {max_new_tokens}: it needs at least {prompt_len + max_new_tokens}")
    if not sampler.greedy and rng is None:
        raise ValueError("sampling with temperature > 0 needs an explicit PRNG key (rng)")
    if images is not None:
        check_image_tokens(tokens, module.config)  # the merge fills exactly P placeholders per row
    if mask_ar is not None and np.shape(mask_ar) != tokens.shape:
        raise ValueError(f"mask_ar {np.shape(mask_ar)} must have the shape of tokens {tokens.shape}")
    # Inside the while loop a scanned stack slices every layer's weights out of the stacked arrays on every
    # step (~2x slower decoding on CPU), so decode with unrolled layers: one copy of the weights per call.
    module, params = module.for_decoding(params)
    mask = jnp.asarray(input_mask)
    logits, cache, prefill_out = jitted_prefill(
        module, params, jnp.asarray(tokens), mask, mask_ar=None if mask_ar is None else jnp.asarray(mask_ar),
        images=None if images is None else jnp.asarray(images))
    first_rng, loop_rng = jax.random.split(jax.random.key(0) if rng is None else rng)
    first = sample(logits[:, -1], first_rng, sampler)
    # The loop also feeds the last written id (whose logits it never uses), so T + N slots are written.
    key_valid = jnp.pad(mask, [(0, 0), (0, capacity - prompt_len)])
    out, cache, records = _decode_loop(module, params, first, cache.with_capacity(capacity), key_valid,
                                       cache.positions[:, -1:], max_new_tokens, sampler,
                                       tuple(int(e) for e in end_ids), pad_id, loop_rng, record)
    out = np.asarray(out)
    is_end = np.isin(out, list(end_ids))
    lengths = np.where(is_end.any(1), is_end.argmax(1) + 1, max_new_tokens)
    return Generated(out, lengths, cache, prefill_out, logits[:, -1], records)
