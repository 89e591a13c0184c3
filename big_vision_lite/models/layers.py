"""Small layers both towers share: RMS normalisation (the decoders), LayerNorm (the ViT and text encoders),
rematerialisation of a block by a named policy, and the activations' sharding constraint.

Axis letters: B batch, T tokens, D features (any trailing axis works).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps)` times `(1 + scale)` (Gemma) or `scale` (Llama, Qwen3), over the last axis.

    The statistics and the product are computed in float32, then cast back to the input dtype, so a bfloat16
    model normalises with float32 accuracy (as openpi and transformers' Gemma do).
    """

    eps: float = 1e-6
    plus_one: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        weight = scale.astype(jnp.float32)
        if self.plus_one:
            weight = 1.0 + weight
        return (normed * weight).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis D with `scale` [D] and `bias` [D] (flax's names and inits): two-pass variance
    (as torch computes it), statistics in float32 whatever the input dtype, the result in `dtype`. Written out
    rather than flax's nn.LayerNorm, which multiplies the scale into rsqrt(var) first: for that [B, T, D] product
    XLA:CPU wrote the scale broadcast to [B, T, D] into memory in every LayerNorm (the same math; the SigLIP train
    step ran ~3% faster)."""

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype).astype(jnp.float32)
        x = x.astype(jnp.float32)
        xc = x - jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
        return (xc * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


def remat(block: type[nn.Module], policy: str | None, scan_layers: bool) -> type[nn.Module]:
    """`block` rematerialised in the backward pass under the `jax.checkpoint_policies` named `policy` (e.g.
    "nothing_saveable"); `block` itself when `policy` is None. Both towers' `remat_policy` means this."""
    if policy is None:
        return block
    if not hasattr(jax.checkpoint_policies, policy):
        raise ValueError(f"remat_policy {policy!r} is not a jax.checkpoint_policies name (e.g. 'nothing_saveable')")
    # prevent_cse is only needed outside scan (scan already keeps XLA from merging the recomputation).
    return nn.remat(block, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=not scan_layers)


def constrain(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """`x` held to `sharding` inside jit (`jax.lax.with_sharding_constraint`, which also holds its gradient there);
    `x` itself when `sharding` is None. The models' `activation_sharding` means this, applied to the residual
    stream [B, T, D] at every block's input and output: with the batch's sharding it keeps XLA from splitting the
    activations by feature when the weights are split over the same devices (FSDP)."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
