"""SigLIP's vision tower (a big_vision ViT) and the pre-LayerNorm encoder it shares with the text tower.

Axis letters: B batch, R image side (pixels), P patches (an image's tokens), T tokens (any sequence), S key tokens,
D width, F mlp hidden, N heads, H head dim, L layers, E output (head) width.

    images [B, R, R, 3] in [-1, 1] -> patch conv (kernel = stride = patch size) [B, R/p, R/p, D] -> [B, P, D]
    -> + learned positions [1, P, D] -> L blocks -> encoder_norm -> pool -> optional linear head

NaFlex (SigLIP 2, `naflex=True`): the images come as `NaFlexImages`: patches [B, P, p*p*3] of images of any
aspect ratio (row-major patches, each flattened row, column, channel), each image's patch grid `spatial_shapes`
[B, 2] (rows, columns; rows * columns <= P) and `mask` [B, P] (False on padding). The patch embedding is the same
kernel applied as a matrix; the learned positions, a G x G grid (G = image_size / patch), are resized per image to
its rows x columns (bilinear with antialiasing, `resize_positions`) and laid out row-major, padding taking the
first; attention and the MAP head never look at padding patches. P is static: any image shape fills the same
jitted shapes.

A block is pre-LayerNorm: `x + attn(ln_0(x))`, then `y + mlp(ln_1(y))`; attention and MLP carry biases, the MLP
is Dense -> tanh-GELU -> Dense, LayerNorm eps is 1e-6 by default. Pooling: "map" (multi-head attention pooling
with a learned probe: `h = attn(probe, x)`, out `h + mlp(ln(h))`, as HF's SiglipMultiheadAttentionPoolingHead),
"gap" (token mean) or "none" (the tokens [B, P, D] themselves, what PaliGemma consumes).

Params (big_vision names, so its checkpoints load): `embedding/{kernel [p, p, 3, D], bias [D]}`,
`pos_embedding [1, P, D]`, `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0/{query, key,
value, out}, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}}` (scanned: `Transformer/encoderblock/...` with a leading
L axis), `Transformer/encoder_norm/{scale, bias}`, `MAPHead_0/{probe [1, 1, D], MultiHeadDotProductAttention_0,
LayerNorm_0, MlpBlock_0}`, `head/{kernel [D, E], bias [E]}`. Attention: query/key/value kernel [D, N, H] and
bias [N, H]; out kernel [N, H, D] and bias [D].

Module settings, the same as the decoder's (`gemma.Decoder`): `dtype` (compute) and `param_dtype` (a name or a jnp
dtype, see utils.dtypes), `scan_layers` (the blocks stacked under `encoderblock` and run by nn.scan),
`remat_policy` (a jax.checkpoint_policies name) and `activation_sharding` (a `jax.sharding.Sharding` every block's
input and output [B, P, D] is held to inside jit, `layers.constrain`; None: no constraint). LayerNorm statistics,
attention logits and the softmax are computed in float32, then cast back.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models.attention_core import attend
from big_vision_lite.models.layers import LayerNorm, constrain, remat
from big_vision_lite.utils.dtypes import as_dtype

POOL_TYPES = ("map", "gap", "none")
# big_vision's `decode_variant` (vit.py): name -> (width, depth, mlp_dim, num_heads).
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}


def check_encoder_shape(kind: str, width: int, depth: int, mlp_dim: int, num_heads: int) -> None:
    """The checks both towers' configs share: positive sizes, and heads that divide the width."""
    for name, value in (("width", width), ("depth", depth), ("mlp_dim", mlp_dim), ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{kind}.{name} must be a positive int, got {value!r}")
    if width % num_heads:
        raise ValueError(f"{kind}.width {width} is not a multiple of {kind}.num_heads {num_heads}")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A ViT's sizes and switches. `head_size` None: no linear head (the pooled width D is the output)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 16
    image_size: int = 224
    pool_type: str = "map"  # "map" | "gap" | "none" (tokens)
    head_size: int | None = None
    norm_eps: float = 1e-6
    naflex: bool = False  # SigLIP 2: variable-resolution patches (`NaFlexImages`); image_size sets the position grid

    def __post_init__(self):
        check_encoder_shape("ViTConfig", self.width, self.depth, self.mlp_dim, self.num_heads)
        if not isinstance(self.patch_size, int) or self.patch_size < 1:
            raise ValueError(f"ViTConfig.patch_size must be a positive int, got {self.patch_size!r}")
        # A side that is not a multiple of the patch drops its last image_size % patch_size pixels (a VALID
        # convolution, as big_vision and transformers do: SigLIP So400m/14 at 384 px sees a 27 x 27 grid).
        if not isinstance(self.image_size, int) or self.image_size < self.patch_size:
            raise ValueError(f"ViTConfig.image_size {self.image_size!r} must be an int of at least patch_size "
                             f"{self.patch_size}")
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"ViTConfig.pool_type {self.pool_type!r} is not one of {POOL_TYPES}")
        if self.head_size is not None and (not isinstance(self.head_size, int) or self.head_size < 1):
            raise ValueError(f"ViTConfig.head_size must be None or a positive int, got {self.head_size!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def out_dim(self) -> int:
        """Width of the tower's output (per image, or per token with pool_type "none")."""
        return self.head_size or self.width


def decode_variant(variant: str) -> dict[str, int]:
    """big_vision variant string ("B", "B/16", "So400m/14", ...) -> width, depth, mlp_dim, num_heads[, patch_size]."""
    name, slash, patch = str(variant).partition("/")
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; valid names: {list(VARIANTS)}, optionally followed by "
                         f"'/<patch size>' (e.g. 'B/16', 'So400m/14')")
    out = dict(zip(("width", "depth", "mlp_dim", "num_heads"), VARIANTS[name], strict=True))
    if slash:
        if not patch.isdigit() or int(patch) < 1:
            raise ValueError(f"ViT variant {variant!r}: patch size {patch!r} is not a positive integer")
        out["patch_size"] = int(patch)
    return out


