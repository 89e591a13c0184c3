"""PaliGemma inputs: images to pixel values and prefix/suffix text to the token layout PaliGemma trains on.

    proc = PaliGemmaProcessor("gemma3-270m", image_size=224)          # 256 image tokens (patch 14)
    train = proc(images, ["caption en"] * 2, ["a cat", "a dog"], max_len=300)
    prompt = proc(images, ["caption en"] * 2, padding_side="left")    # for `generate`
    texts = proc.batch_decode(generated_ids)

Images (any PIL mode, or numpy HWC uint8 / float in [0, 1]) become RGB on a white background, are resized to
R x R with PIL bicubic on uint8 and scaled to [-1, 1]: `pixel_values` float32 [B, R, R, 3] (NHWC; transformers
gives NCHW). Each text is laid out as

    "<image>" * N + bos + tokens(prefix + "\\n") [+ tokens(suffix) + eos]

and the batch carries, all [B, T]: `input_ids` int32, `input_mask` bool (False on padding), `token_type_ids`
int32 (1 on suffix and eos, else 0), `mask_ar` int32 (big_vision's autoregressive mask: 0 for the image and
prefix, which attend to each other fully, 1 for the causal suffix), `loss_mask` bool (suffix and eos only), and
`truncated` bool [B] (rows whose suffix was cut to fit `max_len`).

The ids, token types and pixel values equal transformers' `PaliGemmaProcessor` with the slow (PIL)
`SiglipImageProcessorPil`: like it, a tokenizer without "<image>" gets it as a new id, followed by the 1024
`<locDDDD>` and 128 `<segDDD>` tokens, in that order from the tokenizer's vocabulary size on (tokens it has
keep their ids). `vocab_size` counts them: the model's embedding needs at least that many rows.

Axis letters: B batch, T tokens, R image side.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from big_vision_lite.checkpoints.tokenizer import Tokenizer, load_tokenizer

IMAGE_TOKEN = "<image>"
# PaliGemma's detection (box corner) and segmentation (mask code) tokens, as transformers adds them.
EXTRA_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024)) + tuple(f"<seg{i:03d}>" for i in range(128))

ImageLike = Image.Image | np.ndarray
Batch = dict[str, np.ndarray]
PaddingSide = Literal["right", "left"]


class PaliGemmaProcessor:
    """Turns (image, prefix[, suffix]) examples into PaliGemma batches, and generated ids back into text.

    tokenizer: one of our `Tokenizer`s, or what `load_tokenizer` accepts (a packaged name, an HF folder, a
    `.gguf` file). It needs a BOS token; suffixes (training) also need an EOS.
    image_size: R, the side images are resized to. num_image_tokens: N, the image placeholders per example;
    default (image_size / patch_size)^2, the number of patches the vision tower gives.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | str | os.PathLike[str],
        *,
        image_size: int = 224,
        patch_size: int = 14,
        num_image_tokens: int | None = None,
        image_token: str = IMAGE_TOKEN,
    ) -> None:
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if num_image_tokens is None:
            if patch_size < 1 or image_size % patch_size:
                raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
            num_image_tokens = (image_size // patch_size) ** 2
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        if self.tokenizer.bos_id is None:
            raise ValueError(f"{self.tokenizer!r} has no BOS token, which PaliGemma puts between image and prefix")
        self.bos_id: int = self.tokenizer.bos_id
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token

        # transformers adds the image token, then the extra tokens; the Rust tokenizer gives each one it lacks
        # the next id after its vocabulary (ids are contiguous), and keeps the id of one it already has.
        self.added_tokens: dict[str, int] = {}
        self._new_tokens: dict[int, str] = {}  # ids only we know: the tokenizer cannot decode them
        next_id = self.tokenizer.vocab_size
        for token in dict.fromkeys((image_token, *EXTRA_TOKENS)):
            known = self.tokenizer.token_to_id(token)
            if known is None:
                known, next_id = next_id, next_id + 1
                self._new_tokens[known] = token
            self.added_tokens[token] = known
        self.image_token_id = self.added_tokens[image_token]
        self.vocab_size = max(self.tokenizer.vocab_size, *(i + 1 for i in self.added_tokens.values()))
        # Added tokens are cut out of the text before the tokenizer sees the rest, as `tokenizers` does; longest
        # first, so that of two tokens starting at one place the longer one wins.
        self._split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True)) + ")"
        )

    @property
    def eos_id(self) -> int | None:
        """The id that ends a suffix (the tokenizer's EOS), None if it has none."""
        return self.tokenizer.eos_ids[0] if self.tokenizer.eos_ids else None

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad id (its EOS if it names no pad token), else 0."""
        pad = self.tokenizer.pad_id
        return 0 if pad is None else pad

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        prefixes: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        *,
        max_len: int | None = None,
        padding_side: PaddingSide = "right",
    ) -> Batch:
        """`tokenize(prefixes, suffixes, ...)` plus `pixel_values` float32 [B, R, R, 3] of `images`, one per example.

        images: a PIL image or array for a batch of one, a sequence of them, or an array [B, H, W, C].
        """
        batch = self.tokenize(prefixes, suffixes, max_len=max_len, padding_side=padding_side)
        pixels = self.process_images(images)
        if len(pixels) != len(batch["input_ids"]):
            raise ValueError(f"got {len(pixels)} images for {len(batch['input_ids'])} texts; give one image per text")
        batch["pixel_values"] = pixels
        return batch

    def process_images(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """float32 [B, R, R, 3] in [-1, 1] (`resize_rgb` of each image, then `normalize_pixels`)."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim < 4):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        rgb = np.stack([resize_rgb(image, self.image_size, index=i) for i, image in enumerate(images)])
        return normalize_pixels(rgb)

    def tokenize(
        self,
        prefixes: str | Sequence[str],
        suffixes: str | Sequence[str] | None = None,
        *,
        max_len: int | None = None,
        padding_side: PaddingSide = "right",
    ) -> Batch:
        """The text half of a batch: `input_ids`, `input_mask`, `token_type_ids`, `mask_ar`, `loss_mask` [B, T] and
        `truncated` [B] (see the module docstring). T is `max_len`, or the longest example if None.

        padding_side "right" (training): a suffix too long for `max_len` is cut (its eos too, as the text does not
        end there), with a warning and `truncated` set; image tokens and prefix are never cut: a prefix that does
        not fit is an error. "left" (generation prompts, no suffixes): the last column holds every row's last
        prompt token; a prompt longer than `max_len` is an error.
        """
        prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        if suffixes is not None:
            suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
            if len(suffixes) != len(prefixes):
                raise ValueError(f"got {len(prefixes)} prefixes and {len(suffixes)} suffixes; give one suffix each")
            if self.eos_id is None:
                raise ValueError(f"{self.tokenizer!r} has no EOS token to end the suffixes with")
        if not prefixes:
            raise ValueError("no texts given")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if padding_side == "left" and suffixes is not None:
            raise ValueError("padding_side='left' is for generation prompts, which have no suffix; "
                             "training examples (with suffixes) are right-padded")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        for kind, texts in (("prefix", prefixes), ("suffix", suffixes or [])):
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"{kind} {i}: expected str, got {type(text).__name__}")
                if self.image_token in text:
                    raise ValueError(f"{kind} {i} contains the image token {self.image_token!r}; the processor "
                                     "places the image tokens itself")

        # transformers tokenizes prefix and "\n" as one text, so a newline may merge with the prefix's end.
        prompt_ids = [[self.image_token_id] * self.num_image_tokens + [self.bos_id] + ids
                      for ids in self._encode([p + "\n" for p in prefixes])]
        target_ids = ([[*ids, self.eos_id] for ids in self._encode(suffixes)] if suffixes is not None
                      else [[] for _ in prefixes])

        lengths = [len(p) + len(s) for p, s in zip(prompt_ids, target_ids, strict=True)]
        width = max(lengths) if max_len is None else max_len
        if too_long := [i for i, p in enumerate(prompt_ids) if len(p) > width]:
            i = too_long[0]
            raise ValueError(f"example {i}: image tokens + BOS + prefix take {len(prompt_ids[i])} tokens, more than "
                             f"max_len {width} (examples {too_long} do not fit); raise max_len or shorten the prefix")
        truncated = np.array([n > width for n in lengths])
        if truncated.any():
            warnings.warn(f"{truncated.sum()} of {len(prefixes)} suffixes cut to fit max_len {width} (examples "
                          f"{np.flatnonzero(truncated).tolist()}); they lose their end and EOS", stacklevel=2)

        shape = (len(prefixes), width)
        batch = {
            "input_ids": np.full(shape, self.pad_id, np.int32),
            "input_mask": np.zeros(shape, bool),
            "token_type_ids": np.zeros(shape, np.int32),
            "mask_ar": np.zeros(shape, np.int32),
            "loss_mask": np.zeros(shape, bool),
        }
        for row, (prompt, target) in enumerate(zip(prompt_ids, target_ids, strict=True)):
            target = target[: width - len(prompt)]
            n = len(prompt) + len(target)
            cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
            batch["input_ids"][row, cols] = prompt + target
            batch["input_mask"][row, cols] = True
            suffix_cols = slice(cols.start + len(prompt), cols.stop)
            batch["token_type_ids"][row, suffix_cols] = 1
            batch["mask_ar"][row, suffix_cols] = 1
            batch["loss_mask"][row, suffix_cols] = True
        batch["truncated"] = truncated
        return batch

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """The text of generated `ids` [T], up to (without) the first EOS id.

        As transformers: special tokens (BOS, pad, image) are dropped unless `skip_special_tokens` is False;
        `<locDDDD>` / `<segDDD>` tokens are text and are kept.
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        ends = set(self.tokenizer.eos_ids)
        stop = next((k for k, i in enumerate(ids) if i in ends), len(ids))
        parts: list[str] = []
        run: list[int] = []
        # Ids the tokenizer lacks are decoded here; the runs between them by the tokenizer.
        for i in ids[:stop]:
            token = self._new_tokens.get(i)
            if token is None:
                run.append(i)
                continue
            if run:
                parts.append(self.tokenizer.decode(run, skip_special_tokens))
                run = []
            if not (skip_special_tokens and i == self.image_token_id):
                parts.append(token)
        if run:
            parts.append(self.tokenizer.decode(run, skip_special_tokens))
        return "".join(parts)

    def batch_decode(self, ids: np.ndarray | Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each row of `ids` [B, T]."""
        return [self.decode(row, skip_special_tokens) for row in ids]

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text without BOS/EOS, the processor's added tokens cut out first (one tokenizer call)."""
        pieces = [self._split.split(text) for text in texts]  # odd positions hold the added tokens
        plain = [p for split in pieces for p in split[::2]]
        encoded = iter(self.tokenizer.encode_batch(plain, add_bos=False))
        out = []
        for split in pieces:
            ids: list[int] = []
            for k, piece in enumerate(split):
                ids += next(encoded) if k % 2 == 0 else [self.added_tokens[piece]]
            out.append(ids)
        return out


