"""Generation: a prefill through the concatenation cache, then one jitted `while_loop` over a fixed-capacity cache.

Axis letters: B batch, T prompt tokens, S cache slots, N new tokens, V vocab.

Prompts are left-padded; `input_mask` [B, T] marks real tokens. Masks are always derived from the stored key
positions and validity, never from a "causal" shortcut. After the prefill the cache gets room for the new tokens,
so the decode loop has fixed shapes: it compiles once, runs without a Python step per token, and stops when every
row has produced an end token or `max_new_tokens` ids.
"""

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.checkpoints import load_decoder
from big_vision_lite.models.attention import causal_mask
from big_vision_lite.models.gemma import KVCache, positions_from_mask, prefill_mask
from big_vision_lite.models.paligemma import check_image_tokens, make_attn_mask
from big_vision_lite.samplers import SamplerConfig, sample
from big_vision_lite.timing import timed

GREEDY = SamplerConfig()


@functools.partial(jax.jit, static_argnums=0, static_argnames="last_logits_only")
def _apply(module: nn.Module, params: Any, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
           cache: KVCache | None, last_logits_only: bool = False, images: jax.Array | None = None
           ) -> tuple[jax.Array, KVCache, dict[str, Any]]:
    kwargs = {"last_logits_only": last_logits_only} | ({} if images is None else {"images": images})
    return module.apply({"params": params}, tokens, positions, mask, cache, **kwargs)


def make_apply(module: nn.Module) -> Callable[..., tuple[jax.Array, KVCache, dict[str, Any]]]:
    """A jitted `(params, tokens, positions, attn_mask, cache, last_logits_only=False, images=None)
    -> (logits, cache, out)`; `images` only for models that take them (PaliGemma).

    One jit for all calls: equal modules share its compilations, so a second `generate` compiles nothing.
    """
    return functools.partial(_apply, module)


@dataclasses.dataclass(frozen=True)
class Generated:
    """`tokens` [B, N] (after a row's end token: `pad_id`), and per row how many ids it produced (end included)."""

    tokens: np.ndarray
    lengths: np.ndarray


class _LoopState(NamedTuple):
    step: jax.Array  # ids written so far
    token: jax.Array  # [B] the id to write at `step`
    cache: KVCache
    key_valid: jax.Array  # [B, S]
    position: jax.Array  # [B, 1] the position of `token`
    out: jax.Array  # [B, N]
    done: jax.Array  # [B] the row has written an end token
    rng: jax.Array


def decode_step(module: nn.Module, params: Any, token: jax.Array, cache: KVCache, key_valid: jax.Array,
                position: jax.Array) -> tuple[jax.Array, KVCache, jax.Array, dict[str, Any]]:
    """One step of a decode loop over a fixed-capacity cache: writes `token` [B] at slot `cache.index` and
    position `position` [B, 1], masked from the stored key positions and validity `key_valid` [B, S].

    Returns the logits [B, 1, V], the cache, the new key_valid and the decoder's `out` dict.
    """
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones_like(key_valid[:, :1]), (0, cache.index))
    key_positions = jax.lax.dynamic_update_slice(cache.positions, position, (0, cache.index))
    mask = causal_mask(position, key_positions, key_valid)  # [B, 1, S]
    logits, cache, out = module.apply({"params": params}, token[:, None], position, mask, cache)
    return logits, cache, key_valid, out


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8, 9), donate_argnums=(3,))
def _decode_loop(module: nn.Module, params: Any, first: jax.Array, cache: KVCache, key_valid: jax.Array,
                 position: jax.Array, max_new_tokens: int, sampler: SamplerConfig, end_ids: tuple[int, ...],
                 pad_id: int, rng: jax.Array) -> tuple[jax.Array, jax.Array, KVCache]:
    """Writes `first` [B], then feeds each written id back until every row is done; returns (out, done, cache).

    The cache comes back so its donated input buffers can be reused for it (updated in place, not copied).
    """
    ends = jnp.asarray(end_ids, jnp.int32)

    def cond(s: _LoopState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        out = s.out.at[:, s.step].set(jnp.where(s.done, pad_id, s.token))
        done = s.done | jnp.isin(s.token, ends)
        logits, cache, key_valid, _ = decode_step(module, params, s.token, s.cache, s.key_valid, s.position)
        token = sample(logits[:, -1], jax.random.fold_in(s.rng, s.step), sampler)
        return _LoopState(s.step + 1, token, cache, key_valid, s.position + 1, out, done, s.rng)

    batch = first.shape[0]
    if not getattr(module, "scan_layers", True):
        # Unrolled layers decode from per-layer buffers, each updated in place (no restacking per step).
        cache = cache._replace(k=tuple(cache.k), v=tuple(cache.v))
    state = _LoopState(jnp.asarray(0, jnp.int32), first, cache, key_valid, position + 1,
                       jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), bool), rng)
    final = jax.lax.while_loop(cond, body, state)
    cache = final.cache
    if isinstance(cache.k, tuple):
        cache = cache._replace(k=jnp.stack(cache.k), v=jnp.stack(cache.v))
    return final.out, final.done, cache


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


