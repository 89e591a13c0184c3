"""Image-caption data on disk as random-access data sources (grain's protocol: `__len__` and `__getitem__`).

Two layouts:

* A captions file and a folder of images: JSONL (`{"image": "relative/path.png", "caption": "..."}` per line) or
  CSV (columns `image`, `caption`, more allowed). Image paths are relative to the captions file's folder (or
  `image_root`); absolute paths are used as they are.
* webdataset-style tar shards: members `KEY.jpg|jpeg|png|webp` and `KEY.txt` (the caption) or `KEY.json` with a
  `caption` field. Each shard is indexed once when the source is built (member offsets and sizes), so reading an
  example is one `pread`, in any order, from any process.

A record is raw: `dict(image=bytes | None, caption=str, key=str, error=str)`. Decoding is the pipeline's job, in
its worker processes. Bad metadata (a missing captions file, a JSONL line that does not parse, a missing column,
a tar member that is not valid JSON) raises ValueError naming the file and line, column or member, when the
source is built. A missing or unreadable *image* does not: its record has `image=None` (or bytes that fail to
decode later) and `error` says why, and the pipeline skips and counts it.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from big_vision_lite.utils.inputs import read_text_file

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("image", "caption")


def _record(image: bytes | None, caption: str, key: str, error: str = "") -> dict[str, Any]:
    return dict(image=image, caption=caption, key=key, error=error)


class CaptionFileSource:
    """Images in a folder, captions in a JSONL or CSV file (see the module docstring). Parsed eagerly."""

    def __init__(self, captions_file: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None):
        path = Path(captions_file)
        if not path.is_file():
            raise ValueError(f"{path}: no such captions file")
        self.captions_file = path
        self.image_root = Path(image_root) if image_root is not None else path.parent
        if not self.image_root.is_dir():
            raise ValueError(f"{self.image_root}: image folder does not exist (for captions file {path})")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            entries = _parse_jsonl(path)
        elif suffix == ".csv":
            entries = _parse_csv(path)
        else:
            raise ValueError(f"{path}: captions file must be .jsonl or .csv, got {suffix or 'no suffix'!r}")
        self._images = [e[0] for e in entries]
        self._captions = [e[1] for e in entries]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, caption = self._images[index], self._captions[index]
        try:
            data = (self.image_root / name).read_bytes()
        except OSError as e:  # missing or unreadable: the pipeline skips it, the run goes on
            return _record(None, caption, name, f"{self.image_root / name}: {e.strerror or e}")
        return _record(data, caption, name)

    def captions(self) -> list[str]:
        """All captions, in order (e.g. to train a caption tokenizer)."""
        return list(self._captions)

    def __repr__(self) -> str:
        return f"CaptionFileSource({str(self.captions_file)!r}, image_root={str(self.image_root)!r}, len={len(self)})"


def _parse_jsonl(path: Path) -> list[tuple[str, str]]:
    entries = []
    for lineno, line in enumerate(read_text_file(path, "captions file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        entries.append(_entry(row, f"{path}:{lineno}"))
    return entries


def _parse_csv(path: Path) -> list[tuple[str, str]]:
    entries = []
    with io.StringIO(read_text_file(path, "captions file"), newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in CAPTION_FIELDS if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: missing column {', '.join(map(repr, missing))} (header has {', '.join(map(repr, columns))}); "
                f"expected columns {', '.join(CAPTION_FIELDS)}"
            )
        try:
            for row in reader:
                entries.append(_entry(row, f"{path}:{reader.line_num}"))
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: not valid CSV: {e}") from e
    return entries


def _entry(row: dict[str, Any], where: str) -> tuple[str, str]:
    """(image path, caption) of one row, or ValueError naming `where` (file:line) and the field."""
    values = []
    for field in CAPTION_FIELDS:
        if row.get(field) is None:
            raise ValueError(f"{where}: missing field {field!r}")
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}")
        values.append(row[field])
    if not values[0]:
        raise ValueError(f"{where}: field 'image' is empty")
    return values[0], values[1]


class TarShardSource:
    """webdataset-style tar shards (see the module docstring), indexed once; random access by `pread`.

    Open file descriptors are per process and never pickled: a grain worker opens its own on first read.
    """

    def __init__(self, shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]):
        paths = _shard_paths(shards)
        self.shards = paths
        shard_ids, offsets, sizes, self._keys, self._captions = [], [], [], [], []
        for shard_id, path in enumerate(paths):
            for key, offset, size, caption in _index_shard(path):
                shard_ids.append(shard_id)
                offsets.append(offset)
                sizes.append(size)
                self._keys.append(key)
                self._captions.append(caption)
        # numpy arrays: 8-byte entries instead of Python ints, for shards with millions of members.
        self._shard = np.asarray(shard_ids, dtype=np.int32)
        self._offset = np.asarray(offsets, dtype=np.int64)
        self._size = np.asarray(sizes, dtype=np.int64)  # -1: no image member
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, size = int(self._shard[index]), int(self._size[index])
        key, caption = self._keys[index], self._captions[index]
        name = f"{self.shards[shard]}:{key}"
        if size < 0:
            return _record(None, caption, name, f"{name}: no image member ({'|'.join(IMAGE_EXTENSIONS)})")
        try:
            data = os.pread(self._fd(shard), size, int(self._offset[index]))
        except OSError as e:
            return _record(None, caption, name, f"{name}: {e.strerror or e}")
        if len(data) != size:
            return _record(None, caption, name, f"{name}: shard truncated (read {len(data)} of {size} bytes)")
        return _record(data, caption, name)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors share its file offsets; pread needs none,
            self._fds, self._pid = {}, os.getpid()  # but reopen anyway so closing here cannot touch the parent's
        if shard not in self._fds:
            self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return self._fds[shard]

    def captions(self) -> list[str]:
        """All captions, in order (e.g. to train a caption tokenizer)."""
        return list(self._captions)

    def close(self) -> None:
        """Closes this process's open shard files (they reopen on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown os may already be gone
            self.close()

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.shards)} shards, len={len(self)})"


