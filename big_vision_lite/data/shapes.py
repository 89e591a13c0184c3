"""A generated image-caption dataset of coloured shapes, with attribute combinations held out for testing.

Every image shows one shape (circle, square, ...) of one colour and one size at one of 3x3 grid positions, on a
dark noisy background, and its caption says exactly that: "a small red circle at the top left". Nothing is
downloaded: an example is a pure function of `(spec, split, index)`.

Held-out split: a seeded subset of (colour, shape) pairs never appears in training, chosen so that every colour
and every shape still appears in training (with other partners). The test split holds exactly one example per
held-out full combination (colour, shape, size, position), so its captions are all distinct and image <-> text
retrieval among them is well defined. The gallery split holds one example per trained full combination, so
test + gallery cover every combination once. Because the held-out pairs are spread out, a colour (or shape) may occur in
only one held-out pair, so retrieval among the test captions alone can succeed without reading the shape; the
stricter compositional check ranks each test image against `all_captions(spec)`, where the same colour with a
trained shape is a candidate too.

The train split is effectively infinite (`TRAIN_SIZE` indices); the attributes of train example i are drawn
uniformly over the combinations not held out, from hashes of `(seed, i)`, so there is nothing to memorise
beyond the attributes: positions, sizes and colours jitter, and the background is noise.

Rendering is vectorised numpy over a batch of examples (masks on a pixel grid) and randomness is counter-based
(a hash of seed, split, index), so there is no per-example generator to build. On one core at 32x32:
~31k images/s through `shapes_batch` (256 at a time), ~11k/s one at a time through `shapes_example`, ~12k/s
at 64x64.

Axis letters: N examples, S image side.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Split = Literal["train", "test", "gallery"]

# Shape colours in RGB. Chosen far apart (each pair differs by >= ~100 in some channel) so that colour jitter and
# background noise never blur one into another, and bright enough to stand out from the dark background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (165, 60, 215),
    "white": (240, 240, 240),
    "orange": (250, 140, 20),
    "cyan": (40, 215, 225),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# Shape "radius" as a fraction of the image side. small/large differ by ~1.7x, far beyond the size jitter.
SIZES: dict[str, float] = {"small": 0.095, "medium": 0.13, "large": 0.165}
# (name, caption phrase, row, column) of the 3x3 grid cells.
POSITIONS: tuple[tuple[str, str, int, int], ...] = (
    ("top left", "at the top left", 0, 0),
    ("top", "at the top", 0, 1),
    ("top right", "at the top right", 0, 2),
    ("left", "on the left", 1, 0),
    ("center", "in the center", 1, 1),
    ("right", "on the right", 1, 2),
    ("bottom left", "at the bottom left", 2, 0),
    ("bottom", "at the bottom", 2, 1),
    ("bottom right", "at the bottom right", 2, 2),
)
# Grid cell centres as fractions of the side: inset from 1/6, 5/6 so a large shape is not cut by the border.
_GRID = (0.22, 0.5, 0.78)
TRAIN_SIZE = 2**40  # "infinite": far more than any run reads, small enough for the loader's index arithmetic
_TRAIN, _TEST, _GALLERY = 0, 1, 2  # seed words that keep the splits' random streams apart


@dataclass(frozen=True)
class ShapesSpec:
    """What the generated dataset contains. Hashable, so derived tables are cached per spec.

    image_size: side S of the square images. seed: decides the held-out pairs and every example.
    holdout_fraction: share of (colour, shape) pairs held out of training (rounded, at least one if > 0).
    colours / shapes / sizes: names from COLOURS, SHAPES, SIZES. The defaults give 6 x 4 x 2 x 9 = 432 full
    combinations, of which 6 pairs x 18 = 108 are held out.
    position_jitter: max shift of the shape centre from its cell centre, as a fraction of S.
    size_jitter: max relative change of the shape size. colour_jitter: max change per RGB channel.
    noise: standard deviation of the per-pixel background/shape noise, in 0..255 units.
    """

    image_size: int = 32
    seed: int = 0
    holdout_fraction: float = 0.25
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    sizes: tuple[str, ...] = ("small", "large")
    position_jitter: float = 0.04
    size_jitter: float = 0.08
    colour_jitter: int = 20
    noise: float = 6.0

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"ShapesSpec.image_size must be an int >= 16, got {self.image_size!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"ShapesSpec.holdout_fraction must be in [0, 1), got {self.holdout_fraction!r}")
        for field, names, known in (
            ("colours", self.colours, COLOURS),
            ("shapes", self.shapes, SHAPES),
            ("sizes", self.sizes, SIZES),
        ):
            unknown = [n for n in names if n not in known]
            if unknown or len(set(names)) != len(names) or not names:
                raise ValueError(f"ShapesSpec.{field} must be distinct names from {', '.join(known)}; got {names!r}")
        if len(self.colours) < 2 or len(self.shapes) < 2:
            raise ValueError("ShapesSpec needs at least 2 colours and 2 shapes to hold out a (colour, shape) pair")


@dataclass(frozen=True)
class _Tables:
    """Per-spec lookup tables, computed once (see `_tables`)."""

    held_out_pairs: tuple[tuple[int, int], ...]  # (colour index, shape index)
    train_pairs: np.ndarray  # int [P, 2]
    test_combos: np.ndarray  # int [T, 4]: colour, shape, size, position indices
    gallery_combos: np.ndarray  # int [G, 4]: every combination of a trained pair
    palette: np.ndarray  # float32 [C, 3]
    radius: np.ndarray  # float32 [Z] as a fraction of S
    shape_codes: np.ndarray  # int [K]: index into SHAPES of the spec's shape k
    noise_bank: np.ndarray  # float32 [F, 2S, 2S, 3] standard normal fields that backgrounds are cropped from


@functools.lru_cache(maxsize=16)
def _tables(spec: ShapesSpec) -> _Tables:
    nc, ns = len(spec.colours), len(spec.shapes)
    held = _choose_held_out(nc, ns, spec.holdout_fraction, spec.seed)
    train_pairs = np.array([(c, s) for c in range(nc) for s in range(ns) if (c, s) not in held], dtype=np.int64)
    test_combos = np.array(
        [(c, s, z, p) for c, s in sorted(held) for z in range(len(spec.sizes)) for p in range(len(POSITIONS))],
        dtype=np.int64,
    ).reshape(-1, 4)
    gallery_combos = np.array(
        [(c, s, z, p) for c, s in train_pairs.tolist() for z in range(len(spec.sizes)) for p in range(len(POSITIONS))],
        dtype=np.int64,
    ).reshape(-1, 4)
    return _Tables(
        held_out_pairs=tuple(sorted(held)),
        train_pairs=train_pairs,
        test_combos=test_combos,
        gallery_combos=gallery_combos,
        palette=np.array([COLOURS[c] for c in spec.colours], dtype=np.float32),
        radius=np.array([SIZES[z] for z in spec.sizes], dtype=np.float32),
        shape_codes=np.array([SHAPES.index(s) for s in spec.shapes], dtype=np.int64),
        noise_bank=spec.noise
        * np.random.default_rng([spec.seed, 3]).standard_normal(
            (16, 2 * spec.image_size, 2 * spec.image_size, 3), dtype=np.float32
        ),
    )


def _choose_held_out(nc: int, ns: int, fraction: float, seed: int) -> set[tuple[int, int]]:
    """A seeded set of round(fraction * nc * ns) (colour, shape) pairs, spread evenly over colours and shapes.

    Spreading (no colour or shape held out more than ceil(k / nc), ceil(k / ns) times) keeps every colour and
    every shape in training with most of its partners; a plain random subset could hold out all of a colour's
    shapes, and then "composition" would need a colour never seen at all.
    """
    k = round(fraction * nc * ns)
    if fraction > 0:
        k = max(k, 1)
    if k == 0:
        return set()
    cap_c, cap_s = math.ceil(k / nc), math.ceil(k / ns)
    if cap_c >= ns or cap_s >= nc:
        raise ValueError(
            f"ShapesSpec.holdout_fraction={fraction} holds out {k} of {nc * ns} (colour, shape) pairs: too many to "
            "keep every colour and shape in training; lower it"
        )
    rng = np.random.default_rng([seed, 2])
    pairs = [(c, s) for c in range(nc) for s in range(ns)]
    for _ in range(1000):  # greedy fill in a random order; a dead end (rare) just retries with a new order
        chosen: set[tuple[int, int]] = set()
        per_c, per_s = [0] * nc, [0] * ns
        for i in rng.permutation(len(pairs)):
            c, s = pairs[i]
            if per_c[c] < cap_c and per_s[s] < cap_s:
                chosen.add((c, s))
                per_c[c] += 1
                per_s[s] += 1
                if len(chosen) == k:
                    return chosen
    raise ValueError(f"could not spread {k} held-out pairs over {nc} colours and {ns} shapes; lower holdout_fraction")


def held_out_pairs(spec: ShapesSpec) -> list[tuple[str, str]]:
    """The (colour, shape) pairs that never appear in training."""
    return [(spec.colours[c], spec.shapes[s]) for c, s in _tables(spec).held_out_pairs]


def held_out_combinations(spec: ShapesSpec) -> list[dict[str, str]]:
    """The full attribute combinations of the test split, in its order: test example i has combination i."""
    return [_attributes(spec, *row) for row in _tables(spec).test_combos.tolist()]


def caption(colour: str, shape: str, size: str, position: str) -> str:
    """The caption of one attribute combination, e.g. "a small red circle at the top left"."""
    phrase = next(p[1] for p in POSITIONS if p[0] == position)
    return f"a {size} {colour} {shape} {phrase}"


def all_captions(spec: ShapesSpec) -> list[str]:
    """Every caption the spec can produce (train and test), e.g. to train a caption tokenizer.

    Using the held-out captions too leaks nothing: they are made of the same words, and the tokenizer never
    merges across spaces, so no token encodes a held-out pairing.
    """
    return [caption(c, s, z, p[0]) for c in spec.colours for s in spec.shapes for z in spec.sizes for p in POSITIONS]


def split_size(spec: ShapesSpec, split: Split) -> int:
    """Number of examples of a split: TRAIN_SIZE for train, one per held-out combination for test, one per trained
    combination for gallery (fresh renderings that serve as retrieval distractors beside the test split)."""
    if split == "train":
        return TRAIN_SIZE
    if split == "test":
        return len(_tables(spec).test_combos)
    if split == "gallery":
        return len(_tables(spec).gallery_combos)
    raise ValueError(f"shapes split must be 'train', 'test' or 'gallery', got {split!r}")


def shapes_example(spec: ShapesSpec, split: Split, index: int) -> dict[str, Any]:
    """Example `index` of `split`: image uint8 [S, S, 3], caption str, attributes {colour, shape, size, position}."""
    return shapes_batch(spec, split, [index])[0]


def shapes_batch(spec: ShapesSpec, split: Split, indices: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
    """`shapes_example` of each index, rendered together (much faster than one at a time)."""
    tables = _tables(spec)
    n = split_size(spec, split)
    index = np.asarray(indices, dtype=np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= n):
        bad = index[(index < 0) | (index >= n)][0]
        raise IndexError(f"shapes {split} index {bad} out of range [0, {n})")
    # Counter-based randomness: draw j of example i is a hash of (seed, split, i, j), so an example is the same
    # whatever else is rendered with it (random access, exact resume) and all draws are one vectorised call.
    stream = {"train": _TRAIN, "test": _TEST, "gallery": _GALLERY}[split]
    u = hash_uniform(spec.seed, stream, index, 12)  # [N, 12] in [0, 1)
    if split == "train":
        pair = tables.train_pairs[(u[:, 0] * len(tables.train_pairs)).astype(np.int64)]
        size = (u[:, 1] * len(spec.sizes)).astype(np.int64)
        position = (u[:, 2] * len(POSITIONS)).astype(np.int64)
        combos = np.concatenate([pair, size[:, None], position[:, None]], axis=1)
    else:
        combos = (tables.test_combos if split == "test" else tables.gallery_combos)[index]
    jitter = (u[:, 3:10] * 2 - 1).astype(np.float32)  # dx, dy, size scale, colour r g b, background grey
    tint = (u[:, 10:11] * 2 - 1).astype(np.float32) * 6
    images = _render(spec, tables, combos, jitter, tint, _noise(tables, u[:, 11], spec.image_size))
    out = []
    for row, values in enumerate(combos.tolist()):
        attributes = _attributes(spec, *values)
        out.append(dict(image=images[row], caption=caption(**attributes), attributes=attributes))
    return out


def _noise(tables: _Tables, u: np.ndarray, s: int) -> np.ndarray:
    """Noise float32 [N, S, S, 3]: crops of the spec's noise bank at offsets drawn from `u` [N].

    Drawing fresh normals per example would cost more than rendering; crops of a few fixed fields at random
    offsets vary enough that the background cannot be memorised.
    """
    fields, side = tables.noise_bank.shape[0], tables.noise_bank.shape[1] - s
    k = np.minimum((u * fields * side * side).astype(np.int64), fields * side * side - 1)
    field, offset = np.divmod(k, side * side)
    oy, ox = np.divmod(offset, side)
    out = np.empty((len(u), s, s, 3), dtype=np.float32)
    for row, (f, y, x) in enumerate(zip(field.tolist(), oy.tolist(), ox.tolist(), strict=True)):
        out[row] = tables.noise_bank[f, y : y + s, x : x + s]  # slice copies: ~20x faster than a fancy-index gather
    return out


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of uint64 `x`, elementwise: a bijective hash whose outputs look independent."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arrays wrap on overflow, as intended
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(seed: int, stream: int, index: np.ndarray, count: int) -> np.ndarray:
    """Uniform float64 [N, count] in [0, 1): draw j for index i is a hash of (seed, stream, i, j)."""
    base = splitmix64(np.array([(seed * 0x100000001B3 + stream) % 2**64], dtype=np.uint64))
    counter = np.asarray(index, dtype=np.uint64)[:, None] * np.uint64(count) + np.arange(count, dtype=np.uint64)
    bits = splitmix64(splitmix64(base ^ (counter * _GOLDEN)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _attributes(spec: ShapesSpec, c: int, sh: int, z: int, p: int) -> dict[str, str]:
    return dict(colour=spec.colours[c], shape=spec.shapes[sh], size=spec.sizes[z], position=POSITIONS[p][0])


def _render(
    spec: ShapesSpec, tables: _Tables, combos: np.ndarray, jitter: np.ndarray, tint: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """Images uint8 [N, S, S, 3] of the combinations `combos` [N, 4] with the per-example random draws."""
    s = spec.image_size
    rows = np.array([POSITIONS[p][2] for p in combos[:, 3]])
    cols = np.array([POSITIONS[p][3] for p in combos[:, 3]])
    grid = np.asarray(_GRID, dtype=np.float32) * s
    cx = grid[cols] + jitter[:, 0] * spec.position_jitter * s  # [N]
    cy = grid[rows] + jitter[:, 1] * spec.position_jitter * s
    r = tables.radius[combos[:, 2]] * s * (1 + jitter[:, 2] * spec.size_jitter)
    centres = np.arange(s, dtype=np.float32) + 0.5  # pixel centres
    dx = centres[None, None, :] - cx[:, None, None]  # [N, 1, S], broadcasting against dy [N, S, 1]
    dy = centres[None, :, None] - cy[:, None, None]
    r = r[:, None, None]
    mask = np.zeros((len(combos), s, s), dtype=bool)
    codes = tables.shape_codes[combos[:, 1]]
    for code in np.unique(codes):
        sel = codes == code
        mask[sel] = _SHAPE_MASKS[SHAPES[code]](dx[sel], dy[sel], r[sel])
    colour = tables.palette[combos[:, 0]] + jitter[:, 3:6] * spec.colour_jitter  # [N, 3]
    background = 25 + jitter[:, 6:7] * 15 + tint * np.array([1.0, 0.0, -1.0], dtype=np.float32)  # [N, 3]
    image = np.where(mask[..., None], colour[:, None, None, :], background[:, None, None, :])
    image += noise  # the bank is pre-scaled by spec.noise
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _circle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return dx * dx + dy * dy <= r * r


def _square(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    half = 0.85 * r  # about the circle's area, so size does not hint at the shape
    return np.maximum(np.abs(dx), np.abs(dy)) <= half


def _triangle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Upward equilateral triangle of circumradius R, shifted down by R/4 so its bounding box is centred.
    big = 1.3 * r
    y = dy + big / 4
    return (y <= big / 2) & (math.sqrt(3) * np.abs(dx) - y <= big)


def _cross(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    arm, width = 1.1 * r, 0.38 * r
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= width) & (ay <= arm)) | ((ay <= width) & (ax <= arm))


def _diamond(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.abs(dx) + np.abs(dy) <= 1.2 * r


_SHAPE_MASKS = {"circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross, "diamond": _diamond}


class ShapesSource:
    """A split of the shapes dataset as a random-access data source (grain's protocol: `__len__`, `__getitem__`).

    Records have the same form as the file sources': image (here already pixels, uint8 [S, S, 3]), caption, key
    ("train/17"), error ("" - a generated image is never bad). `__getitems__` renders a batch at once.
    """

    def __init__(self, spec: ShapesSpec, split: Split) -> None:
        self.spec = spec
        self.split = split
        self._len = split_size(spec, split)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        examples = shapes_batch(self.spec, self.split, indices)
        return [
            dict(image=e["image"], caption=e["caption"], key=f"{self.split}/{int(i)}", error="")
            for i, e in zip(indices, examples, strict=True)
        ]

    def captions(self) -> list[str]:
        """Captions to train a tokenizer on: all the spec can produce (`all_captions`)."""
        return all_captions(self.spec)

    def __repr__(self) -> str:
        return f"ShapesSource({self.spec!r}, split={self.split!r}, len={self._len})"


def shapes_source(spec: ShapesSpec, split: Split) -> ShapesSource:
    """The `split` of the shapes dataset as a data source for `make_train_loader` / `make_eval_batches`."""
    return ShapesSource(spec, split)
