"""Small layers shared by the decoder and its attention: RMS normalisation.

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
