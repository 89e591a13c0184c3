"""SigLIP's image-text model: a ViT and a text transformer whose outputs are L2-normalised embeddings.

Axis letters: B batch, R image side, T tokens, E embedding width (both towers' output width).

    images [B, R, R, 3] -> ViT -> zimg [B, E]      tokens [B, T] -> text tower -> ztxt [B, E]

Both z are normalised in float32. The model also owns the loss's scalars, big_vision style: `t` [1] stores
t' = log temperature (init log(temperature_init), paper: log 10) and `b` [1] the logit bias (paper: -10); the
logits are `exp(t') * zimg @ ztxt.T + b` (computed by the loss, see losses.py).

Params: `img` (vit.py's tree), `txt` (text.py's tree), `t` [1], `b` [1]. `init_params` builds them from the
config's shapes (flax creates a tower's params only when that tower runs, so init needs both inputs). The module
settings (dtype, param_dtype, scan_layers, remat_policy, activation_sharding) apply to both towers and mean what
they mean everywhere.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models.text import TextConfig, TextTransformer, relayout_text
from big_vision_lite.models.vit import NaFlexImages, ViT, ViTConfig, decode_variant, make_config, relayout_vit


@dataclasses.dataclass(frozen=True)
class TwoTowersConfig:
    """Both towers plus the initial temperature t = exp(t') (not its log) and bias."""

    image: ViTConfig
    text: TextConfig
    temperature_init: float = 10.0
    bias_init: float = -10.0

    def __post_init__(self):
        if not isinstance(self.image, ViTConfig) or not isinstance(self.text, TextConfig):
            raise ValueError("TwoTowersConfig needs image: ViTConfig and text: TextConfig "
                             f"(got {type(self.image).__name__}, {type(self.text).__name__})")
        if self.temperature_init <= 0:
            raise ValueError(f"temperature_init must be positive (its log is stored), got {self.temperature_init}")
        if self.image.pool_type != "none" and self.image.out_dim != self.text.out_dim:
            raise ValueError(
                f"the towers' embedding widths differ: image {self.image.out_dim} (head_size "
                f"{self.image.head_size}, width {self.image.width}), text {self.text.out_dim} (head_size "
                f"{self.text.head_size}, width {self.text.width}); set out_dim or the heads so they agree"
            )


def _l2_normalise(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(z / ||z||, ||z|| [B, 1]) in float32; the floor only guards an all-zero row (HF divides unguarded)."""
    z = z.astype(jnp.float32)
    norm = jnp.linalg.norm(z, axis=-1, keepdims=True)
    return z / jnp.maximum(norm, 1e-12), norm


class TwoTowers(nn.Module):
    """`__call__(images [B, R, R, 3] (NaFlex: `NaFlexImages`) | None, tokens [B, T] | None)` -> (zimg [B, E] |
    None, ztxt [B, E] | None, out).

    `out` holds `t` (= exp(t'), shape [1]), `t/parameter` (t'), `b` [1], `img/norm`, `txt/norm` (the norms
    before normalisation) and each tower's intermediates under `img/...` and `txt/...` (see ViT, TextTransformer).
    """

    config: TwoTowersConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    def tower_settings(self) -> dict[str, Any]:
        """The settings both towers take from this module."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                    remat_policy=self.remat_policy, return_hidden=self.return_hidden,
                    activation_sharding=self.activation_sharding)

    @nn.compact
    def __call__(
        self, images: jax.Array | NaFlexImages | None = None, tokens: jax.Array | None = None
    ) -> tuple[jax.Array | None, jax.Array | None, dict[str, jax.Array]]:
        cfg = self.config
        out: dict[str, jax.Array] = {}
        zimg = ztxt = None
        if images is not None:
            if cfg.image.pool_type == "none":
                raise ValueError("image pool_type 'none' yields tokens [B, P, D], not an embedding; use "
                                 "ViT(config.image).apply({'params': params['img']}, images) for the tokens")
            zimg, img_out = ViT(cfg.image, **self.tower_settings(), name="img")(images)
            out |= {f"img/{k}": v for k, v in img_out.items()}
            zimg, out["img/norm"] = _l2_normalise(zimg)  # [B, E] float32
        if tokens is not None:
            ztxt, txt_out = TextTransformer(cfg.text, **self.tower_settings(), name="txt")(tokens)
            out |= {f"txt/{k}": v for k, v in txt_out.items()}
            ztxt, out["txt/norm"] = _l2_normalise(ztxt)  # [B, E] float32

        t_init, b_init = math.log(cfg.temperature_init), cfg.bias_init
        t = self.param("t", lambda _, shape: jnp.full(shape, t_init, jnp.float32), (1,))
        b = self.param("b", lambda _, shape: jnp.full(shape, b_init, jnp.float32), (1,))
        out["t/parameter"] = t
        out["t"] = jnp.exp(t)
        out["b"] = b
        return zimg, ztxt, out


def dummy_inputs(cfg: TwoTowersConfig, batch: int = 1) -> tuple[jax.Array | NaFlexImages, jax.Array]:
    """Zero images [B, R, R, 3] (NaFlex: a full G x G grid of zero patches) and token ids [B, max_len] of the
    config's shapes (for init / eval_shape)."""
    r, p = cfg.image.image_size, cfg.image.patch_size
    tokens = jnp.zeros((batch, cfg.text.max_len), jnp.int32)
    if cfg.image.naflex:
        side = r // p
        return NaFlexImages(jnp.zeros((batch, side * side, p * p * 3), jnp.float32),
                            jnp.full((batch, 2), side, jnp.int32), jnp.ones((batch, side * side), bool)), tokens
    return jnp.zeros((batch, r, r, 3), jnp.float32), tokens


def init_params(module: TwoTowers, rng: jax.Array) -> dict[str, Any]:
    """Fresh params of both towers and t, b. Wrap in `jax.eval_shape` to get shapes without computing."""
    images, tokens = dummy_inputs(module.config)
    if module.config.image.pool_type == "none":  # TwoTowers refuses token outputs; init the ViT on its own
        params = jax.jit(module.init)(rng, None, tokens)["params"]
        vit = ViT(module.config.image, **module.tower_settings())
        return {**params, "img": jax.jit(vit.init)(jax.random.fold_in(rng, 1), images)["params"]}
    return jax.jit(module.init)(rng, images, tokens)["params"]


def relayout_two_towers(params: Mapping[str, Any], cfg: TwoTowersConfig, scan_layers: bool) -> dict[str, Any]:
    """Params in either block layout (per tower) -> the layout `TwoTowers(cfg, scan_layers=scan_layers)` expects."""
    params = dict(params)
    if "img" in params:
        params["img"] = relayout_vit(params["img"], cfg.image, scan_layers)
    if "txt" in params:
        params["txt"] = relayout_text(params["txt"], cfg.text, scan_layers)
    return params


# ---------------------------------------------------------------------------------------------- from a dict

_TOP_KEYS = ("image", "text", "out_dim", "temperature_init", "bias_init")


def _tower_fields(kind: str, spec: Mapping[str, Any] | None, head_size: int | None) -> dict[str, Any]:
    spec = dict(spec or {})
    fields: dict[str, Any] = {}
    if (variant := spec.pop("variant", None)) is not None:
        sizes = decode_variant(variant)
        if kind == "text" and "patch_size" in sizes:
            raise ValueError(f"model.text.variant {variant!r}: a text tower has no patch size")
        fields |= sizes
    if head_size is not None:
        fields["head_size"] = head_size
    patch = spec.get("patch_size")
    if isinstance(patch, (tuple, list)):  # big_vision writes (16, 16)
        if len(patch) != 2 or patch[0] != patch[1]:
            raise ValueError(f"model.image.patch_size {patch!r}: only square patches are supported")
        spec["patch_size"] = int(patch[0])
    return fields | spec


def two_towers_config(cfg: Mapping[str, Any]) -> TwoTowersConfig:
    """A `TwoTowersConfig` from a plain nested dict (e.g. `config.model.to_dict()`):

        {"image": {"variant": "B/16", "image_size": 224, "pool_type": "map", ...},   # or explicit width/depth/...
         "text": {"variant": "B", "vocab_size": 32000, "max_len": 64, ...},
         "out_dim": 768,            # optional: both towers' head_size (an int, or (image, text))
         "temperature_init": 10.0, "bias_init": -10.0}   # optional

    Unknown keys, at the top or in a tower, are a ValueError naming them.
    """
    cfg = dict(cfg)
    if unknown := sorted(set(cfg) - set(_TOP_KEYS)):
        raise ValueError(f"unknown model config keys {unknown}; known: {list(_TOP_KEYS)}")
    for key in ("image", "text"):
        if not isinstance(cfg.get(key), Mapping):
            raise ValueError(f"model config needs a dict {key!r} (got {cfg.get(key)!r})")
    out_dim = cfg.get("out_dim")
    if isinstance(out_dim, (tuple, list)):
        if len(out_dim) != 2:
            raise ValueError(f"model.out_dim {out_dim!r} must be an int or an (image, text) pair")
        img_head, txt_head = out_dim
    else:
        img_head = txt_head = out_dim
    image = make_config(ViTConfig, "model.image", _tower_fields("image", cfg["image"], img_head))
    text = make_config(TextConfig, "model.text", _tower_fields("text", cfg["text"], txt_head))
    extra = {k: cfg[k] for k in ("temperature_init", "bias_init") if k in cfg}
    return TwoTowersConfig(image=image, text=text, **extra)