def resize_rgb(image: ImageLike, size: int | tuple[int, int], *, index: int = 0,
               resample: Image.Resampling = Image.Resampling.BICUBIC) -> np.ndarray:
    """uint8 [H, W, 3]: `image` in RGB, resized to `size` (a side, or (H, W)) with PIL `resample` (bicubic:
    SigLIP's and PaliGemma's processors; Gemma 3's and SigLIP 2's are bilinear).

    PIL images of any mode are converted as transformers does: modes with alpha (and palettes with a
    transparent colour) are composited onto white, the rest go through `Image.convert("RGB")`. Arrays are
    channels last: [H, W] or [H, W, 1] grayscale (repeated), [H, W, 3] RGB, [H, W, 4] RGBA (composited onto white,
    rounded, as transformers does for arrays); dtype uint8, another integer type with values in [0, 255], or float
    in [0, 1] (rounded to uint8 levels first, so `u8 / 255` gives the pixels of `u8`). Anything else raises
    ValueError naming the image by `index`.
    """
    if isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image, index)
    elif isinstance(image, np.ndarray):
        rgb = Image.fromarray(_array_to_rgb(image, index))
    else:
        raise ValueError(f"image {index}: expected a PIL image or a numpy array, got {type(image).__name__}")
    height, width = (size, size) if isinstance(size, int) else size
    return np.asarray(rgb.resize((width, height), resample))