def generate(
    module: nn.Module,
    params: Any,
    tokens: np.ndarray,
    input_mask: np.ndarray,
    max_new_tokens: int,
    *,
    sampler: SamplerConfig = GREEDY,
    rng: jax.Array | None = None,
    end_ids: Sequence[int] = (),
    pad_id: int = 0,
    cache_length: int | None = None,
    images: np.ndarray | None = None,
    mask_ar: np.ndarray | None = None,
) -> Generated:
    """Continues left-padded prompts `tokens` [B, T]; greedy by default. Each row stops at one of `end_ids`.

    `cache_length` is the number of cache slots (default T + max_new_tokens, the fewest that fit). For PaliGemma,
    `images` [B, R, R, 3] fill the prompts' image placeholders and `mask_ar` [B, T] (zeros: the whole prompt is
    one bidirectional prefix) makes the prefill mask prefix-LM instead of causal; new tokens are always causal.
    """
    tokens, input_mask = check_prompts(tokens, input_mask)
    prompt_len = tokens.shape[1]
    capacity = prompt_len + max_new_tokens if cache_length is None else cache_length
    if prompt_len > capacity:
        raise ValueError(f"the prompt batch is {prompt_len} tokens long (padding included), longer than the "
                         f"cache of {capacity} slots (cache_length)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
    positions = positions_from_mask(mask)
    attn_mask = prefill_mask(mask) if mask_ar is None else make_attn_mask(mask, jnp.asarray(mask_ar))
    logits, cache, _ = make_apply(module)(params, jnp.asarray(tokens), positions, attn_mask, None,
                                          last_logits_only=True, images=None if images is None else jnp.asarray(images))
    first_rng, loop_rng = jax.random.split(jax.random.key(0) if rng is None else rng)
    first = sample(logits[:, -1], first_rng, sampler)
    # The loop also feeds the last written id (whose logits it never uses), so T + N slots are written.
    key_valid = jnp.pad(mask, [(0, 0), (0, capacity - prompt_len)])
    out, _, _ = _decode_loop(module, params, first, cache.with_capacity(capacity), key_valid, positions[:, -1:],
                          max_new_tokens, sampler, tuple(int(e) for e in end_ids), pad_id, loop_rng)
    out = np.asarray(out)
    is_end = np.isin(out, list(end_ids))
    lengths = np.where(is_end.any(1), is_end.argmax(1) + 1, max_new_tokens)
    return Generated(out, lengths)


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


def greedy(module: nn.Module, params: Any, tokens: np.ndarray, input_mask: np.ndarray,
           max_new_tokens: int) -> np.ndarray:
    """Greedy ids [B, max_new_tokens] with no early stop (what parity compares with transformers)."""
    return generate(module, params, tokens, input_mask, max_new_tokens).tokens


def generate_text(
    model: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    sampler: SamplerConfig = GREEDY,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Loads `model` (a packaged name or an HF folder) and its tokenizer and continues `prompts` as one batch.

    Returns the completions (text and ids, each row stopped at its first end token) with the timings: `load_s`,
    `compile_s` (tracing + XLA compilation) and `run_s` (the rest of the generate call), and `tokens_per_s`
    (new tokens of all rows / run_s).
    """
    from big_vision_lite.tokenizer import load_tokenizer

    with timed() as load:
        tokenizer = load_tokenizer(model)
        module, params, _ = load_decoder(model, dtype, scan_layers=False)  # what the decode loop runs
    tokens, mask = left_pad(tokenizer.encode_batch(prompts), tokenizer.pad_id)
    with timed() as run:
        result = generate(module, params, tokens, mask, max_new_tokens, sampler=sampler, rng=jax.random.key(seed),
                          end_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    completions = []
    for prompt, ids, length in zip(prompts, result.tokens, result.lengths, strict=True):
        ids = ids[:length].tolist()
        completions.append({"prompt": prompt, "completion": tokenizer.decode(ids), "tokens": ids,
                            "stopped_at_end": bool(length and ids[-1] in tokenizer.eos_ids)})
    return _report(model, dtype, sampler, seed, max_new_tokens, completions, result, load, run)


def _report(model: str, dtype: str, sampler: SamplerConfig, seed: int, max_new_tokens: int,
            completions: list[dict[str, Any]], result: Generated, load: Any, run: Any) -> dict[str, Any]:
    """What `generate_text` / `generate_image_text` return: the settings, the completions and the timings."""
    new_tokens = int(result.lengths.sum())
    return {
        "model": model,
        "dtype": dtype,
        "sampler": dataclasses.asdict(sampler),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "completions": completions,
        "new_tokens": new_tokens,
        "load_s": round(load.total_s, 3),
        "compile_s": round(run.compile_s, 3),
        "run_s": round(run.run_s, 3),
        "tokens_per_s": round(new_tokens / run.run_s, 2) if run.run_s > 0 else None,
    }


def load_image_text_model(model: str, dtype: str = "float32") -> tuple[nn.Module, Any, Any, str]:
    """(module, params, processor, default prompt) of a PaliGemma: a `bvl train` workdir of the paligemma task,
    or an HF PaliGemma folder (its tokenizer files beside the weights)."""
    from pathlib import Path

    from big_vision_lite.checkpoints.paligemma import load_paligemma
    from big_vision_lite.data.processor import PaliGemmaProcessor
    from big_vision_lite.tokenizer import load_tokenizer
    from big_vision_lite.train.paligemma import is_paligemma_run, load_paligemma_run

    if is_paligemma_run(model):
        if dtype != "float32":
            raise ValueError(f"a training run is evaluated in the dtype it trained in; got --dtype {dtype}")
        return load_paligemma_run(model)
    config = Path(model) / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "paligemma":
        raise ValueError(f"{model}: --image needs a PaliGemma model: an HF folder whose config.json has model_type "
                         f"'paligemma', or a workdir of `bvl train configs/paligemma_*.py`")
    module, params, cfg = load_paligemma(model, dtype, scan_layers=False)
    processor = PaliGemmaProcessor(load_tokenizer(model), image_size=cfg.vision.image_size,
                                   num_image_tokens=cfg.num_image_tokens)
    if processor.image_token_id != cfg.image_token_id:
        raise ValueError(f"{model}: the tokenizer gives '<image>' id {processor.image_token_id}, config.json says "
                         f"image_token_id {cfg.image_token_id}")
    return module, params, processor, ""


def generate_image_text(
    model: str,
    images: Sequence[str],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    sampler: SamplerConfig = GREEDY,
    seed: int = 0,
    dtype: str = "float32",
) -> dict[str, Any]:
    """PaliGemma: continues each prompt about its image (image files; one for all prompts, or one each).

    Returns what `generate_text` returns, each completion also naming its image.
    """
    from PIL import Image

    if len(images) not in (1, len(prompts)):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts: give one image, or one per prompt")
    pictures = []
    for path in images:
        try:
            with Image.open(path) as image:
                pictures.append(image.copy())
        except (OSError, ValueError) as e:
            raise ValueError(f"image {path}: cannot be read ({e})") from None
    pictures *= len(prompts) // len(pictures)
    with timed() as load:
        module, params, processor, _ = load_image_text_model(model, dtype)
    batch = processor(pictures, list(prompts), padding_side="left")
    with timed() as run:
        result = generate(module, params, batch["input_ids"], batch["input_mask"], max_new_tokens, sampler=sampler,
                          rng=jax.random.key(seed), end_ids=processor.tokenizer.eos_ids, pad_id=processor.pad_id,
                          images=batch["pixel_values"], mask_ar=batch["mask_ar"])
    completions = []
    for prompt, path, ids, length in zip(prompts, images * (len(prompts) // len(images)), result.tokens,
                                         result.lengths, strict=True):
        ids = ids[:length].tolist()
        completions.append({"prompt": prompt, "image": path, "completion": processor.decode(ids), "tokens": ids,
                            "stopped_at_end": bool(length and ids[-1] in processor.tokenizer.eos_ids)})
    return _report(model, dtype, sampler, seed, max_new_tokens, completions, result, load, run)
