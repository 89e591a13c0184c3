"""PaliGemma (and Gemma 3 with vision): a SigLIP vision tower, a projector and a Gemma-family decoder under a
prefix-LM mask.

Axis letters: B batch, T tokens (image placeholders included), S key tokens, P image tokens (patches),
R image side, D decoder width, V vocab.

    images [B, R, R, 3] -> ViT (no pooling) [B, P, D_img] -> projector (`img/head`) [B, P, D]
    tokens [B, T] -> token embeddings * sqrt(D) [B, T, D]; the P placeholder ids (`image_token_id`) of each row
    are replaced, in order, by that row's P image tokens -> decoder -> logits [B, T, V]

Image tokens are not multiplied by sqrt(D): only looked-up text embeddings are (what big_vision does and what
transformers 5.x does, whose scaled-embedding module applies the factor at lookup). Token layout follows
transformers' processor, `"<image>" * P + bos + prefix + "\\n" [+ suffix + eos]`, so a batch from either
processor runs unchanged; the placeholder id may lie beyond the vocabulary (it is never looked up).

Masks: `masks.prefix_lm_mask(input_mask, mask_ar)` (big_vision/openpi semantics): a run of `mask_ar` zeros (image +
prefix) is one bidirectional block and each one (suffix token) starts a causal step; padding is never seen.
Positions are `cumsum(input_mask) - 1`.

Gemma 3 with vision (`projector="gemma3"`, transformers' `Gemma3ForConditionalGeneration`) is the same model with
another projector and mask: the ViT's tokens [B, g*g, E] are average-pooled over the g x g patch grid down to
`mm_tokens_per_image` (k x k windows, k = g / sqrt(mm_tokens_per_image)), normalised by a Gemma RMSNorm
(`mm_projector/mm_soft_embedding_norm`) and projected by `mm_projector/mm_input_projection` [E, D]. Its image
tokens attend bidirectionally within their own image and causally to everything before; in `mask_ar` terms
(`gemma3_mask_ar`), each image's first token starts a causal step and its others continue it, so
`prefix_lm_mask` gives exactly that. Its sliding layers cut the window through an image too
(`DecoderConfig.bidirectional_beyond_window` False).

Parameters (big_vision's PaliGemma names): `img/...` (the ViT; `img/head` is PaliGemma's projector),
`mm_projector/...` (Gemma 3's) and `llm/...` (the decoder; see `gemma.py`). Extra experts
(`PaliGemmaConfig.experts`, the openpi pi0 layout) add `_1`, `_2`, ... parameters inside `llm` and share every
attention layer with expert 0; a single-expert checkpoint's params are exactly expert 0's.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite.models.cache import KVCache
from big_vision_lite.models.gemma import Decoder, DecoderConfig, relayout_layers
from big_vision_lite.models.layers import RMSNorm
from big_vision_lite.models.lora import LoRAConfig
from big_vision_lite.models.vit import ViT, ViTConfig, relayout_vit
from big_vision_lite.utils.dtypes import as_dtype

# ViTConfig fields that runs written before they became module settings (scan_layers, remat_policy, dtype) saved.
_LEGACY_VISION_FIELDS = ("scan", "remat", "dtype")


PROJECTORS = ("linear", "gemma3")


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """`vision` must pool "none". `projector` "linear" (PaliGemma): `vision.head_size` = the decoder width (its head
    is the projector); "gemma3": no head, and `mm_tokens_per_image` a square whose side divides the patch grid's."""

    vision: ViTConfig
    llm: DecoderConfig
    image_token_id: int
    experts: tuple[DecoderConfig, ...] = ()  # extra experts after expert 0 (`llm`)
    projector: str = "linear"
    mm_tokens_per_image: int | None = None  # image tokens after Gemma 3's pooling

    def __post_init__(self):
        if self.vision.pool_type != "none":
            raise ValueError(f"PaliGemma's vision tower must keep its tokens: pool_type 'none', got "
                             f"{self.vision.pool_type!r}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector {self.projector!r} is not one of {PROJECTORS}")
        if self.projector == "linear" and self.vision.head_size != self.llm.width:
            raise ValueError(f"the projector (vision.head_size {self.vision.head_size}) must map to the decoder "
                             f"width {self.llm.width}")
        if self.projector == "gemma3":
            if self.vision.head_size is not None:
                raise ValueError(f"Gemma 3's vision tower has no head (vision.head_size {self.vision.head_size}); "
                                 "its projector is mm_projector")
            grid, side = self.vision.image_size // self.vision.patch_size, math.isqrt(self.mm_tokens_per_image or 0)
            if side < 1 or side * side != self.mm_tokens_per_image or grid % side:
                raise ValueError(f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose side "
                                 f"divides the {grid} x {grid} patch grid (its pooling windows tile the grid)")
        elif self.mm_tokens_per_image is not None:
            raise ValueError("mm_tokens_per_image is for projector 'gemma3'; PaliGemma keeps one token per patch")
        if not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            raise ValueError(f"image_token_id must be an int >= 0, got {self.image_token_id!r}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches if self.projector == "linear" else self.mm_tokens_per_image

    @property
    def decoders(self) -> tuple[DecoderConfig, ...]:
        return (self.llm, *self.experts)


def paligemma_config_to_dict(config: PaliGemmaConfig) -> dict[str, Any]:
    """A JSON-ready dict of `config` (what a training run saves beside its checkpoints)."""
    return dataclasses.asdict(config)


def paligemma_config_from_dict(fields: dict[str, Any]) -> PaliGemmaConfig:
    """Inverse of `paligemma_config_to_dict` (lists from JSON become the tuples the configs hold)."""
    def decoder(d: dict[str, Any]) -> DecoderConfig:
        d = dict(d)
        if d.get("lora"):
            d["lora"] = LoRAConfig(**d["lora"])
        if d.get("layer_types") is not None:
            d["layer_types"] = tuple(d["layer_types"])
        return DecoderConfig(**d)

    vision = {k: v for k, v in fields["vision"].items() if k not in _LEGACY_VISION_FIELDS}
    return PaliGemmaConfig(vision=ViTConfig(**vision), llm=decoder(fields["llm"]),
                           image_token_id=fields["image_token_id"],
                           experts=tuple(decoder(e) for e in fields.get("experts", ())),
                           projector=fields.get("projector", "linear"),
                           mm_tokens_per_image=fields.get("mm_tokens_per_image"))


def merge_image_tokens(text: jax.Array, image: jax.Array, is_image: jax.Array) -> jax.Array:
    """Row b's placeholders (is_image [B, T]) take image [B, P, D] tokens 0, 1, ... in order; text [B, T, D].

    A gather by the running placeholder count, not a masked scatter, so it traces to fixed shapes under jit.
    Each row must hold exactly P placeholders (checked by the callers that see concrete ids).
    """
    order = jnp.clip(jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1, 0, image.shape[1] - 1)  # [B, T]
    gathered = jnp.take_along_axis(image, order[:, :, None], axis=1)  # [B, T, D]
    return jnp.where(is_image[:, :, None], gathered.astype(text.dtype), text)


def check_image_tokens(tokens: np.ndarray, config: PaliGemmaConfig) -> None:
    """Every row of tokens [B, T] must hold exactly P image placeholders (what the merge assumes)."""
    counts = (np.asarray(tokens) == config.image_token_id).sum(axis=1)
    if bad := [int(i) for i in np.flatnonzero(counts != config.num_image_tokens)]:
        raise ValueError(f"rows {bad} hold {counts[bad].tolist()} image tokens (id {config.image_token_id}); "
                         f"each row needs exactly {config.num_image_tokens} (one per image patch)")


def gemma3_mask_ar(tokens: np.ndarray, image_token_id: int) -> np.ndarray:
    """mask_ar [B, T] int32 of Gemma 3 prompts: 1 (a causal step) everywhere except on an image token that follows
    another, so each image is one bidirectional block (`masks.prefix_lm_mask`)."""
    is_image = np.asarray(tokens) == image_token_id
    follows = np.pad(is_image, [(0, 0), (1, 0)])[:, :-1]
    return (~(is_image & follows)).astype(np.int32)


class Gemma3Projector(nn.Module):
    """Gemma 3's multimodal projector: ViT tokens [B, g*g, E] -> average pooling to [B, m, E] (m =
    `mm_tokens_per_image`, k x k windows of the row-major patch grid) -> RMSNorm (1 + w, float32) -> [B, m, D]."""

    config: PaliGemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        batch, patches, width = x.shape
        grid, side = cfg.vision.image_size // cfg.vision.patch_size, math.isqrt(cfg.mm_tokens_per_image)
        assert patches == grid * grid, (patches, grid)  # the pooling windows tile exactly this grid
        k = grid // side
        windows = x.astype(jnp.float32).reshape(batch, side, k, side, k, width)  # [B, rows, k, cols, k, E]
        pooled = windows.mean(axis=(2, 4)).reshape(batch, side * side, width)  # [B, m, E]
        normed = RMSNorm(cfg.vision.norm_eps, True, as_dtype(self.param_dtype), name="mm_soft_embedding_norm")(
            pooled.astype(x.dtype))
        w = self.param("mm_input_projection", nn.initializers.lecun_normal(), (width, cfg.llm.width),
                       as_dtype(self.param_dtype))
        return normed @ w.astype(normed.dtype)  # [B, m, D]


class PaliGemma(nn.Module):
    """`__call__(tokens, positions, attn_mask, cache, *, images=None)` -> (logits [B, T, V], cache, out).

    With `images` [B, R, R, 3] the image placeholders in `tokens` are replaced by image tokens (the prefill);
    without, `tokens` are plain text ids (decoding steps). `out` adds `image_tokens` [B, P, D] (the projector's
    output) and `vision` (the ViT's intermediates) to the decoder's `out`. The module settings (dtype, param_dtype,
    scan_layers, remat_policy, activation_sharding) apply to both the ViT and the decoder.
    """

    config: PaliGemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | None = None
    return_probs: bool = False
    return_hidden: bool = False
    activation_sharding: jax.sharding.Sharding | None = None

    def setup(self):
        self.img = ViT(self.config.vision, dtype=self.dtype, param_dtype=self.param_dtype,
                       scan_layers=self.scan_layers, remat_policy=self.remat_policy, return_hidden=self.return_hidden,
                       activation_sharding=self.activation_sharding)
        if self.config.projector == "gemma3":
            self.mm_projector = Gemma3Projector(self.config, as_dtype(self.dtype), self.param_dtype)
        self.llm = Decoder(self.config.decoders, dtype=self.dtype, param_dtype=self.param_dtype,
                           scan_layers=self.scan_layers, remat_policy=self.remat_policy,
                           return_probs=self.return_probs, return_hidden=self.return_hidden,
                           activation_sharding=self.activation_sharding)

    def embed_images(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """images [B, R, R, 3] in [-1, 1] -> image tokens [B, P, D] in the decoder's dtype, ViT intermediates."""
        tokens, out = self.img(images)
        if self.config.projector == "gemma3":
            tokens = self.mm_projector(tokens)
        return tokens.astype(as_dtype(self.dtype)), out

    def embed(self, tokens: jax.Array, images: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
        """Decoder inputs [B, T, D]: scaled text embeddings with image tokens at the placeholders."""
        is_image = tokens == self.config.image_token_id
        if self.config.image_token_id >= self.config.llm.vocab_size:
            # A placeholder beyond the vocabulary has no row: look up id 0 there (replaced by an image token when
            # images are given). Inside the vocabulary its own row is used, as transformers does: a generated
            # image-token id (no image to fill it) must embed as itself.
            tokens = jnp.where(is_image, 0, tokens)
        x = self.llm.embed(tokens)
        out: dict[str, Any] = {}
        if images is not None:
            image_tokens, out["vision"] = self.embed_images(images)
            out["image_tokens"] = image_tokens
            x = merge_image_tokens(x, image_tokens, is_image)
        return x, out

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attn_mask: jax.Array,
        cache: KVCache | None = None,
        *,
        images: jax.Array | None = None,
        last_logits_only: bool = False,
    ) -> tuple[jax.Array, KVCache, dict[str, Any]]:
        x, extra = self.embed(tokens, images)
        xs = [x] + [None] * len(self.config.experts)
        xs, cache, out = self.llm.forward(xs, positions, attn_mask, cache)
        out |= extra | {"embeddings": x}
        final = xs[0][:, -1:] if last_logits_only else xs[0]
        return self.llm.logits(final), cache, out

    def experts_forward(
        self,
        xs: Sequence[jax.Array | None],
        positions: jax.Array,
        attn_mask: jax.Array,
        cache: KVCache | None = None,
    ) -> tuple[list[jax.Array | None], KVCache, dict[str, Any]]:
        """The decoder on per-expert inputs (embeddings, None to skip an expert), e.g. [prefix, None] once and
        then [None, suffix] on the returned concatenation cache; positions/mask cover the given tokens."""
        return self.llm.forward(xs, positions, attn_mask, cache)

    def for_decoding(self, params: dict[str, Any]) -> tuple["PaliGemma", dict[str, Any]]:
        """This model with unrolled layers and `params` relaid out to match (what decode loops run)."""
        if not self.scan_layers:
            return self, params
        return self.clone(scan_layers=False), relayout_paligemma(params, self.config, scan_layers=False)


def dummy_inputs(config: PaliGemmaConfig, batch: int = 1, text_len: int = 2) -> dict[str, jax.Array]:
    """Shape-only inputs for initialisation: one image and P placeholders + `text_len` text ids per row."""
    p = config.num_image_tokens
    tokens = jnp.concatenate([jnp.full((batch, p), config.image_token_id, jnp.int32),
                              jnp.ones((batch, text_len), jnp.int32)], axis=1)
    length = tokens.shape[1]
    return {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(length), (batch, length)),
            "attn_mask": jnp.ones((batch, length, length), bool),
            "images": jnp.zeros((batch, config.vision.image_size, config.vision.image_size, 3), jnp.float32)}


def init_params(module: PaliGemma, rng: jax.Array) -> dict[str, Any]:
    """Fresh parameters {img, llm}; experts > 0 included (their first call runs with a dummy suffix)."""
    inputs = dummy_inputs(module.config)

    def init(model: PaliGemma) -> None:
        x, _ = model.embed(inputs["tokens"], inputs["images"])
        length = x.shape[1]
        suffixes = [jnp.zeros((1, 1, cfg.width), as_dtype(module.dtype)) for cfg in module.config.experts]
        total = length + len(suffixes)
        positions = jnp.arange(total)[None]
        model.experts_forward([x, *suffixes], positions, jnp.ones((1, total, total), bool))
        model.llm.logits(x)

    return module.init(rng, method=init)["params"]


def relayout_paligemma(params: Mapping[str, Any], config: PaliGemmaConfig, scan_layers: bool) -> dict[str, Any]:
    """Params in whichever block layouts they come, returned as `PaliGemma(config, scan_layers=...)` expects: ViT
    blocks and decoder layers both stacked (`scan_layers`) or both unrolled."""
    return {**params, "img": relayout_vit(params["img"], config.vision, scan_layers),
            "llm": relayout_layers(params["llm"], config.llm.depth, scan_layers)}