def normalize_pixels(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 in [-1, 1]: x / 255 in float64 rounded to float32, then (x - 0.5) / 0.5 in
    float32, the operations and precisions of transformers' rescale and normalize, so the values are equal."""
    scaled = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    half = np.float32(0.5)
    return (scaled - half) / half


def _pil_to_rgb(image: Image.Image, index: int) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {index}: empty image, size {image.width}x{image.height}")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as e:  # unsupported conversions, truncated files read lazily
        raise ValueError(f"image {index}: cannot convert PIL mode {image.mode!r} to RGB: {e}") from e


def _array_to_rgb(array: np.ndarray, index: int) -> np.ndarray:
    """uint8 [H, W, 3] of a channels-last array, checked."""
    where = f"image {index}"
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{where}: unsupported dtype {array.dtype}; expected uint8 in [0, 255] or float in [0, 1]")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim != 3:
        raise ValueError(f"{where}: expected shape [H, W] or [H, W, C] (channels last), got {array.shape} "
                         f"({array.ndim} dims)")
    if array.size == 0:
        raise ValueError(f"{where}: empty image, shape {array.shape}")
    channels = array.shape[2]
    if channels not in (1, 3, 4):
        raise ValueError(f"{where}: {channels} channels in shape {array.shape}; expected 1 (grayscale), 3 (RGB) or 4 "
                         "(RGBA), channels last")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: float pixels must lie in [0, 1], found NaN or inf")
        low, high = array.min(), array.max()
        if low < 0 or high > 1:
            raise ValueError(f"{where}: float pixels must lie in [0, 1], found values in [{low}, {high}]")
        # Rounding (transformers truncates) keeps u8 / 255 on its level; x * 255 may land just below it.
        array = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        low, high = array.min(), array.max()
        if low < 0 or high > 255:
            raise ValueError(f"{where}: {array.dtype} pixels must lie in [0, 255], found values in [{low}, {high}]")
        array = array.astype(np.uint8)
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 4:
        alpha = array[:, :, 3:] / 255
        return np.round(alpha * array[:, :, :3] + (1 - alpha) * 255).astype(np.uint8)
    return array