def make_config(cls: type, kind: str, fields: Mapping[str, Any]) -> Any:
    """`cls(**fields)`, but unknown field names are a ValueError naming them (not a TypeError)."""
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(fields) - known):
        raise ValueError(f"unknown {kind} fields {unknown}; known: {sorted(known)}")
    return cls(**fields)


def vit_config(variant: str, **overrides: Any) -> ViTConfig:
    """A `ViTConfig` from a big_vision variant string, e.g. `vit_config("So400m/14", image_size=384)`."""
    return make_config(ViTConfig, "ViTConfig", {**decode_variant(variant), **overrides})


class NaFlexImages(NamedTuple):
    """A NaFlex batch (see the module docstring): `patches` [B, P, p*p*3] float, `spatial_shapes` [B, 2] int32
    (rows, columns of each image's patch grid), `mask` [B, P] bool (True on an image's rows * columns patches)."""

    patches: jax.Array
    spatial_shapes: jax.Array
    mask: jax.Array


def resize_positions(grid: jax.Array, spatial_shapes: jax.Array, length: int) -> jax.Array:
    """The G x G position grid [G, G, D] resized to each image's rows x columns (bilinear, antialiased when
    shrinking: a triangle filter as wide as the scale, normalised) and flattened row-major into `length` slots,
    padding slots taking the first position: [B, length, D] float32. One matrix per image, so it jits for any
    shape (`spatial_shapes` [B, 2] may be traced)."""
    side = grid.shape[0]
    sizes = spatial_shapes.astype(jnp.float32)[:, None, :]  # [B, 1, 2]
    slots = jnp.arange(length, dtype=jnp.float32)[None, :, None]  # [1, length, 1]
    rows = jnp.floor(slots / sizes[..., 1:])
    index = jnp.concatenate([rows, slots - rows * sizes[..., 1:]], axis=-1)  # [B, length, 2] (row, column)
    index = index * (slots < sizes.prod(-1, keepdims=True))  # padding: position (0, 0)
    scale = side / sizes  # [B, 1, 2]: source cells per output cell, per axis
    support = jnp.maximum(scale, 1.0)
    center = (index + 0.5) * scale - 0.5  # [B, length, 2] in source coordinates
    source = jnp.arange(side, dtype=jnp.float32)
    weights = jnp.maximum(1 - jnp.abs(source - center[..., None]) / support[..., None], 0)  # [B, length, 2, G]
    weights = weights / weights.sum(-1, keepdims=True)
    both = weights[..., 0, :, None] * weights[..., 1, None, :]  # [B, length, G, G]
    flat = grid.reshape(side * side, -1).astype(jnp.float32)
    return both.reshape(*both.shape[:2], side * side) @ flat  # [B, length, D]


