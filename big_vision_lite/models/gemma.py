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
(`relayout_layers` converts). Expert i > 0 adds `_i` suffixes (`mlp_1`, `attn/q_einsum_1`, ...).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models.attention import Attention, rope_inv_freq
from big_vision_lite.models.cache import KVCache, LayerKV, SlotCache
from big_vision_lite.models.layers import RMSNorm, constrain, remat
from big_vision_lite.models.lora import LoRAConfig, lora_einsum
from big_vision_lite.models.masks import sliding_mask, slot_mask
from big_vision_lite.utils.dtypes import as_dtype

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
    max_positions: int | None = None  # the longest sequence the model was trained for (HF max_position_embeddings)
    # Sliding layers keep a bidirectional block (an image + prefix) whole beyond the window (PaliGemma 2, as
    # transformers ORs the block onto the window), or cut it by the window too (False: Gemma 3 with vision).
    bidirectional_beyond_window: bool = True

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
        # Both halves of the weight at once, each read in place (lora._stacked_matmul). The LoRA adapters keep
        # their shapes: A [2, D, L], B [2, L, F].
        gate, up = lora_einsum(self, "gating_einsum", (2, cfg.width, cfg.mlp_dim), "BTD,cDF->cBTF", x, **kw)
        hidden = ACTIVATIONS[cfg.activation](gate) * up  # [B, T, F]
        self.sow("intermediates", "gate", gate)  # parity's drill-down (a no-op unless the collection is mutable)
        self.sow("intermediates", "hidden", hidden)
        return lora_einsum(self, "linear", (cfg.mlp_dim, cfg.width), "BTF,FD->BTD", hidden, **kw)


def _name(base: str, expert: int) -> str:
    return base if expert == 0 else f"{base}_{expert}"


class LayerInputs(NamedTuple):
    """What differs from one layer to the next: scanned over a leading L axis with `scan_layers`, indexed per layer
    without."""

    sliding: jax.Array  # bool []: the layer attends within the sliding window
    inv_freq: jax.Array  # [H/2] the layer's RoPE inverse frequencies
    k: jax.Array | None = None  # [B, S, K, H] the layer's cached keys (None: no cache)
    v: jax.Array | None = None  # [B, S, K, H]


class LayerOutputs(NamedTuple):
    """What a layer returns besides the activations: the keys and values it attended to, and on request its
    attention probabilities [B, N, T, S] and its output [B, T, D] (expert 0's)."""

    k: jax.Array
    v: jax.Array
    probs: jax.Array | None = None
    hidden: jax.Array | None = None


class Block(nn.Module):
    """One pre-normed decoder layer over the tokens of all experts (attention is shared, the rest is not).

    `mask` is the layer's mask ([B, T, S], or [B, K, T, S] per kv head); sliding layers take `window_mask` instead
    when one is given (a scanned stack picks between the two per layer). `write_at` is where this call's keys go
    in the cache (see `cache.LayerKV`). Each expert's input and output [B, T, D] are held to `activation_sharding`
    (None: free).

    With the `intermediates` collection mutable (parity's drill-down) it sows, per expert i, `normed`,
    `post_attn_normed`, `residual_attn` (after the attention's residual add), `ffw_normed`, `mlp_out`,
    `post_ffw_normed` and `output` (names suffixed `_i` for i > 0), and its attention and MLP sow theirs.
    """

    configs: Sequence[DecoderConfig]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    return_probs: bool = False
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, xs: list[jax.Array | None], layer: LayerInputs, positions: jax.Array, mask: jax.Array,
                 window_mask: jax.Array | None, write_at: jax.Array | None
                 ) -> tuple[list[jax.Array | None], LayerOutputs]:
        norm = lambda name, cfg: RMSNorm(cfg.norm_eps, cfg.norm_plus_one, self.param_dtype, name=name)  # noqa: E731
        xs = [None if x is None else constrain(x, self.activation_sharding) for x in xs]
        normed = [
            None if x is None else norm(_name("pre_attention_norm", i), cfg)(x)
            for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True))
        ]
        sow = lambda name, i, value: self.sow("intermediates", _name(name, i), value)  # noqa: E731
        for i, y in enumerate(normed):
            if y is not None:
                sow("normed", i, y)
        if window_mask is not None:
            mask = jnp.where(layer.sliding, window_mask, mask)
        kv = None if layer.k is None else LayerKV(layer.k, layer.v, write_at)
        attn = Attention(self.configs, self.dtype, self.param_dtype, self.return_probs, name="attn")
        attn_outs, (k, v), probs = attn(normed, positions, mask, layer.inv_freq, kv)

        new_xs = []
        for i, (x, y, cfg) in enumerate(zip(xs, attn_outs, self.configs, strict=True)):
            if x is None:
                new_xs.append(None)
                continue
            if cfg.post_norms:
                y = norm(_name("post_attention_norm", i), cfg)(y)
                sow("post_attn_normed", i, y)
            x = x + y
            sow("residual_attn", i, x)
            y = norm(_name("pre_ffw_norm", i), cfg)(x)
            sow("ffw_normed", i, y)
            y = FeedForward(cfg, self.dtype, self.param_dtype, name=_name("mlp", i))(y)
            sow("mlp_out", i, y)
            if cfg.post_norms:
                y = norm(_name("post_ffw_norm", i), cfg)(y)
                sow("post_ffw_normed", i, y)
            new_xs.append(constrain(x + y, self.activation_sharding))
            sow("output", i, new_xs[-1])
        return new_xs, LayerOutputs(k, v, probs if self.return_probs else None,
                                    new_xs[0] if self.return_hidden else None)


