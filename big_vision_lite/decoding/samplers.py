"""Next-token samplers: greedy, temperature, top-k, top-p (nucleus) and their combination, inside `jit`.

Axis letters: B batch, V vocab.

`sample(logits [B, V], key, config) -> tokens [B]`. Everything is computed in float32 from log-probabilities
(`log_softmax` subtracts the max), so logits of 1e4 neither overflow nor lose the argmax. Filters apply in the
order temperature -> top-k -> top-p; a filtered token gets -inf and can never be drawn. The PRNG key is explicit.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """temperature 0 is greedy; top_k None or top_p None switch that filter off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None to disable), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or None to disable), got {self.top_p}")
        if self.greedy and (self.top_k is not None or self.top_p is not None):  # would be ignored without a word
            raise ValueError(f"top_k/top_p filter what sampling draws; temperature 0 is greedy (argmax) and ignores "
                             f"them: give a temperature > 0, or drop top_k={self.top_k}, top_p={self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_log_probs(logits: jax.Array, config: SamplerConfig) -> jax.Array:
    """[B, V] float32 log-probabilities after temperature, top-k and top-p; filtered tokens are -inf."""
    scaled = logits.astype(jnp.float32) / (config.temperature if not config.greedy else 1.0)
    log_probs = jax.nn.log_softmax(scaled, axis=-1)
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(log_probs, config.top_k)[0][:, -1:]  # [B, 1]; ties with the k-th are all kept
        log_probs = jnp.where(log_probs >= kth, log_probs, -jnp.inf)
    if config.top_p is not None and config.top_p < 1.0:
        ordered = jnp.sort(log_probs, axis=-1)[:, ::-1]  # [B, V], descending
        mass_before = jnp.cumsum(jnp.exp(ordered), axis=-1) - jnp.exp(ordered)
        # The smallest prefix whose mass reaches top_p: a token is kept while the mass before it is below top_p.
        keep = mass_before < config.top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        log_probs = jnp.where(log_probs >= threshold, log_probs, -jnp.inf)
    return log_probs


def sample(logits: jax.Array, key: jax.Array, config: SamplerConfig) -> jax.Array:
    """Token ids [B] drawn from logits [B, V] under `config` (argmax when greedy; `key` is then unused)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    if config.greedy:
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, filtered_log_probs(logits, config), axis=-1)