# ---------------------------------------------------------------------------------------------- layers


class MlpBlock(nn.Module):
    """Dense_0 [D, F] -> tanh-GELU -> Dense_1 [F, D], both with biases."""

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.normal(stddev=1e-6))
        y = nn.Dense(self.mlp_dim, name="Dense_0", **kw)(x)  # [B, T, F]
        y = nn.gelu(y, approximate=True)
        return nn.Dense(x.shape[-1], name="Dense_1", **kw)(y)  # [B, T, D]


class Projection(nn.Module):
    """A DenseGeneral's `kernel` and `bias` (flax's shapes, inits and names) without the matmul: the attention
    below multiplies several of them at once. `in_shape` + `out_shape` is the kernel's shape, `out_shape` the
    bias's; the kernel is initialised as the [prod(in), prod(out)] matrix, as flax's DenseGeneral does."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        flat = (math.prod(self.in_shape), math.prod(self.out_shape))
        kernel_shape = self.in_shape + self.out_shape

        def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
            return nn.initializers.xavier_uniform()(key, flat, dtype).reshape(shape)

        kernel = self.param("kernel", kernel_init, kernel_shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, self.out_shape, self.param_dtype)
        return kernel, bias


class MultiHeadAttention(nn.Module):
    """Bidirectional multi-head attention with biases; queries from `xq` [B, T, D], keys and values from `xkv`
    [B, S, D] (None: self-attention, from `xq`), keys outside `key_mask` [B, S] (if given) never attended. Param
    names and shapes follow flax's MultiHeadDotProductAttention: `query`, `key`, `value` kernel [D, N, H], bias
    [N, H]; `out` kernel [N, H, D], bias [D].

    Computed heads-first: self-attention projects q, k and v with one matmul (the three kernels side by side,
    [D, 3, N, H]) into [3, B, N, T, H], and the core (`attention_core.attend`: float32 logits and softmax) runs
    on [B, N, T, H] with its own backward pass."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, xq: jax.Array, xkv: jax.Array | None = None, key_mask: jax.Array | None = None) -> jax.Array:
        d = xq.shape[-1]
        n = self.num_heads
        h = d // n
        (wq, bq), (wk, bk), (wv, bv) = (
            jax.tree.map(lambda a: a.astype(self.dtype), Projection((d,), (n, h), self.param_dtype, name=name)())
            for name in ("query", "key", "value"))
        xq = xq.astype(self.dtype)
        if xkv is None:
            kernel = jnp.stack([wq, wk, wv], axis=1)  # [D, 3, N, H]
            bias = jnp.stack([bq, bk, bv])[:, None, :, None, :]  # [3, 1, N, 1, H]
            q, k, v = jnp.einsum("BTD,DCNH->CBNTH", xq, kernel) + bias  # each [B, N, T, H]
        else:
            xkv = xkv.astype(self.dtype)
            q = jnp.einsum("BTD,DNH->BNTH", xq, wq) + bq[:, None, :]
            k = jnp.einsum("BSD,DNH->BNSH", xkv, wk) + bk[:, None, :]
            v = jnp.einsum("BSD,DNH->BNSH", xkv, wv) + bv[:, None, :]
        y = attend(q, k, v, key_mask, h**-0.5)  # [B, N, T, H]
        wo, bo = jax.tree.map(lambda a: a.astype(self.dtype), Projection((n, h), (d,), self.param_dtype, name="out")())
        return jnp.einsum("BNTH,NHD->BTD", y, wo) + bo  # [B, T, D]