class Decoder(nn.Module):
    """Embed -> L blocks -> final norm -> logits, for one or several experts (expert 0 owns the vocabulary).

    `__call__(tokens [B, T], positions [B, T], attn_mask [B, T, S], cache)` returns logits [B, T, V] (float32),
    the cache after this call (`cache.KVCache` or `cache.SlotCache`; without a cache, a concatenation cache of the
    call's own keys) and an `out` dict: `embeddings` [B, T, D], `final` [B, T, D], and when requested `hidden`
    [L, B, T, D] (each layer's output) and `attn_probs` [L, B, N, T, S]. attn_mask is the full-attention mask over
    the cache and the new tokens; sliding layers narrow it from the stored key positions, except between tokens of
    one bidirectional block (`masks.sliding_mask`). A `SlotCache` brings its own per-layer masks (attn_mask None).

    `dtype` is the compute dtype, `param_dtype` the parameters' (both: a name or a jnp dtype, see utils.dtypes);
    `scan_layers` runs the layers with nn.scan over parameters stacked on a leading L axis (`layers`) instead of a
    Python loop over `layers_0 ... layers_{L-1}`; `remat_policy` names a jax.checkpoint_policies policy;
    `activation_sharding` (a `jax.sharding.Sharding`, None: no constraint) holds every layer's input and output
    [B, T, D] to it inside jit (`layers.constrain`: a training step on an FSDP mesh keeps them split by batch).
    """

    configs: Sequence[DecoderConfig]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    return_probs: bool = False
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    def setup(self):
        first = self.configs[0]
        # Experts share the layer stack, so they must agree on depth and on which layers slide.
        for cfg in self.configs[1:]:
            assert cfg.depth == first.depth, (cfg.depth, first.depth)
            assert tuple(cfg.is_sliding) == tuple(first.is_sliding)
        dtype, param_dtype = as_dtype(self.dtype), as_dtype(self.param_dtype)
        self.embedder = Embedder(first, dtype, param_dtype)
        block = remat(Block, self.remat_policy, self.scan_layers)
        kw = dict(configs=self.configs, dtype=dtype, param_dtype=param_dtype, return_probs=self.return_probs,
                  return_hidden=self.return_hidden, activation_sharding=self.activation_sharding)
        if self.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "intermediates": 0},  # sown sub-stages stack over L too
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=first.depth,
            )
            self.layers = scanned(**kw, name="layers")
        else:
            self.layers = [block(**kw, name=f"layers_{i}") for i in range(first.depth)]
        self.final_norms = [
            RMSNorm(cfg.norm_eps, cfg.norm_plus_one, param_dtype, name=_name("final_norm", i))
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
        attn_mask: jax.Array | None,
        cache: KVCache | SlotCache | None = None,
    ) -> tuple[list[jax.Array | None], KVCache | SlotCache, dict[str, Any]]:
        """Runs the blocks and final norms on per-expert embeddings; positions/mask cover their concatenation."""
        if isinstance(cache, SlotCache):
            return self._forward_slots(xs, positions, cache)
        first = self.configs[0]
        key_positions, new_keys_at = (positions, 0) if cache is None else cache.key_positions(positions)
        window = None
        if first.is_sliding.any():
            window = sliding_mask(attn_mask, positions, key_positions, first.sliding_window, new_keys_at,
                                  keep_blocks=first.bidirectional_beyond_window)
        write_at = None if cache is None else cache.index
        sliding, inv_freq = jnp.asarray(first.is_sliding), jnp.asarray(first.inv_freq)

        if self.scan_layers:
            if cache is not None and cache.is_per_layer:
                raise ValueError("a per-layer (tuple) cache needs scan_layers=False; stack it for scanned layers")
            kv = () if cache is None else (cache.k, cache.v)
            xs, outs = self.layers(list(xs), LayerInputs(sliding, inv_freq, *kv), positions, attn_mask, window,
                                   write_at)
            k, v = outs.k, outs.v
        else:
            per_layer = []
            for i, block in enumerate(self.layers):
                kv = () if cache is None else (cache.k[i], cache.v[i])
                mask = window if first.is_sliding[i] else attn_mask
                xs, out = block(list(xs), LayerInputs(sliding[i], inv_freq[i], *kv), positions, mask, None, write_at)
                per_layer.append(out)
            k, v = (tuple(o.k for o in per_layer), tuple(o.v for o in per_layer))
            if cache is None or not cache.is_per_layer:  # kept per layer: each step updates every buffer in place
                k, v = jnp.stack(k), jnp.stack(v)
            stack = lambda values: None if values[0] is None else jnp.stack(values)  # noqa: E731
            outs = LayerOutputs(k, v, stack([o.probs for o in per_layer]), stack([o.hidden for o in per_layer]))

        xs = [None if x is None else norm(x) for x, norm in zip(xs, self.final_norms, strict=True)]
        out = {"final": xs[0]}
        if self.return_hidden:
            out["hidden"] = outs.hidden
        if self.return_probs:
            out["attn_probs"] = outs.probs
        new_cache = KVCache(k, v, key_positions) if cache is None else cache.written(k, v, key_positions,
                                                                                      positions.shape[1])
        return xs, new_cache, out

    def _forward_slots(self, xs: Sequence[jax.Array | None], positions: jax.Array, cache: SlotCache
                       ) -> tuple[list[jax.Array | None], SlotCache, dict[str, Any]]:
        """`forward` for one new token per row over a `SlotCache`; `attn_probs` is a tuple of [B, N, 1, S_i]."""
        first = self.configs[0]
        if self.scan_layers:
            raise ValueError("a SlotCache is kept per layer: decode with scan_layers=False (see for_decoding)")
        if positions.shape[1] != 1:
            raise ValueError(f"a SlotCache takes one new token per row, got {positions.shape[1]}")
        ks, vs, probs = [], [], []
        for i, block in enumerate(self.layers):
            window = first.sliding_window if first.is_sliding[i] else None
            mask = slot_mask(positions, cache.positions[i], window)  # [B, K, 1, S_i]
            kv = cache.layer(i)
            layer = LayerInputs(jnp.asarray(first.is_sliding[i]), jnp.asarray(first.inv_freq[i]), kv.k, kv.v)
            xs, out = block(list(xs), layer, positions, mask, None, kv.write_at)
            ks.append(out.k)
            vs.append(out.v)
            probs.append(out.probs)
        xs = [None if x is None else norm(x) for x, norm in zip(xs, self.final_norms, strict=True)]
        out = {"final": xs[0]}
        if self.return_probs:
            out["attn_probs"] = tuple(probs)
        return xs, cache._replace(k=tuple(ks), v=tuple(vs)), out

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attn_mask: jax.Array | None,
        cache: KVCache | SlotCache | None = None,
        *,
        last_logits_only: bool = False,
    ) -> tuple[jax.Array, KVCache | SlotCache, dict[str, Any]]:
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
        return self.clone(scan_layers=False), relayout_layers(params, self.configs[0].depth, scan_layers=False)


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


def relayout_layers(params: dict, depth: int, scan_layers: bool) -> dict:
    """Decoder params in either layout, returned in the one `Decoder(..., scan_layers=scan_layers)` expects."""
    if scan_layers and "layers" not in params:
        return stack_layers(params, depth)
    if not scan_layers and "layers" in params:
        return unstack_layers(params, depth)
    return dict(params)
