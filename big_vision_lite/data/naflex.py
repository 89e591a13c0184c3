"""SigLIP 2 (NaFlex) inputs: images of any aspect ratio to padded patch sequences, texts to fixed-length ids, as
transformers' `Siglip2Processor` (with its PIL image processor) gives them.

    proc = NaFlexProcessor(patch_size=16, max_num_patches=256, tokenizer=tok, max_len=64)
    batch = proc(images, ["a photo of a cat"] * len(images))
    zimg, ztxt, _ = module.apply({"params": params}, NaFlexImages(*batch["images"]), batch["input_ids"])

Each image is resized (PIL bilinear) to the largest size whose sides are multiples of the patch and whose patch
count fits `max_num_patches`, keeping its aspect ratio (transformers' binary search over the scale, `eps` 1e-5;
at least one patch per side), scaled to [-1, 1], cut into patches (rows, then columns; each patch flattened row,
column, channel) and padded with zero patches. Axis letters: B batch, P max_num_patches, p patch, T max_len.

    images: `patches` float32 [B, P, p*p*3], `spatial_shapes` int32 [B, 2] (patch rows, columns), `mask` bool [B, P]
    input_ids int32 [B, T]: BOS + the lowercased text's ids, cut to T, left-padded with the pad id

The text follows transformers' `Siglip2Tokenizer` (a Gemma tokenizer lowercasing, as SigLIP 2 trained, and
padding on the left, so the last position, which the text tower pools, is the text's last token).
"""

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from big_vision_lite.checkpoints.tokenizer import Tokenizer
from big_vision_lite.data.processor import ImageLike, normalize_pixels, resize_rgb
from big_vision_lite.models.vit import NaFlexImages

SEARCH_EPS = 1e-5  # transformers' tolerance on the scale's binary search


def size_for_max_patches(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """(H, W): `height` x `width` scaled by the largest factor whose sides, rounded up to whole patches (at least
    one), give at most `max_patches` patches."""
    def scaled(side: int, scale: float) -> int:
        return max(patch, math.ceil(side * scale / patch) * patch)

    low, high = SEARCH_EPS / 10, 100.0
    while high - low >= SEARCH_EPS:
        scale = (low + high) / 2
        if (scaled(height, scale) // patch) * (scaled(width, scale) // patch) <= max_patches:
            low = scale
        else:
            high = scale
    return scaled(height, low), scaled(width, low)


class NaFlexProcessor:
    """Images (and texts, with a tokenizer) to SigLIP 2 batches; see the module docstring."""

    def __init__(self, *, patch_size: int, max_num_patches: int, tokenizer: Tokenizer | None = None,
                 max_len: int = 64) -> None:
        if patch_size < 1 or max_num_patches < 1 or max_len < 1:
            raise ValueError(f"patch_size {patch_size}, max_num_patches {max_num_patches} and max_len {max_len} "
                             "must all be >= 1")
        self.patch_size, self.max_num_patches = patch_size, max_num_patches
        self.tokenizer, self.max_len = tokenizer, max_len

    def process_images(self, images: Sequence[ImageLike],
                       grids: Sequence[tuple[int, int]] | None = None) -> NaFlexImages:
        """NaFlexImages (numpy) of `images`; `grids` asks each image's (rows, columns) of patches by hand instead
        of the largest that fits (refused when it holds more than max_num_patches)."""
        if len(images) == 0:
            raise ValueError("no images given")
        p, n = self.patch_size, self.max_num_patches
        patches = np.zeros((len(images), n, p * p * 3), np.float32)
        shapes = np.zeros((len(images), 2), np.int32)
        for i, image in enumerate(images):
            if grids is None:
                height, width = size_for_max_patches(*_size(image, i), p, n)
            else:
                rows, cols = grids[i]
                if rows < 1 or cols < 1 or rows * cols > n:
                    raise ValueError(f"image {i}: a grid of {rows} x {cols} patches asked for; it must hold 1 to "
                                     f"max_num_patches {n} patches")
                height, width = rows * p, cols * p
            rgb = resize_rgb(image, (height, width), index=i, resample=Image.Resampling.BILINEAR)
            rows, cols = height // p, width // p
            grid = normalize_pixels(rgb).reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)  # [r, c, p, p, 3]
            patches[i, : rows * cols] = grid.reshape(rows * cols, -1)
            shapes[i] = rows, cols
        mask = np.arange(n)[None, :] < shapes.prod(1)[:, None]
        return NaFlexImages(patches, shapes, mask)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """input_ids [B, max_len]: BOS + the lowercased text's ids, cut to max_len, left-padded with the pad id."""
        if self.tokenizer is None:
            raise ValueError("this NaFlexProcessor has no tokenizer; give one to tokenize texts")
        pad = self.tokenizer.pad_id or 0
        ids = np.full((len(texts), self.max_len), pad, np.int32)
        for row, ids_of_text in enumerate(self.tokenizer.encode_batch([t.lower() for t in texts])):
            kept = ids_of_text[: self.max_len]
            ids[row, self.max_len - len(kept):] = kept
        return ids

    def __call__(self, images: Sequence[ImageLike], texts: Sequence[str]) -> dict[str, object]:
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images for {len(texts)} texts; give one text per image")
        return {"images": self.process_images(images), "input_ids": self.tokenize(texts)}


def _size(image: ImageLike, index: int) -> tuple[int, int]:
    """(height, width) of a PIL image or a channels-last array; refused when either is 0 (nothing to scale)."""
    height, width = (image.height, image.width) if isinstance(image, Image.Image) else np.shape(image)[:2]
    if height == 0 or width == 0:
        raise ValueError(f"image {index}: empty image, size {width}x{height}")
    return int(height), int(width)