class EncoderBlock(nn.Module):
    """One pre-LayerNorm block. Returns (x, x or None): the second is what nn.scan stacks as per-layer output. The
    input and output [B, T, D] are held to `activation_sharding` (None: free)."""

    mlp_dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    norm_eps: float = 1e-6
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, self.activation_sharding)
        y = LayerNorm(self.norm_eps, **dtypes, name="LayerNorm_0")(x)
        y = MultiHeadAttention(self.num_heads, **dtypes, name="MultiHeadDotProductAttention_0")(y, None, key_mask)
        x = x + y
        y = LayerNorm(self.norm_eps, **dtypes, name="LayerNorm_1")(x)
        x = constrain(x + MlpBlock(self.mlp_dim, **dtypes, name="MlpBlock_0")(y), self.activation_sharding)
        return x, (x if self.return_hidden else None)


class Encoder(nn.Module):
    """L blocks then `encoder_norm`; both towers use it. Returns the normed tokens [B, T, D] and an `out` dict:
    `pre_ln` (the last block's output) and, with `return_hidden`, `blocks` [L, B, T, D] (every block's output)."""

    depth: int
    mlp_dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    norm_eps: float = 1e-6
    scan_layers: bool = False
    remat_policy: str | None = None
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`key_mask` [B, T]: tokens the others may attend to (None: all)."""
        block = remat(EncoderBlock, self.remat_policy, self.scan_layers)
        kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                  norm_eps=self.norm_eps, return_hidden=self.return_hidden,
                  activation_sharding=self.activation_sharding)
        if self.scan_layers:
            scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth,
                              in_axes=nn.broadcast)
            x, hidden = scanned(**kw, name="encoderblock")(x, key_mask)  # hidden [L, B, T, D] or None
        else:
            outs = []
            for i in range(self.depth):
                x, h = block(**kw, name=f"encoderblock_{i}")(x, key_mask)
                outs.append(h)
            hidden = jnp.stack(outs) if self.return_hidden else None
        assert x.dtype == self.dtype, (x.dtype, self.dtype)  # a silent upcast would double activation memory
        out = {"pre_ln": x}
        if self.return_hidden:
            out["blocks"] = hidden
        return LayerNorm(self.norm_eps, self.dtype, self.param_dtype, name="encoder_norm")(x), out


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe [1, 1, D] attends to the tokens, then a residual MLP."""

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        b, _, d = x.shape
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))  # [B, 1, D]
        h = MultiHeadAttention(self.num_heads, **dtypes, name="MultiHeadDotProductAttention_0")(probe, x, key_mask)
        y = LayerNorm(self.norm_eps, **dtypes, name="LayerNorm_0")(h)
        h = h + MlpBlock(self.mlp_dim, **dtypes, name="MlpBlock_0")(y)  # [B, 1, D]
        return h[:, 0]  # [B, D]


def tower_encoder(tower: nn.Module, cfg: Any, name: str) -> Encoder:
    """The Encoder of a tower (`ViT` or `text.TextTransformer`) with its config's sizes (a ViTConfig or TextConfig:
    both carry the same encoder fields) and the tower's module settings."""
    return Encoder(depth=cfg.depth, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads, dtype=as_dtype(tower.dtype),
                   param_dtype=as_dtype(tower.param_dtype), norm_eps=cfg.norm_eps, scan_layers=tower.scan_layers,
                   remat_policy=tower.remat_policy, return_hidden=tower.return_hidden,
                   activation_sharding=tower.activation_sharding, name=name)


