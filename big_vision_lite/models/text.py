"""SigLIP's text tower: token + learned position embeddings, the ViT's encoder, last-token pooling, linear head.

Axis letters: B batch, T tokens (T <= max_len), V vocabulary, D width, L layers, E output (head) width.

    tokens [B, T] -> Embed [B, T, D] -> + pos_embedding[:, :T] -> L pre-LayerNorm blocks -> encoder_norm
    -> x[:, -1] [B, D] -> head [B, E]

No attention mask: like HF's SiglipTextModel (and big_vision), sequences are padded to a fixed length and every
token attends to every other, pad included; the last position is pooled, whatever token it holds.

Params (big_vision text_transformer names): `Embed_0/embedding [V, D]`, `pos_embedding [1, max_len, D]`,
`Encoder_0/{encoderblock_{i} | encoderblock, encoder_norm}` (block contents as in vit.py), `head/{kernel [D, E],
bias [E]}`.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models.vit import check_encoder_shape, decode_variant, make_config, relayout_encoder, tower_encoder
from big_vision_lite.utils.dtypes import as_dtype


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The text tower's sizes and switches. `head_size` None: no linear head (the output is the pooled [B, D])."""

    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    max_len: int = 64
    head_size: int | None = None
    norm_eps: float = 1e-6

    def __post_init__(self):
        check_encoder_shape("TextConfig", self.width, self.depth, self.mlp_dim, self.num_heads)
        for name in ("vocab_size", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TextConfig.{name} must be a positive int, got {value!r}")
        if self.head_size is not None and (not isinstance(self.head_size, int) or self.head_size < 1):
            raise ValueError(f"TextConfig.head_size must be None or a positive int, got {self.head_size!r}")

    @property
    def out_dim(self) -> int:
        return self.head_size or self.width


def text_config(variant: str, **overrides: Any) -> TextConfig:
    """A `TextConfig` sized like a ViT variant ("B", "So400m", ...; no patch size), e.g.
    `text_config("B", vocab_size=32_000, max_len=64, head_size=768)`."""
    sizes = decode_variant(variant)
    if "patch_size" in sizes:
        bare = variant.split("/")[0]
        raise ValueError(f"text variant {variant!r} has a patch size; give the bare name, e.g. {bare!r}")
    return make_config(TextConfig, "TextConfig", {**sizes, **overrides})


class TextTransformer(nn.Module):
    """`__call__(tokens [B, T] int) -> (x [B, E], out)`. `out`: `embedded` [B, T, D] (token embeddings),
    `with_posemb`, `pre_ln`, `encoded` [B, T, D] (after encoder_norm), `pre_logits` [B, D] (the last token),
    `logits` [B, E] (after the head, when there is one) and, with `return_hidden`, `blocks` [L, B, T, D].
    Settings (dtype, param_dtype, scan_layers, remat_policy, activation_sharding) mean what they mean for the ViT
    and the decoder."""

    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= cfg.max_len:
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}; the text tower expects [B, T] with "
                             f"1 <= T <= max_len {cfg.max_len}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        dtype, param_dtype = as_dtype(self.dtype), as_dtype(self.param_dtype)
        out: dict[str, jax.Array] = {}
        x = out["embedded"] = nn.Embed(cfg.vocab_size, cfg.width, dtype=dtype, param_dtype=param_dtype,
                                       name="Embed_0")(tokens)  # [B, T, D]
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / math.sqrt(cfg.width)),
                         (1, cfg.max_len, cfg.width), param_dtype)
        x = out["with_posemb"] = x + pos[:, : tokens.shape[1]].astype(dtype)

        x, enc = tower_encoder(self, cfg, "Encoder_0")(x)
        out |= enc
        out["encoded"] = x  # [B, T, D]
        x = out["pre_logits"] = x[:, -1]  # [B, D]
        if cfg.head_size is not None:
            x = out["logits"] = nn.Dense(cfg.head_size, dtype=dtype, param_dtype=param_dtype, name="head")(x)
        return x, out


def relayout_text(params: dict[str, Any], config: TextConfig, scan_layers: bool) -> dict[str, Any]:
    """A text tower's params in either block layout, returned as `TextTransformer(config, scan_layers=...)` expects."""
    return {**params, "Encoder_0": relayout_encoder(params["Encoder_0"], config.depth, scan_layers)}
