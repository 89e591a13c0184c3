"""Gemma-family decoders (Gemma 1/2/3, Llama, Qwen3) as one config and one set of Linen modules.

Axis letters: B batch, T query tokens, S key tokens (cache + new), L layers, D width, F mlp hidden, V vocab,
K kv heads, H head dim.

A family is a `DecoderConfig`, never a copied module: Gemma 2 switches on soft-caps, post-norms and alternating
sliding windows; Gemma 3 adds qk-norm and per-layer-type RoPE; Llama/Qwen3 use plain-weight RMSNorm, a SiLU
gate, no embedding scaling and (optionally) an untied output head.

Parameters (single expert): `embedder/input_embedding` [V, D] (and `embedder/output_embedding` when untied),
`layers/{pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm}/scale`,
`layers/attn/{q_einsum, kv_einsum | qkv_einsum, attn_vec_einsum}/w`, `layers/attn/{query,key}_norm/scale`,
`layers/mlp/{gating_einsum [2, D, F], linear [F, D]}`, `final_norm/scale`. With `scan_layers` the layer params
are stacked under `layers` with a leading L axis; without, they live in `layers_0 ... layers_{L-1}`
(`stack_layers` / `unstack_layers` convert). Expert i > 0 adds `_i` suffixes (`mlp_1`, `attn/q_einsum_1`, ...).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models.attention import Attention, causal_mask, mutual_mask, rope_inv_freq, window_mask
from big_vision_lite.models.layers import RMSNorm
from big_vision_lite.models.lora import LoRAConfig, lora_einsum

ACTIVATIONS = {"gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu}
LAYER_TYPES = ("full", "sliding")
VOCAB_MAJOR_ROWS = 64  # up to this many rows (B * T), the logits are computed vocabulary-major


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Everything that distinguishes one decoder family or size from another."""

    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    family: str = "gemma"
    norm_eps: float = 1e-6
    norm_plus_one: bool = True  # Gemma scales by (1 + w); Llama/Qwen3 by w.
    activation: str = "gelu_tanh"
    scale_embeddings: bool = True  # Gemma multiplies embeddings by sqrt(width).
    tie_embeddings: bool = True
    post_norms: bool = False  # Gemma 2/3 normalise the attention and MLP outputs before the residual add.
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None  # queries are scaled by its -1/2 power; None means head_dim.
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[str, ...] | None = None  # "full" or "sliding" per layer; None means all full.
    sliding_window: int | None = None
    rope_theta: float = 10_000.0
    rope_scale: float = 1.0  # linear RoPE scaling (position interpolation) of full-attention layers.
    local_rope_theta: float | None = None  # sliding layers' base; None means rope_theta.
    local_rope_scale: float = 1.0
    lora: LoRAConfig | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.depth:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries, depth is {self.depth}")
            if bad := set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"unknown layer types {sorted(bad)}; allowed: {LAYER_TYPES}")
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding layers need a positive sliding_window")

    @property
    def query_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def is_sliding(self) -> np.ndarray:
        """[L] bool: which layers use the sliding window."""
        return np.array([t == "sliding" for t in (self.layer_types or ("full",) * self.depth)])

    @property
    def inv_freq(self) -> np.ndarray:
        """[L, H/2] float32 RoPE inverse frequencies of every layer (local and global bases differ)."""
        full = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scale)
        local = rope_inv_freq(self.head_dim, self.local_rope_theta or self.rope_theta, self.local_rope_scale)
        return np.stack([local if s else full for s in self.is_sliding])


