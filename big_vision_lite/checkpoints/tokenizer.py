"""Text <-> token ids for the models this project runs, with the ids transformers' tokenizers give.

`load_tokenizer` accepts a packaged model name, a `.gguf` file or a Hugging Face model folder:

* HF folder: `tokenizer.json` through the Rust `tokenizers` library (preferred), else `tokenizer.model` through
  `sentencepiece`. Special tokens and whether a BOS is added come from `tokenizer_config.json`,
  `special_tokens_map.json`, `config.json` and `generation_config.json`, where present.
* GGUF file: the tokenizer is built from the file's metadata (`checkpoints.gguf.tokenizer`, the same
  tokenizer transformers builds for it) and cached as an HF tokenizer folder under
  `cache_dir()/tokenizers`, rebuilt when the file or the converter changes. For Gemma 3 (262k tokens) the first
  load, building, takes about 2 s and later ones, parsing the cached `tokenizer.json`, about 1 s; transformers
  needs 14-20 s to build it from the GGUF file.
* Packaged model name: its converted HF folder when that is already current (the conversion writes the
  tokenizer files too), else its GGUF file as above, which does not need the weights converted first.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import tokenizers

from big_vision_lite.checkpoints.gguf.convert import CONVERTER_VERSION, is_conversion_current
from big_vision_lite.checkpoints.gguf.reader import read_gguf_metadata
from big_vision_lite.checkpoints.gguf.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    build_gguf_tokenizer,
    has_tokenizer,
    special_tokens_template,
    write_tokenizer_files,
)
from big_vision_lite.checkpoints.packaged import (
    PACKAGED_MODELS,
    converted_folder,
    is_packaged_name,
    packaged_gguf_path,
)
from big_vision_lite.utils.atomic import atomic_folder
from big_vision_lite.utils.paths import cache_dir

SENTENCEPIECE_FILE = "tokenizer.model"
# The files an HF folder (or a run's tokenizer/) keeps its tokenizer in: what a copy of the tokenizer takes.
TOKENIZER_FILES = (TOKENIZER_FILE, SENTENCEPIECE_FILE, "tokenizer_config.json", "special_tokens_map.json")
_CACHE_MARKER = "bvl_tokenizer.json"


class TokenizerLoadError(ValueError):
    """No tokenizer can be loaded from the given name or path."""


class _Backend(Protocol):
    def encode_batch(self, texts: list[str], add_special: bool) -> list[list[int]]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    @property
    def vocab_size(self) -> int: ...


class Tokenizer:
    """A model's tokenizer: `encode`/`decode` plus the special ids generation needs.

    Build it with `load_tokenizer`. The ids are those of transformers' tokenizer for the same files:
    `encode(text)` equals `AutoTokenizer.from_pretrained(...)(text).input_ids`. `source` is the folder the
    tokenizer files were read from.
    """

    def __init__(
        self, backend: _Backend, *, bos_id: int | None, eos_ids: Sequence[int], pad_id: int | None, source: Path
    ) -> None:
        self._backend = backend
        self._bos_id = bos_id
        self._eos_ids = tuple(eos_ids)
        self._pad_id = pad_id
        self.source = source

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`.

        `add_bos`: add the special tokens the model's tokenizer puts around a text (transformers'
        `add_special_tokens`): BOS for Gemma, nothing for SmolLM2, whose tokenizer adds none. False: only the text's.
        """
        return self.encode_batch([text], add_bos)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True) -> list[list[int]]:
        """`encode` of every text."""
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be str, got {', '.join(sorted(set(bad)))}")
        return self._backend.encode_batch(texts, add_bos)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens (BOS, EOS, control tokens) are left out unless `skip_special_tokens`
        is False. `decode(encode(text)) == text` for text without special-token markup."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, None if the tokenizer has none."""
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the EOS token, then any further ones the model's generation config lists."""
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token; the EOS id when the tokenizer names no pad token (None if neither)."""
        if self._pad_id is not None:
            return self._pad_id
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.vocab_size

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry spelled as the tokenizer stores it, None if absent."""
        return self._backend.token_to_id(token)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={str(self.source)!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, pad_id={self.pad_id})"
        )


