"""Mixture-of-experts multi-head attention (the openpi layout) and rotary embeddings.

Axis letters: B batch, T query tokens, S key tokens, D width, N query heads, K kv heads, G = N / K query heads
per kv head, H head dim.

Each expert has its own projections and width D_i but all experts share N, K and H, so their tokens can be
concatenated and attend to each other in one softmax. Masks (`masks.py`) are boolean `[B, T, S]`, or `[B, K, T, S]`
per kv head, until the logits are masked with `BIG_NEG`. A cache of any kind (`cache.py`) comes in as one layer's
`LayerKV`, which decides where the new keys and values are written.
"""

from collections.abc import Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models.cache import LayerKV
from big_vision_lite.models.layers import RMSNorm
from big_vision_lite.models.lora import Einsum

# The most negative finite value openpi and gemma use; softmax turns it into exactly zero weight.
BIG_NEG = -2.3819763e38


def rope_inv_freq(head_dim: int, theta: float, scale: float = 1.0) -> np.ndarray:
    """Inverse frequencies [H/2] of split-half RoPE; `scale` > 1 is linear position interpolation."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents) / np.float32(scale)).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates the halves of x [B, T, N, H] by angles positions [B, T] x inv_freq [H/2], in float32."""
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq.astype(jnp.float32)  # [B, T, 1, H/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def _name(base: str, expert: int) -> str:
    # Expert 0 carries no suffix so a single-expert checkpoint loads unchanged.
    return base if expert == 0 else f"{base}_{expert}"


class Attention(nn.Module):
    """Attention over the concatenated tokens of several experts.

    `configs[i]` describes expert i (width, num_heads, num_kv_heads, head_dim, qk_norm, norm settings, lora,
    query_scale, attn_logit_softcap). Call with `xs` (one [B, T_i, D_i] array or None per expert), positions
    [B, T] and attn_mask [B, T, S] (or [B, K, T, S]) for the concatenated tokens, inv_freq [H/2] of this layer's
    RoPE, and optionally this layer's cache `kv`. Returns the per-expert outputs (None where the input was None),
    the keys and values attended to ([B, S, K, H] each: the new ones alone without a cache), and the
    probabilities [B, N, T, S] when `return_probs` (else None).

    With the `intermediates` collection mutable it sows its sub-stages for parity's drill-down: `q` and `k` after
    RoPE (before the query scale) [B, T|S, N|K, H], `v`, the `logits` before and after the soft-cap
    (`logits_capped`, the same array without one) and `probs` [B, K, G, T, S], and each expert's `attn_out`.
    """

    configs: Sequence[Any]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    return_probs: bool = False

    @nn.compact
    def __call__(
        self,
        xs: Sequence[jax.Array | None],
        positions: jax.Array,
        attn_mask: jax.Array,
        inv_freq: jax.Array,
        kv: LayerKV | None = None,
    ) -> tuple[list[jax.Array | None], tuple[jax.Array, jax.Array], jax.Array | None]:
        first = self.configs[0]
        # Tokens of all experts share one softmax, so their heads must line up exactly.
        for attr in ("num_heads", "num_kv_heads", "head_dim", "query_scale", "attn_logit_softcap"):
            values = {getattr(c, attr) for c in self.configs}
            assert len(values) == 1, f"experts disagree on {attr}: {values}"
        assert len(xs) == len(self.configs), (len(xs), len(self.configs))
        num_heads, num_kv_heads, head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)

        einsum = lambda shape, eq, name, cfg: Einsum(  # noqa: E731
            shape, eq, self.dtype, self.param_dtype, lora=cfg.lora, name=name
        )
        qs, ks, vs = [], [], []
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                continue
            if num_kv_heads == num_heads:
                q, k, v = einsum((3, num_heads, cfg.width, head_dim), "BSD,3KDH->3BSKH", _name("qkv_einsum", i), cfg)(x)
            else:
                q = einsum((num_heads, cfg.width, head_dim), "BTD,NDH->BTNH", _name("q_einsum", i), cfg)(x)
                k, v = einsum((2, num_kv_heads, cfg.width, head_dim), "BSD,2KDH->2BSKH", _name("kv_einsum", i), cfg)(x)
            if cfg.qk_norm:
                norm = lambda name, cfg=cfg: RMSNorm(cfg.norm_eps, cfg.norm_plus_one, self.param_dtype, name=name)  # noqa: E731
                q, k = norm(_name("query_norm", i))(q), norm(_name("key_norm", i))(k)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        q, k, v = (jnp.concatenate(parts, axis=1) for parts in (qs, ks, vs))  # [B, T, N|K, H]
        assert q.shape[1] == positions.shape[1], (q.shape, positions.shape)

        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        for name, value in (("q", q), ("k", k), ("v", v)):
            self.sow("intermediates", name, value)
        q = q * jnp.asarray(first.query_scale, q.dtype)

        if kv is not None:
            k, v = kv.write(k, v)  # [B, S, K, H]

        q = einops.rearrange(q, "B T (K G) H -> B T K G H", K=num_kv_heads)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        self.sow("intermediates", "logits", logits)
        if first.attn_logit_softcap is not None:
            cap = first.attn_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        self.sow("intermediates", "logits_capped", logits)
        batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
        if attn_mask.shape == (batch, q_len, kv_len):
            head_mask = attn_mask[:, None, None, :, :]  # [B, 1, 1, T, S]
        elif attn_mask.shape == (batch, num_kv_heads, q_len, kv_len):
            head_mask = attn_mask[:, :, None, :, :]  # [B, K, 1, T, S]: a kv head's query heads share its keys
        else:
            raise ValueError(f"attn_mask has shape {attn_mask.shape}, expected [B, T, S] = {(batch, q_len, kv_len)} "
                             f"or [B, K, T, S] = {(batch, num_kv_heads, q_len, kv_len)}")
        logits = jnp.where(head_mask, logits, BIG_NEG)
        probs = jax.nn.softmax(logits, axis=-1)  # float32 [B, K, G, T, S]
        self.sow("intermediates", "probs", probs)
        encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v)
        encoded = einops.rearrange(encoded, "B T K G H -> B T (K G) H")

        outs: list[jax.Array | None] = []
        start = 0
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                outs.append(None)
                continue
            span = encoded[:, start : start + x.shape[1]]
            out_proj = einsum((num_heads, head_dim, cfg.width), "BTNH,NHD->BTD", _name("attn_vec_einsum", i), cfg)
            outs.append(out_proj(span))
            self.sow("intermediates", _name("attn_out", i), outs[-1])
            start += x.shape[1]

        out_probs = einops.rearrange(probs, "B K G T S -> B (K G) T S") if self.return_probs else None
        return outs, (k, v), out_probs
