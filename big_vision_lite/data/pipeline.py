"""Batches of (image, caption tokens) from any data source, through grain, optionally in worker processes.

A training batch is a pure function of `(source, seed, step)`: step k holds the examples at positions
`k*B ... k*B + B-1` of an endless stream that visits the source once per epoch in a seeded random order (a new
order each epoch). Hence `start_step=k` yields exactly the batches a fresh run yields from step k on, without
replaying anything, and the number of worker processes does not change the batches. The "data position" a
checkpoint needs is the step.

Batch (numpy): `image` float32 [B, S, S, 3] in [-1, 1] (RGB, resized to S x S with PIL bicubic), `text` int32
[B, L] (`text.tokenize_fixed`: ids, EOS, pad), `skipped` int32 [] (images found unreadable while building this
batch). Eval batches add `mask` bool [B] (False: padding or an unreadable image), `index` int64 [B] (the
example's index in the source, -1 for padding) and `caption` str [B] ("" for padding), e.g. to match duplicate
captions in retrieval. With `tokenizer=None`, `text` is left out and training batches carry `caption` too, for
callers that tokenize themselves (e.g. PaliGemma prefix/suffix).

Several processes (a multi-process run): each builds only its rows `rows = (lo, hi)` of every global batch, i.e.
positions `k*B + lo ... k*B + hi - 1` of the same stream, so the processes together hold exactly the batch one
process would build, whatever their number (the same examples, the same replacements of unreadable images).

Unreadable images (missing file, bytes that do not decode): the run never stops for one. In a training batch
each is replaced by another example drawn from the source by a seeded hash of (step, slot) - redrawing until
one decodes - so the batch keeps its shape and stays a function of the step; in an eval batch its row is masked.
Either way the batch's `skipped` counts it and carries up to a few "key: reason" lines; `Loader` (the iterator
returned here) sums `skipped` over the batches it hands out (`skipped_total`) and keeps the first reasons
(`skipped_report()`). The count travels inside the batch, so it works the same from worker processes, whose
state the main process never sees. A bad image is counted once per epoch it is met in.

Axis letters: B batch, S image side, L text length.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import grain.python as grain
import numpy as np
from absl import flags
from PIL import Image, ImageOps

from big_vision_lite.checkpoints.tokenizer import Tokenizer
from big_vision_lite.data.shapes import hash_uniform, splitmix64
from big_vision_lite.data.text import tokenize_fixed

Batch = dict[str, np.ndarray]
_MAX_STEPS = 2**40  # the train stream's end: "never" for a run, small enough that step * B fits in int64
_REPLACEMENT_TRIES = 64  # unreadable draws in a row before a batch gives up: the data must be mostly broken
_REPORTED_PER_BATCH = 4  # "key: reason" lines a batch carries; the count is always exact
_REPLACE_STREAM = 7  # hash stream of replacement draws, apart from any other use of hash_uniform


class DataSource(Protocol):
    """What the pipeline reads: grain's random-access protocol, records as in `sources.py`."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, Any]: ...