def has_tokenizer_files(folder: str | os.PathLike[str]) -> bool:
    """Whether an HF folder holds tokenizer files `load_tokenizer` reads."""
    return any((Path(folder) / name).is_file() for name in (TOKENIZER_FILE, SENTENCEPIECE_FILE))


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a packaged model name, a `.gguf` file, or an HF folder (`tokenizer.json` or `tokenizer.model`).

    Raises TokenizerLoadError (a ValueError) for a missing path, a folder without tokenizer files or a file that is
    not GGUF, and GGUFConversionError (also a ValueError) for a GGUF file whose tokenizer cannot be built.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise TokenizerLoadError(
                f"{path}: expected a .gguf file or a folder with {TOKENIZER_FILE} or {SENTENCEPIECE_FILE}"
            )
        return _load_gguf(path)
    name = str(name_or_path)
    if is_packaged_name(name):
        gguf_path = packaged_gguf_path(name)
        converted = converted_folder(name)
        if is_conversion_current(converted, gguf_path) and (converted / TOKENIZER_FILE).is_file():
            return _load_folder(converted)
        return _load_gguf(gguf_path)
    raise TokenizerLoadError(
        f"{name!r}: no such file or folder, and not a packaged model name (packaged: "
        f"{', '.join(sorted(PACKAGED_MODELS))}); expected a packaged model name, a .gguf file or a folder with "
        f"{TOKENIZER_FILE} or {SENTENCEPIECE_FILE}"
    )


def _load_gguf(gguf_path: Path) -> Tokenizer:
    """The tokenizer a GGUF file describes, from its cached build if current, else built (and cached) now."""
    source = gguf_path.resolve()
    stat = source.stat()
    marker = {
        "converter_version": CONVERTER_VERSION,
        "source_path": str(source),
        "source_size": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
    }
    folder = cache_dir() / "tokenizers" / f"{source.stem}-{hashlib.sha256(str(source).encode()).hexdigest()[:16]}"
    try:
        current = json.loads((folder / _CACHE_MARKER).read_text()) == marker
    except (OSError, ValueError):
        current = False
    if current and (folder / TOKENIZER_FILE).is_file():
        return _load_folder(folder)

    metadata = read_gguf_metadata(source)
    if not has_tokenizer(metadata):
        raise TokenizerLoadError(
            f"{source}: GGUF file holds no tokenizer; expected tokenizer.ggml.model and tokenizer.ggml.tokens metadata"
        )
    built, config = build_gguf_tokenizer(metadata, source)
    try:
        with atomic_folder(folder) as tmp_dir:
            write_tokenizer_files(built, config, tmp_dir)
            (tmp_dir / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except OSError as e:  # a read-only cache costs speed, not correctness
        warnings.warn(f"could not cache the tokenizer of {source} in {folder}: {e}", stacklevel=3)
        return _from_files(source, built, config, None)
    return _from_files(folder, built, config, folder)


def _load_folder(folder: Path) -> Tokenizer:
    """The tokenizer of an HF model folder."""
    config = _read_json(folder / TOKENIZER_CONFIG_FILE)
    if (folder / TOKENIZER_FILE).is_file():
        try:
            rust = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise TokenizerLoadError(f"{folder / TOKENIZER_FILE}: not a valid tokenizers file: {e}") from e
        return _from_files(folder, rust, config, folder)
    if (folder / SENTENCEPIECE_FILE).is_file():
        return _from_files(folder, None, config, folder)
    raise TokenizerLoadError(
        f"{folder}: no {TOKENIZER_FILE} or {SENTENCEPIECE_FILE}; expected an HF model folder with one of them"
    )


def _from_files(
    source: Path, rust: tokenizers.Tokenizer | None, config: dict[str, Any], folder: Path | None
) -> Tokenizer:
    """A Tokenizer from `rust` (None: `source/tokenizer.model`), `config` (tokenizer_config.json) and the other
    config files of `folder` (None: there are none)."""

    def read(name: str) -> dict[str, Any]:
        return _read_json(folder / name) if folder is not None else {}

    special_map, model_config = read("special_tokens_map.json"), read("config.json")
    generation_config = read("generation_config.json")

    def token(name: str) -> str | None:
        value = config.get(name, special_map.get(name))
        return value.get("content") if isinstance(value, dict) else value

    bos, eos, pad = token("bos_token"), token("eos_token"), token("pad_token")
    if rust is not None:
        backend: _Backend = _RustBackend(rust)
        # Like transformers: flags stated in tokenizer_config.json decide which special tokens frame a text.
        if "add_bos_token" in config or "add_eos_token" in config:
            rust.post_processor = special_tokens_template(
                rust,
                bos if config.get("add_bos_token") and rust.token_to_id(bos or "") is not None else None,
                eos if config.get("add_eos_token") and rust.token_to_id(eos or "") is not None else None,
            )
    else:
        backend = _SentencePieceBackend(source / SENTENCEPIECE_FILE, bos=bos, eos=eos, config=config)

    def token_id(name: str, value: str | None) -> int | None:
        if value is not None and backend.token_to_id(value) is not None:
            return backend.token_to_id(value)
        found = model_config.get(f"{name}_token_id")
        if isinstance(found, list):
            found = found[0] if found else None
        return found if isinstance(found, int) else None

    if isinstance(backend, _SentencePieceBackend):  # the named tokens, else the model's own special ids
        bos_id, eos_id = backend.bos_id, backend.eos_id
    else:
        bos_id, eos_id = token_id("bos", bos), token_id("eos", eos)
    listed = generation_config.get("eos_token_id", model_config.get("eos_token_id"))
    listed = listed if isinstance(listed, list) else [listed]
    eos_ids = [i for i in dict.fromkeys([eos_id, *listed]) if isinstance(i, int)]
    return Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids, pad_id=token_id("pad", pad), source=source)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerLoadError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


