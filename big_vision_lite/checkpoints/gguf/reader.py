"""Reading GGUF files: the header check, the tensor reader, and a fast reader of the metadata section alone.

`read_gguf_metadata` reads only the metadata section (a struct walk over a memory map): well under a second for
Gemma 3's 262k-token vocabulary, where `gguf.GGUFReader` takes over ten seconds because it also maps every tensor.
`open_reader` gives the `gguf.GGUFReader` the converter needs for the tensors, with every failure to read named.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Container
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_GGUF_MAGIC = b"GGUF"
# The tokenizer's string arrays: the only ones decoded (others become their length).
STRING_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
_SKIPPED_ARRAYS = ("tokenizer.ggml.scores",)  # Gemma's merge order ignores the scores


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted: not GGUF, truncated, or holding something we cannot map."""


def check_gguf_magic(gguf_path: Path) -> None:
    """Raises GGUFConversionError unless the file starts with the GGUF magic (FileNotFoundError if missing)."""
    size = gguf_path.stat().st_size  # raises FileNotFoundError for a missing file, which says it all
    with gguf_path.open("rb") as f:
        magic = f.read(len(_GGUF_MAGIC))
    if size == 0:
        raise GGUFConversionError(f"{gguf_path}: file is empty, not a GGUF file")
    if len(magic) < len(_GGUF_MAGIC) and _GGUF_MAGIC.startswith(magic):
        raise GGUFConversionError(f"{gguf_path}: truncated GGUF file ({size} bytes, cut inside the magic)")
    if magic != _GGUF_MAGIC:
        raise GGUFConversionError(f"{gguf_path}: not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")


def open_reader(gguf_path: Path) -> gguf.GGUFReader:
    check_gguf_magic(gguf_path)
    size = gguf_path.stat().st_size
    try:
        # GGUFReader maps the file and reshapes views of it for every field and tensor, so a short file
        # (cut anywhere, down to the last tensor's last byte) fails here, with a bare numpy message.
        return gguf.GGUFReader(gguf_path)
    except (ValueError, IndexError, KeyError) as e:
        raise GGUFConversionError(f"{gguf_path}: truncated or corrupt GGUF file ({size} bytes): {e}") from e


_MISSING = object()


def metadata_value(reader: gguf.GGUFReader, key: str, gguf_path: Path, default: Any = _MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFConversionError(f"{gguf_path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


# GGUF metadata value types: fixed-size scalars by struct format, plus 8 (string) and 9 (array).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)


def read_gguf_metadata(gguf_path: str | Path, skip_arrays: Container[str] = _SKIPPED_ARRAYS) -> dict[str, Any]:
    """All metadata key -> value of a GGUF file, without touching its tensors.

    String arrays are decoded only for the tokenizer's tokens and merges (others become their length), and the
    arrays named in `skip_arrays` are skipped likewise. Raises GGUFConversionError (a ValueError) naming the
    file for anything that is not a complete GGUF metadata section.
    """
    gguf_path = Path(gguf_path)
    check_gguf_magic(gguf_path)
    with gguf_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        try:
            return _read_metadata(blob, skip_arrays)
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFConversionError(
                f"{gguf_path}: truncated or corrupt GGUF metadata ({len(blob)} bytes): {e}"
            ) from e


def _read_metadata(blob: mmap.mmap, skip_arrays: Container[str]) -> dict[str, Any]:
    version, _, count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported; supported: {list(_GGUF_VERSIONS)}")
    pos = 24
    metadata = {}
    for _ in range(count):
        key, pos = _read_string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        decode = key in STRING_ARRAYS or key not in skip_arrays
        metadata[key], pos = _read_value(blob, pos + 4, value_type, decode, key in STRING_ARRAYS)
    return metadata


def _read_value(blob: mmap.mmap, pos: int, value_type: int, decode: bool, strings: bool) -> tuple[Any, int]:
    if value_type in _SCALAR_FORMATS:
        fmt = "<" + _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(blob, pos)
    if value_type != _ARRAY:
        raise ValueError(f"unknown GGUF metadata value type {value_type}")
    item_type, n = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if item_type in _SCALAR_FORMATS:
        dtype = np.dtype("<" + _SCALAR_FORMATS[item_type])
        end = pos + n * dtype.itemsize
        if end > len(blob):
            raise ValueError(f"array of {n} items runs past the end of the file")
        values = np.frombuffer(blob, dtype, n, pos).tolist() if decode else n
        return values, end
    if item_type == _STRING and not strings:
        for _ in range(n):  # variable length: walk it without decoding
            (length,) = struct.unpack_from("<Q", blob, pos)
            pos += 8 + length
        if pos > len(blob):
            raise ValueError(f"string array of {n} items runs past the end of the file")
        return n, pos
    values = []
    for _ in range(n):
        value, pos = _read_value(blob, pos, item_type, decode, strings)
        values.append(value)
    return values, pos


def _read_string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise ValueError(f"string of {length} bytes runs past the end of the file")
    return blob[pos + 8 : end].decode("utf-8"), end