class KVCache(NamedTuple):
    """A whole decoder's cache: k, v [L, B, S, K, H] and the keys' positions [B, S].

    With unrolled layers k and v may also be tuples of L arrays [B, S, K, H] (what the decode loop carries, so
    that each step updates every layer's buffer in place instead of restacking all of them).

    `index` None: a concatenation cache, grown by every call. `index` an int32 scalar: a fixed-capacity cache
    whose slots from `index` on are free; a call writes its T tokens there and advances `index` by T. Which
    slots hold real keys is the caller's key mask (`attn_mask`), so free slots are never attended.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    index: jax.Array | None = None

    def with_capacity(self, capacity: int) -> "KVCache":
        """This concatenation cache as a fixed-capacity one of `capacity` slots (the rest free)."""
        if self.index is not None:
            raise ValueError("the cache already has a fixed capacity")
        length = self.k.shape[2]
        if capacity < length:
            raise ValueError(f"capacity {capacity} is smaller than the {length} cached tokens")
        pad = [(0, 0), (0, 0), (0, capacity - length), (0, 0), (0, 0)]
        return KVCache(jnp.pad(self.k, pad), jnp.pad(self.v, pad),
                       jnp.pad(self.positions, [(0, 0), (0, capacity - length)]), jnp.asarray(length, jnp.int32))


class SlotCache(NamedTuple):
    """A per-layer cache in which every batch row and kv head holds its own set of tokens (what eviction needs).

    Layer i: `k[i]`, `v[i]` [B, S_i, K, H] and `positions[i]` [B, K, S_i], the absolute position of the token in
    each slot or -1 where the slot is free. S_i may differ between layers. `slots[i]` [B, K] is where the call's
    one new token goes; the caller has already written its position there, so masks come from `positions` alone:
    a query sees the valid slots at or before its position (and within the window on sliding layers).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions: tuple[jax.Array, ...]
    slots: tuple[jax.Array, ...]


class Embedder(nn.Module):
    """Token embedding [V, D] (scaled by sqrt(D) for Gemma) and the output head (tied unless configured)."""

    config: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        init = nn.initializers.normal(stddev=1.0)
        shape = (self.config.vocab_size, self.config.width)
        self.input_embedding = self.param("input_embedding", init, shape, self.param_dtype)
        if not self.config.tie_embeddings:
            self.output_embedding = self.param("output_embedding", init, shape, self.param_dtype)

    def encode(self, tokens: jax.Array) -> jax.Array:
        x = self.input_embedding[tokens].astype(self.dtype)  # [B, T, D]
        if self.config.scale_embeddings:
            # The scale is rounded to the compute dtype first, as the PyTorch reference does.
            x = x * jnp.asarray(math.sqrt(self.config.width), self.dtype)
        return x

    def decode(self, x: jax.Array) -> jax.Array:
        table = self.input_embedding if self.config.tie_embeddings else self.output_embedding
        if x.shape[0] * x.shape[1] <= VOCAB_MAJOR_ROWS:
            # Few rows (decoding): XLA's CPU dot runs ~20% faster at 8 rows when the vocabulary is the leading
            # output axis; moving it last afterwards copies only B * T * V floats.
            logits = jnp.einsum("VD,BTD->VBT", table.astype(self.dtype), x, preferred_element_type=jnp.float32)
            logits = jnp.moveaxis(logits, 0, -1)  # [B, T, V]
        else:
            logits = jnp.einsum("BTD,VD->BTV", x, table.astype(self.dtype), preferred_element_type=jnp.float32)
        if (cap := self.config.final_logit_softcap) is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits


class FeedForward(nn.Module):
    """Gated MLP: linear(act(x W_gate) * (x W_up)); weights `gating_einsum` [2, D, F] and `linear` [F, D]."""

    config: DecoderConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, w_init=nn.initializers.lecun_normal(), lora=cfg.lora)
        # x is broadcast over the gate/up axis c so that c is a batch axis of the dot: XLA then reads each [D, F]
        # half of the weight in place. ("BTD,cDF->cBTF" made it compute [2F, BT] and transpose the result and the
        # weight on every call.) The LoRA adapters keep their shapes: A [2, D, L], B [2, L, F].
        xs = jnp.broadcast_to(x, (2, *x.shape))
        gate, up = lora_einsum(self, "gating_einsum", (2, cfg.width, cfg.mlp_dim), "cBTD,cDF->cBTF", xs, **kw)
        hidden = ACTIVATIONS[cfg.activation](gate) * up  # [B, T, F]
        return lora_einsum(self, "linear", (cfg.mlp_dim, cfg.width), "BTF,FD->BTD", hidden, **kw)