class ViT(nn.Module):
    """`__call__(images [B, R, R, 3] in [-1, 1], or `NaFlexImages` with `naflex`) -> (x, out)`: x is [B, E] pooled
    (or [B, P, E] tokens with pool_type "none"), E = head_size or D. `out`: `stem` [B, R/p, R/p, D] ([B, P, D] for
    NaFlex), `with_posemb` [B, P, D], `pre_ln`,
    `encoded` [B, P, D] (after encoder_norm), `pre_logits` (pooled, before the head), `logits` (after the head,
    when there is one) and, with `return_hidden`, `blocks` [L, B, P, D]. Settings: see the module docstring."""

    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    @nn.compact
    def __call__(self, images: jax.Array | NaFlexImages) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        r, p = cfg.image_size, cfg.patch_size
        dtype, param_dtype = as_dtype(self.dtype), as_dtype(self.param_dtype)
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        out: dict[str, jax.Array] = {}
        d, side = cfg.width, r // p
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / math.sqrt(d)), (1, side * side, d),
                         param_dtype)
        key_mask = None
        if cfg.naflex:
            if not isinstance(images, NaFlexImages) or images.patches.ndim != 3 or images.patches.shape[2] != p * p * 3:
                raise ValueError(f"a NaFlex ViT takes NaFlexImages with patches [B, P, {p * p * 3}] (patch {p}, 3 "
                                 f"channels), got {type(images).__name__}")
            b, n, _ = images.patches.shape
            patches = images.patches.astype(dtype).reshape(b, n, p, p, 3)  # each patch's rows, columns, channels
            # The convolution's kernel [p, p, 3, D] as a matrix over each patch: the same parameters.
            x = out["stem"] = nn.DenseGeneral(d, axis=(-3, -2, -1), **dtypes, name="embedding")(patches)
            positions = resize_positions(pos[0].reshape(side, side, d), images.spatial_shapes, x.shape[1])
            key_mask = images.mask.astype(bool)
        else:
            if images.ndim != 4 or tuple(images.shape[1:]) != (r, r, 3):
                raise ValueError(f"images have shape {tuple(images.shape)}; this ViT expects [B, {r}, {r}, 3] "
                                 f"(image_size {r}, channels last)")
            x = out["stem"] = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", **dtypes,
                                      name="embedding")(images.astype(dtype))  # [B, R/p, R/p, D]
            b, gh, gw, _ = x.shape
            x = jnp.reshape(x, (b, gh * gw, d))  # [B, P, D], row-major over the patch grid (as HF's flatten(2))
            positions = pos
        x = out["with_posemb"] = x + positions.astype(dtype)

        x, enc = tower_encoder(self, cfg, "Transformer")(x, key_mask)
        out |= enc
        out["encoded"] = x  # [B, P, D]

        if cfg.pool_type == "map":
            map_head = MAPHead(cfg.num_heads, cfg.mlp_dim, **dtypes, norm_eps=cfg.norm_eps, name="MAPHead_0")
            x = map_head(x, key_mask)  # [B, D]
        elif cfg.pool_type == "gap" and key_mask is None:
            x = jnp.mean(x.astype(jnp.float32), axis=1).astype(dtype)  # [B, D]
        elif cfg.pool_type == "gap":  # the mean of each image's own patches
            weights = key_mask.astype(jnp.float32)[..., None]  # [B, P, 1]
            x = ((x.astype(jnp.float32) * weights).sum(1) / weights.sum(1)).astype(dtype)  # [B, D]
        out["pre_logits"] = x
        if cfg.head_size is not None:
            x = out["logits"] = nn.Dense(cfg.head_size, **dtypes, name="head")(x)
        return x, out


# ---------------------------------------------------------------------------------------------- layouts


def stack_encoder_blocks(encoder: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """Encoder params with `encoderblock_0 ... encoderblock_{L-1}` -> `encoderblock` [L, ...] (the scan layout)."""
    encoder = dict(encoder)
    blocks = [encoder.pop(f"encoderblock_{i}") for i in range(depth)]
    encoder["encoderblock"] = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *blocks)
    return encoder


def unstack_encoder_blocks(encoder: Mapping[str, Any]) -> dict[str, Any]:
    """Encoder params with `encoderblock` [L, ...] -> `encoderblock_0 ... encoderblock_{L-1}` (unrolled layout)."""
    encoder = dict(encoder)
    stacked = encoder.pop("encoderblock")
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
        encoder[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return encoder


def relayout_encoder(encoder: Mapping[str, Any], depth: int, scan_layers: bool) -> dict[str, Any]:
    """Encoder params in whichever layout they come, returned in the scanned (`scan_layers`) or unrolled one."""
    is_scanned = "encoderblock" in encoder
    if scan_layers and not is_scanned:
        return stack_encoder_blocks(encoder, depth)
    if not scan_layers and is_scanned:
        return unstack_encoder_blocks(encoder)
    return dict(encoder)


def relayout_vit(params: Mapping[str, Any], config: ViTConfig, scan_layers: bool) -> dict[str, Any]:
    """A ViT's params in either block layout, returned as `ViT(config, scan_layers=scan_layers)` expects."""
    return {**params, "Transformer": relayout_encoder(params["Transformer"], config.depth, scan_layers)}
