"""Softmax attention's core for the encoders (SigLIP's towers), heads-first, with a hand-written backward pass.

Axis letters: B batch, N heads, T query tokens, S key tokens, H head dim.

    attend(q [B, N, T, H], k [B, N, S, H], v [B, N, S, H], key_mask [B, S] | None, scale) -> [B, N, T, H]
    logits = scale * q k^T (float32), keys outside key_mask never attended, probs = softmax over S, out = probs v

Why a custom VJP: the gradients of the keys and values contract the probabilities over the query axis T
(dv = probs^T g, dk = dlogits^T q). Autodiff hands XLA those products with the transposed operand folded into
the dot, and XLA:CPU runs a batched dot whose left operand contracts a non-minor axis on its slow generic path:
at SigLIP's shapes (B 256, N 4, T = S = 16, H 32) ~10x slower per dot than the contiguous form its fast
(YNNPACK) path takes. Here the backward transposes probs and dlogits explicitly and an `optimization_barrier` keeps
XLA from folding the transposes back in, so every matmul of the backward is a contiguous one (the attention core's
forward and backward together ran in half the time, `docs/benchmarks.md`). The values are the same as autodiff's
to float32 rounding (tests/test_siglip.py checks the gradients against `jax.vjp` of the plain formula).
"""

import jax
import jax.numpy as jnp

from big_vision_lite.models.attention import BIG_NEG


def _probs(q: jax.Array, k: jax.Array, key_mask: jax.Array | None, scale: float) -> jax.Array:
    logits = jnp.einsum("BNTH,BNSH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, BIG_NEG)
    return jax.nn.softmax(logits, axis=-1)  # float32 [B, N, T, S]


def _swap_last(x: jax.Array) -> jax.Array:
    """x [..., T, S] -> [..., S, T] written out: the barrier keeps XLA from folding the transpose into a dot."""
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, scale: float) -> jax.Array:
    return _attend_fwd(q, k, v, key_mask, scale)[0]


def _attend_fwd(q, k, v, key_mask, scale):
    probs = _probs(q, k, key_mask, scale).astype(v.dtype)  # [B, N, T, S]
    out = jnp.einsum("BNTS,BNSH->BNTH", probs, v)
    return out, (q, k, v, probs, key_mask)


def _attend_bwd(scale, residuals, grad):
    q, k, v, probs, key_mask = residuals
    # grad [B, N, T, H]
    grad_v = jnp.einsum("BNST,BNTH->BNSH", _swap_last(probs), grad)
    grad_probs = jnp.einsum("BNTH,BNSH->BNTS", grad, v, preferred_element_type=jnp.float32)
    p32 = probs.astype(jnp.float32)
    # Softmax's backward; masked keys have probs exactly 0, so their logits get no gradient.
    grad_logits = p32 * (grad_probs - jnp.sum(grad_probs * p32, axis=-1, keepdims=True)) * scale
    grad_logits = grad_logits.astype(q.dtype)  # [B, N, T, S]
    grad_q = jnp.einsum("BNTS,BNSH->BNTH", grad_logits, k)
    grad_k = jnp.einsum("BNST,BNTH->BNSH", _swap_last(grad_logits), q)
    grad_mask = None if key_mask is None else jnp.zeros(key_mask.shape, jax.dtypes.float0)
    return grad_q, grad_k, grad_v, grad_mask


_attend_vjp = jax.custom_vjp(_attend, nondiff_argnums=(4,))
_attend_vjp.defvjp(_attend_fwd, _attend_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, scale: float) -> jax.Array:
    """Softmax attention of q [B, N, T, H] over k, v [B, N, S, H]; keys where `key_mask` [B, S] is False (None: none)
    are never attended. Returns [B, N, T, H] in v's dtype; see the module docstring for the backward pass."""
    assert q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape == v.shape, (q.shape, k.shape, v.shape)
    assert key_mask is None or key_mask.shape == (k.shape[0], k.shape[2]), (key_mask.shape, k.shape)
    return _attend_vjp(q, k, v, key_mask, float(scale))