def _name(base: str, expert: int) -> str:
    return base if expert == 0 else f"{base}_{expert}"


class Block(nn.Module):
    """One pre-normed decoder layer over the tokens of all experts (attention is shared, the rest is not).

    `layer` holds this layer's scanned inputs: `sliding` (bool scalar), `inv_freq` [H/2] and, with a cache,
    `k`, `v` [B, S, K, H]. Returns the new per-expert activations and a dict with the grown `k`, `v`, plus
    `probs` [B, N, T, S] and `hidden` (expert 0's output) when requested.
    """

    configs: Sequence[DecoderConfig]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    return_probs: bool = False
    return_hidden: bool = False

    @nn.compact
    def __call__(self, xs, layer: dict[str, jax.Array], positions, full_mask, sliding_mask, cache_index):
        norm = lambda name, cfg: RMSNorm(cfg.norm_eps, cfg.norm_plus_one, self.param_dtype, name=name)  # noqa: E731
        normed = [
            None if x is None else norm(_name("pre_attention_norm", i), cfg)(x)
            for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True))
        ]
        if "mask" in layer:  # a slot cache brings this layer's own [B, K, T, S] mask and per-head slots
            mask, cache_index = layer["mask"], layer["slots"]
        else:
            mask = full_mask if sliding_mask is None else jnp.where(layer["sliding"], sliding_mask, full_mask)
        cache = (layer["k"], layer["v"]) if "k" in layer else None
        attn = Attention(self.configs, self.dtype, self.param_dtype, self.return_probs, name="attn")
        attn_outs, (k, v), probs = attn(normed, positions, mask, layer["inv_freq"], cache, cache_index)

        new_xs = []
        for i, (x, y, cfg) in enumerate(zip(xs, attn_outs, self.configs, strict=True)):
            if x is None:
                new_xs.append(None)
                continue
            if cfg.post_norms:
                y = norm(_name("post_attention_norm", i), cfg)(y)
            x = x + y
            y = norm(_name("pre_ffw_norm", i), cfg)(x)
            y = FeedForward(cfg, self.dtype, self.param_dtype, name=_name("mlp", i))(y)
            if cfg.post_norms:
                y = norm(_name("post_ffw_norm", i), cfg)(y)
            new_xs.append(x + y)

        out = {"k": k, "v": v}
        if self.return_probs:
            out["probs"] = probs
        if self.return_hidden:
            out["hidden"] = new_xs[0]
        return new_xs, out