class Loader(Iterator[Batch]):
    """An iterator of batches that sums the `skipped` counts of the batches it has handed out.

    `skipped_total`: unreadable images met so far (in the batches consumed, not those prefetched). `num_batches`:
    how many batches it yields in all (None: endless). Call `close()` (or use `with`) to stop worker processes.
    """

    def __init__(self, dataset: grain.IterDataset, num_batches: int | None) -> None:
        self._dataset = dataset
        self._iterator: Any = None
        self.num_batches = num_batches
        self.skipped_total = 0
        self._reasons: list[str] = []
        self._closed = False

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Batch:
        if self._closed:  # restarting silently would replay the stream from its first step
            raise StopIteration
        if self._iterator is None:  # started lazily: building the loader does not yet spawn workers
            self._iterator = iter(self._dataset)
        # Arrays from worker processes arrive in shared memory blocks, freed when the array is garbage collected;
        # a plain copy (cheap next to building the batch) leaves no block alive however long a caller keeps it.
        batch = {
            k: np.array(v) if isinstance(v, np.ndarray) and type(v) is not np.ndarray else v
            for k, v in next(self._iterator).items()
        }
        reasons = batch.pop("_skipped_reasons")
        self.skipped_total += int(batch["skipped"])
        self._reasons.extend(reasons[: max(0, 20 - len(self._reasons))])
        return batch

    @property
    def skipped(self) -> int:
        """Alias of `skipped_total`."""
        return self.skipped_total

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless training loader has no length")
        return self.num_batches

    def skipped_report(self) -> str:
        """One line for the end of a run: how many images were skipped and why (the first few), or ""."""
        if not self.skipped_total:
            return ""
        shown = "; ".join(self._reasons[:3])
        return f"skipped {self.skipped_total} unreadable image(s), e.g. {shown}"

    def close(self) -> None:
        """Stops the worker processes, if any (grain would on garbage collection, but not promptly)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None
        self._closed = True

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_image(data: bytes | np.ndarray, image_size: int) -> np.ndarray:
    """RGB pixels uint8 [S, S, 3] of encoded image bytes (any format PIL reads) or of a uint8 [H, W, 3] array.

    The image is squashed to S x S (no crop, as big_vision's SigLIP preprocessing), bicubic. Raises whatever the
    decoder raises for bad bytes; the batch builder catches it.
    """
    if isinstance(data, np.ndarray):
        if data.shape == (image_size, image_size, 3) and data.dtype == np.uint8:
            return data
        image = Image.fromarray(np.asarray(data, dtype=np.uint8))
    else:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale >= S; far faster for photos
        image = ImageOps.exif_transpose(image)  # camera photos store rotation in EXIF; apply it as viewers do
    if image.mode != "RGB":
        image = image.convert("RGB")  # greyscale, palette, RGBA (alpha dropped), CMYK
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def permute(positions: np.ndarray, n: int, key: tuple[int, ...]) -> np.ndarray:
    """A seeded bijection of [0, n) applied to `positions` (int [N], values in [0, n)), computed lazily.

    A 4-round Feistel network on the smallest even-bit domain >= n, cycle-walking values that land outside [0, n)
    back in. Unlike `rng.permutation(n)` it needs no O(n) table, so it serves the endless shapes source
    (n = 2**40) and a shard set of any size the same way, in every worker, at no startup cost.
    """
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    round_keys = np.random.SeedSequence(list(key)).generate_state(4, np.uint64)

    def rounds(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for k in round_keys:
            left, right = right, left ^ (splitmix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = rounds(np.asarray(positions, dtype=np.uint64))
    outside = out >= n
    while outside.any():  # each value's cycle returns to [0, n): the walk ends, in < 4 rounds on average
        out[outside] = rounds(out[outside])
        outside = out >= n
    return out.astype(np.int64)


@dataclass(frozen=True)
class _BatchBuilder:
    """Builds batch `step`: the function grain maps over step numbers, pickled into each worker process."""

    source: DataSource
    batch_size: int
    image_size: int
    tokenizer: Tokenizer | None
    max_len: int
    seed: int
    shuffle: bool
    mode: Literal["train", "eval"]
    rows: tuple[int, int] | None = None  # (lo, hi): the rows of each batch this process builds; None: all

    def __call__(self, step: int) -> Batch:
        n, s = len(self.source), self.image_size
        lo, hi = self.rows or (0, self.batch_size)
        b = hi - lo
        positions = step * self.batch_size + np.arange(lo, hi, dtype=np.int64)
        images = np.zeros((b, s, s, 3), dtype=np.uint8)
        captions = [""] * b
        valid = np.ones(b, dtype=bool)
        if self.mode == "train":
            index = positions % n
            if self.shuffle:
                epochs = positions // n
                for epoch in np.unique(epochs).tolist():  # a batch straddles at most a few epochs
                    sel = epochs == epoch
                    index[sel] = permute(index[sel], n, (self.seed, epoch))
        else:
            valid = positions < n
            index = np.where(valid, positions, -1)
        skipped, reasons = 0, []
        records = self._read(index[valid].tolist())
        for slot, record in zip(np.flatnonzero(valid).tolist(), records, strict=True):
            pixels, reason = self._decode(record)
            if pixels is None:
                skipped += 1
                reasons.append(reason)
                if self.mode == "eval":
                    valid[slot] = False
                    continue
                record, pixels = self._replacement(step, lo + slot)
            images[slot], captions[slot] = pixels, record["caption"]
        batch: Batch = {"image": images.astype(np.float32) * np.float32(2 / 255) - np.float32(1)}
        if self.tokenizer is not None:
            batch["text"] = tokenize_fixed(self.tokenizer, captions, self.max_len)
        if self.tokenizer is None or self.mode == "eval":
            batch["caption"] = np.array(captions, dtype=str)
        if self.mode == "eval":
            batch["mask"] = valid
            batch["index"] = np.where(valid, index, -1)
        batch["skipped"] = np.asarray(skipped, dtype=np.int32)
        batch["_skipped_reasons"] = reasons[:_REPORTED_PER_BATCH]  # popped by Loader
        return batch

    def _read(self, indices: list[int]) -> list[dict[str, Any]]:
        many = getattr(self.source, "__getitems__", None)  # e.g. the shapes source renders a batch at once
        return list(many(indices)) if many is not None else [self.source[i] for i in indices]

    def _decode(self, record: dict[str, Any]) -> tuple[np.ndarray | None, str]:
        if record.get("image") is None:
            return None, record.get("error") or f"{record.get('key')}: no image"
        try:
            return decode_image(record["image"], self.image_size), ""
        except Exception as e:  # any failure to decode untrusted bytes means "skip this image"
            return None, f"{record.get('key')}: {type(e).__name__}: {e}"

    def _replacement(self, step: int, slot: int) -> tuple[dict[str, Any], np.ndarray]:
        """A readable example to stand in for the unreadable one at (step, slot of the global batch): seeded draws,
        first good one."""
        n = len(self.source)
        draws = hash_uniform(self.seed, _REPLACE_STREAM, np.array([step * self.batch_size + slot]), _REPLACEMENT_TRIES)
        last = ""
        for u in draws[0].tolist():
            record = self.source[min(int(u * n), n - 1)]
            pixels, last = self._decode(record)
            if pixels is not None:
                return record, pixels
        raise ValueError(
            f"step {step}: {_REPLACEMENT_TRIES} random examples drawn to replace an unreadable image were all "
            f"unreadable too (last: {last}); the data source looks broken"
        )


def make_train_loader(
    source: DataSource,
    *,
    batch_size: int,
    image_size: int,
    tokenizer: Tokenizer | None,
    max_len: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    worker_count: int = 0,
    shuffle: bool = True,
    prefetch: int = 2,
    rows: tuple[int, int] | None = None,
) -> Loader:
    """Endless (or up to step `num_steps`, exclusive) training batches from `start_step` on; see the module
    docstring for the batch format and determinism.

    rows: (lo, hi), build only rows lo..hi-1 of every batch of `batch_size` (this process's share in a
    multi-process run; see `train.distributed.process_rows`); None: the whole batch.

    worker_count: grain worker processes building batches (0: in this process, on `prefetch` > 0 a background
    thread). Workers start on the first `next()`, taking a second or two (grain spawns fresh interpreters, which
    import the pipeline and unpickle the source and tokenizer; a script that uses workers needs the usual
    `if __name__ == "__main__":` guard). prefetch: batches each process builds ahead.
    """
    _check_args(source, batch_size, image_size, max_len, worker_count, prefetch)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    stop = _MAX_STEPS if num_steps is None else num_steps
    if stop < start_step:
        raise ValueError(f"num_steps ({num_steps}) is below start_step ({start_step})")
    if rows is not None and not 0 <= rows[0] < rows[1] <= batch_size:
        raise ValueError(f"rows {rows} must be a non-empty range within the batch of {batch_size}")
    builder = _BatchBuilder(source, batch_size, image_size, tokenizer, max_len, seed, shuffle, "train", rows)
    return _loader(builder, start_step, stop, worker_count, prefetch, None if num_steps is None else stop - start_step)


def make_eval_batches(
    source: DataSource,
    *,
    batch_size: int,
    image_size: int,
    tokenizer: Tokenizer | None,
    max_len: int,
    worker_count: int = 0,
    prefetch: int = 2,
    share: tuple[int, int] | None = None,
) -> Loader:
    """Every example of `source` once, in order, in ceil(N / B) batches of fixed size B.

    The last batch is padded to B (black image, i.e. -1, and the text of an empty caption) and the padding
    masked (`mask` False, `index` -1); unreadable images are masked the same way and counted in `skipped`.
    Fixed shapes mean one compilation of the eval step.

    share: (i, n), only the i-th of n contiguous runs of those batches (process i's share of an evaluation run by
    n processes; the first runs hold one batch more when n does not divide their number); None: all of them.
    """
    _check_args(source, batch_size, image_size, max_len, worker_count, prefetch)
    num_batches = math.ceil(len(source) / batch_size)
    start, stop = 0, num_batches
    if share is not None:
        index, count = share
        if not 0 <= index < count:
            raise ValueError(f"share {share}: index must be in [0, {count - 1}]")
        start, stop = (index * num_batches) // count, ((index + 1) * num_batches) // count
    builder = _BatchBuilder(source, batch_size, image_size, tokenizer, max_len, 0, False, "eval")
    return _loader(builder, start, stop, worker_count, prefetch, stop - start)


def _check_args(
    source: DataSource, batch_size: int, image_size: int, max_len: int, worker_count: int, prefetch: int
) -> None:
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("image_size", image_size, 1),
        ("max_len", max_len, 2),
        ("worker_count", worker_count, 0),
        ("prefetch", prefetch, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if len(source) == 0:
        raise ValueError(f"{source!r}: data source is empty")
    if worker_count > (os.cpu_count() or 1) * 4:
        raise ValueError(f"worker_count={worker_count} is far beyond this machine's {os.cpu_count()} CPUs")


def _loader(
    builder: _BatchBuilder, start: int, stop: int, worker_count: int, prefetch: int, num_batches: int | None
) -> Loader:
    dataset = grain.MapDataset.range(start, stop).map(builder)
    # One reading thread per process: batches are built whole by one call, so more threads would only contend
    # for the GIL; parallelism comes from worker processes.
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    )
    if worker_count:
        # grain's multiprocessing reads absl flags, which raise unless parsed; a program that is not an absl app
        # (ours) never parses them, so mark the defaults as parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1))
        )
    return Loader(iter_dataset, num_batches)