def _shard_paths(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Shard files of a folder (its *.tar), a glob pattern, one file, or a list of files."""
    if isinstance(shards, str | os.PathLike):
        text = os.fspath(shards)
        if Path(text).is_dir():
            paths = sorted(Path(text).glob("*.tar"))
            if not paths:
                raise ValueError(f"{text}: folder has no *.tar shards")
        elif glob.has_magic(text):
            paths = [Path(p) for p in sorted(glob.glob(text))]
            if not paths:
                raise ValueError(f"{text}: no tar shards match")
        else:
            paths = [Path(text)]
    else:
        paths = [Path(p) for p in shards]
        if not paths:
            raise ValueError("no tar shards given")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{p}: no such tar shard")
    return paths


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the extension is everything after the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _index_shard(path: Path) -> list[tuple[str, int, int, str]]:
    """(key, image offset, image size or -1, caption) of each sample in a shard, in member order."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only; a compressed shard has no random access
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_member(member.name)
                sample = samples.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS and "offset" not in sample:
                    sample["offset"], sample["size"] = member.offset_data, member.size
                elif ext in ("txt", "json"):
                    handle = tar.extractfile(member)
                    sample[ext] = (member.name, handle.read() if handle else b"")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable uncompressed tar shard: {e}") from e
    out = []
    for key, sample in samples.items():
        caption = _shard_caption(path, key, sample)
        if caption is None:
            if "offset" in sample:
                raise ValueError(f"{path}: sample {key!r} has an image but no caption (expected {key}.txt or .json)")
            continue  # neither image nor caption (e.g. only a .cls member): not an image-text sample
        out.append((key, sample.get("offset", 0), sample.get("size", -1), caption))
    return out


def _shard_caption(path: Path, key: str, sample: dict[str, Any]) -> str | None:
    if "txt" in sample:
        name, data = sample["txt"]
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{name}: caption is not UTF-8: {e}") from e
    if "json" in sample:
        name, data = sample["json"]
        try:
            value = json.loads(data)
        except ValueError as e:
            raise ValueError(f"{path}:{name}: not valid JSON: {e}") from e
        if not isinstance(value, dict) or not isinstance(value.get("caption"), str):
            raise ValueError(f"{path}:{name}: expected a JSON object with a string field 'caption'")
        return value["caption"]
    return None


def folder_source(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> CaptionFileSource:
    """Images and captions: a .jsonl/.csv captions file, or a folder holding exactly one (see `open_source`)."""
    source = open_source(path, image_root)
    if not isinstance(source, CaptionFileSource):
        raise ValueError(f"{path}: expected a .jsonl/.csv captions file or a folder with one, found tar shards")
    return source


def tar_source(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> TarShardSource:
    """webdataset-style tar shards: a folder of *.tar, a glob pattern, one shard, or a list of shards."""
    return TarShardSource(shards)


def open_source(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
) -> CaptionFileSource | TarShardSource:
    """The data source at `path`: a .jsonl/.csv captions file, a .tar shard or a glob of them, or a folder holding
    *.tar shards or exactly one .jsonl/.csv captions file (images relative to it)."""
    text = os.fspath(path)
    p = Path(text)
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return TarShardSource(p)
        return CaptionFileSource(p, image_root)
    if p.is_dir():
        if any(p.glob("*.tar")):
            return TarShardSource(p)
        candidates = sorted([*p.glob("*.jsonl"), *p.glob("*.csv")])
        if len(candidates) == 1:
            return CaptionFileSource(candidates[0], image_root)
        if not candidates:
            raise ValueError(f"{p}: folder has no *.tar shards and no .jsonl/.csv captions file")
        raise ValueError(
            f"{p}: folder has several captions files ({', '.join(c.name for c in candidates)}); pass one of them"
        )
    if glob.has_magic(text):
        return TarShardSource(text)
    raise ValueError(f"{p}: no such file or folder")