class Decoder(nn.Module):
    """Embed -> L blocks -> final norm -> logits, for one or several experts (expert 0 owns the vocabulary).

    `__call__(tokens [B, T], positions [B, T], attn_mask [B, T, S], cache)` returns logits [B, T, V] (float32),
    the grown `KVCache` and an `out` dict: `embeddings` [B, T, D], `final` [B, T, D], and when requested
    `hidden` [L, B, T, D] (each layer's output) and `attn_probs` [L, B, N, T, S]. attn_mask is the full-attention
    mask over the cache and the new tokens; sliding layers narrow it from the stored key positions, except between
    tokens of one bidirectional block (`attention.mutual_mask`).
    """

    configs: Sequence[DecoderConfig]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True
    remat_policy: str | None = None  # a name in jax.checkpoint_policies, e.g. "nothing_saveable"
    return_probs: bool = False
    return_hidden: bool = False

    def setup(self):
        first = self.configs[0]
        # Experts share the layer stack, so they must agree on depth and on which layers slide.
        for cfg in self.configs[1:]:
            assert cfg.depth == first.depth, (cfg.depth, first.depth)
            assert tuple(cfg.is_sliding) == tuple(first.is_sliding)
        self.embedder = Embedder(first, self.dtype, self.param_dtype)
        block = Block
        if self.remat_policy is not None:
            if not hasattr(jax.checkpoint_policies, self.remat_policy):
                raise ValueError(f"remat_policy {self.remat_policy!r} is not a jax.checkpoint_policies name")
            block = nn.remat(block, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                             prevent_cse=not self.scan_layers)
        kw = dict(configs=self.configs, dtype=self.dtype, param_dtype=self.param_dtype,
                  return_probs=self.return_probs, return_hidden=self.return_hidden)
        if self.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=first.depth,
            )
            self.layers = scanned(**kw, name="layers")
        else:
            self.layers = [block(**kw, name=f"layers_{i}") for i in range(first.depth)]
        self.final_norms = [
            RMSNorm(cfg.norm_eps, cfg.norm_plus_one, self.param_dtype, name=_name("final_norm", i))
            for i, cfg in enumerate(self.configs)
        ]

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embedder.encode(tokens)

    def logits(self, x: jax.Array) -> jax.Array:
        return self.embedder.decode(x)

    def forward(
        self,
        xs: Sequence[jax.Array | None],
        positions: jax.Array,
        attn_mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[list[jax.Array | None], KVCache, dict[str, Any]]:
        """Runs the blocks and final norms on per-expert embeddings; positions/mask cover their concatenation."""
        if isinstance(cache, SlotCache):
            return self._forward_slots(xs, positions, cache)
        first = self.configs[0]
        index = None if cache is None else cache.index
        if cache is None:
            key_positions, new_keys_at = positions, 0
        elif index is None:
            key_positions = jnp.concatenate([cache.positions, positions], axis=1)
            new_keys_at = cache.positions.shape[1]
        else:
            key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
            new_keys_at = index
        sliding_mask = None
        if first.is_sliding.any():
            sliding_mask = attn_mask & window_mask(positions, key_positions, first.sliding_window)
            if attn_mask.shape[1] > 1:  # one new token (a decode step) is its own block and always in its window
                sliding_mask |= attn_mask & mutual_mask(attn_mask, new_keys_at)
        per_layer = {"sliding": jnp.asarray(first.is_sliding), "inv_freq": jnp.asarray(first.inv_freq)}
        layer_list_cache = cache is not None and isinstance(cache.k, tuple)
        if cache is not None and not layer_list_cache:
            per_layer |= {"k": cache.k, "v": cache.v}

        if self.scan_layers:
            if layer_list_cache:
                raise ValueError("a per-layer (tuple) cache needs scan_layers=False; stack it for scanned layers")
            xs, ys = self.layers(list(xs), per_layer, positions, attn_mask, sliding_mask, index)
        else:
            outs = []
            for i, block in enumerate(self.layers):
                layer = jax.tree.map(lambda a, i=i: a[i], per_layer)
                if layer_list_cache:
                    layer |= {"k": cache.k[i], "v": cache.v[i]}
                xs, y = block(list(xs), layer, positions, attn_mask, sliding_mask, index)
                outs.append(y)
            extras = [{name: a for name, a in y.items() if name not in ("k", "v")} for y in outs]
            ys = jax.tree.map(lambda *a: jnp.stack(a), *extras)
            if layer_list_cache:  # kept per layer: each step updates every layer's buffers in place, no restacking
                ys |= {"k": tuple(y["k"] for y in outs), "v": tuple(y["v"] for y in outs)}
            else:
                ys |= {"k": jnp.stack([y["k"] for y in outs]), "v": jnp.stack([y["v"] for y in outs])}

        xs = [None if x is None else norm(x) for x, norm in zip(xs, self.final_norms, strict=True)]
        out = {"final": xs[0]}
        if self.return_hidden:
            out["hidden"] = ys["hidden"]
        if self.return_probs:
            out["attn_probs"] = ys["probs"]
        new_index = None if index is None else index + positions.shape[1]
        return xs, KVCache(ys["k"], ys["v"], key_positions, new_index), out

    def _forward_slots(self, xs: Sequence[jax.Array | None], positions: jax.Array, cache: SlotCache
                       ) -> tuple[list[jax.Array | None], SlotCache, dict[str, Any]]:
        """`forward` for one new token per row over a `SlotCache`; `attn_probs` is a tuple of [B, N, 1, S_i]."""
        first = self.configs[0]
        if self.scan_layers:
            raise ValueError("a SlotCache is kept per layer: decode with scan_layers=False (see for_decoding)")
        if positions.shape[1] != 1:
            raise ValueError(f"a SlotCache takes one new token per row, got {positions.shape[1]}")
        query = positions[:, None, :, None]  # [B, 1, T, 1]
        ks, vs, probs = [], [], []
        for i, block in enumerate(self.layers):
            key = cache.positions[i][:, :, None, :]  # [B, K, 1, S_i]
            mask = (key >= 0) & (key <= query)  # [B, K, T, S_i]
            if first.is_sliding[i]:
                mask &= query - key < first.sliding_window
            layer = {"inv_freq": jnp.asarray(first.inv_freq[i]), "k": cache.k[i], "v": cache.v[i], "mask": mask,
                     "slots": cache.slots[i]}
            xs, y = block(list(xs), layer, positions, None, None, None)
            ks.append(y["k"])
            vs.append(y["v"])
            probs.append(y.get("probs"))
        xs = [None if x is None else norm(x) for x, norm in zip(xs, self.final_norms, strict=True)]
        out = {"final": xs[0]}
        if self.return_probs:
            out["attn_probs"] = tuple(probs)
        return xs, cache._replace(k=tuple(ks), v=tuple(vs)), out

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attn_mask: jax.Array,
        cache: KVCache | None = None,
        *,
        last_logits_only: bool = False,
    ) -> tuple[jax.Array, KVCache, dict[str, Any]]:
        """See the class docstring; `last_logits_only` returns logits [B, 1, V] of the last token (prefill)."""
        x = self.embed(tokens)
        xs, cache, out = self.forward([x] + [None] * (len(self.configs) - 1), positions, attn_mask, cache)
        out["embeddings"] = x
        final = xs[0][:, -1:] if last_logits_only else xs[0]
        return self.logits(final), cache, out

    def for_decoding(self, params: dict[str, Any]) -> tuple["Decoder", dict[str, Any]]:
        """This decoder with unrolled layers and `params` relaid out to match (what decode loops run)."""
        if not self.scan_layers:
            return self, params
        return self.clone(scan_layers=False), unstack_layers(params, self.configs[0].depth)


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
    """Positions [B, T] of the valid tokens in a (left-)padded batch: cumsum(mask) - 1, clipped at 0."""
    return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1, 0)


def prefill_mask(input_mask: jax.Array) -> jax.Array:
    """[B, T, T] causal mask of a padded batch of prompts (padding is never attended)."""
    positions = positions_from_mask(input_mask)
    return causal_mask(positions, positions, input_mask.astype(bool)) & input_mask.astype(bool)[:, :, None]


def stack_layers(params: dict, depth: int) -> dict:
    """`layers_0 ... layers_{L-1}` -> `layers` with a leading L axis (the scan layout)."""
    params = dict(params)
    layers = [params.pop(f"layers_{i}") for i in range(depth)]
    params["layers"] = jax.tree.map(lambda *a: np.stack(a), *layers)
    return params


def unstack_layers(params: dict, depth: int) -> dict:
    """`layers` [L, ...] -> `layers_0 ... layers_{L-1}` (the unrolled layout)."""
    params = dict(params)
    layers = params.pop("layers")
    for i in range(depth):
        params[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
    return params