class _RustBackend:
    """A `tokenizers` tokenizer (tokenizer.json)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._tokenizer = tokenizer

    def encode_batch(self, texts: list[str], add_special: bool) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=add_special)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A SentencePiece model (tokenizer.model), framed by BOS/EOS as tokenizer_config.json says."""

    def __init__(self, path: Path, *, bos: str | None, eos: str | None, config: dict[str, Any]) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise TokenizerLoadError(f"{path}: reading it needs sentencepiece (pip install sentencepiece)") from e
        try:
            self._model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerLoadError(f"{path}: not a valid SentencePiece model: {e}") from e
        named_bos = self.token_to_id(bos) if bos is not None else None
        named_eos = self.token_to_id(eos) if eos is not None else None
        self.bos_id = named_bos if bos is not None else _id_or_none(self._model.bos_id())
        self.eos_id = named_eos if eos is not None else _id_or_none(self._model.eos_id())
        # transformers adds neither unless tokenizer_config.json asks for it.
        self._prefix = [self.bos_id] if config.get("add_bos_token") and self.bos_id is not None else []
        self._suffix = [self.eos_id] if config.get("add_eos_token") and self.eos_id is not None else []

    def encode_batch(self, texts: list[str], add_special: bool) -> list[list[int]]:
        pieces = self._model.encode(texts)
        return [[*self._prefix, *ids, *self._suffix] if add_special else ids for ids in pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Control and unknown pieces are special; sentencepiece drops the former and writes " ⁇ " for the latter.
        special = [self._model.is_control(i) or self._model.is_unknown(i) for i in ids]
        if skip_special_tokens:
            return self._model.decode([i for i, s in zip(ids, special, strict=True) if not s])
        parts, run = [], []
        for i, s in zip(ids, special, strict=True):
            if s:
                parts += [self._model.decode(run), self._model.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self._model.decode(run)])

    def token_to_id(self, token: str) -> int | None:
        index = self._model.piece_to_id(token)
        return index if self._model.id_to_piece(index) == token else None

    @property
    def vocab_size(self) -> int:
        return self._model.get_piece_size()


def _id_or_none(index: int) -> int | None:
    return index if index >= 0 else None
