"""Build a Hugging Face `tokenizers` tokenizer from the tokenizer metadata of a llama.cpp GGUF file.

A GGUF file carries no `tokenizer.json`: it stores the vocabulary, token types, merges and special token ids as
`tokenizer.ggml.*` metadata. `build_gguf_tokenizer` turns that metadata into the `tokenizers.Tokenizer` (and the
`tokenizer_config.json` entries) that transformers builds for the same file with
`AutoTokenizer.from_pretrained(dir, gguf_file=name)`, so both give the same ids; `write_tokenizer_files` saves
them as a tokenizer any HF loader reads. Two vocabulary kinds are supported:

* `tokenizer.ggml.model == "llama"` (SentencePiece) in Gemma files: a byte-fallback BPE whose merges are
  recovered from the vocabulary, Gemma's merge order being the order of the tokens in the file.
* `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges, split first by the regex that
  `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from big_vision_lite.checkpoints.gguf.reader import GGUFConversionError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_CONTROL = 3
_USER_DEFINED = 4

# Architectures whose SentencePiece ("llama") vocabulary is built the Gemma way; the only SentencePiece files
# transformers builds with GemmaTokenizer, and the only ones we can match it on.
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_SPIECE_UNDERLINE = "\u2581"

# The split regex of Llama 3's tokenizer (tiktoken's cl100k pattern), applied before byte-level encoding.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the split regex applied before byte-level encoding; None: GPT-2's own regex, built into
# the ByteLevel pre-tokenizer. For "smollm" (and "default") transformers uses GPT-2's regex, which is what we
# match; llama.cpp itself isolates every digit first for "smollm", which differs from it on whitespace runs that
# end in a digit ("a  1": GPT-2's regex splits "  1" as " " + " 1", llama.cpp as "  " + "1").
_BYTE_LEVEL_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt-2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
}
SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")



class UnsupportedTokenizerError(GGUFConversionError):
    """The GGUF file describes a tokenizer (`tokenizer.ggml.model` / `.pre`) we cannot build."""


def has_tokenizer(metadata: Mapping[str, Any]) -> bool:
    """Whether the metadata describes a tokenizer at all (weights-only GGUF files have none)."""
    return "tokenizer.ggml.model" in metadata


def build_gguf_tokenizer(metadata: Mapping[str, Any], gguf_path: str | Path) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, tokenizer_config.json entries) for the tokenizer this GGUF metadata describes.

    `metadata` maps GGUF keys to values, as `read_gguf_metadata` returns them. Raises
    `UnsupportedTokenizerError` (a ValueError) naming `gguf_path` for a tokenizer kind we do not build.
    """
    gguf_path = Path(gguf_path)
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise UnsupportedTokenizerError(f"{gguf_path}: GGUF file holds no tokenizer (no tokenizer.ggml.model/tokens)")
    token_types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    if len(token_types) != len(tokens):
        raise GGUFConversionError(
            f"{gguf_path}: {len(tokens)} tokens but {len(token_types)} token types in the GGUF tokenizer metadata"
        )
    architecture = metadata.get("general.architecture")
    if kind == "llama" and architecture in _GEMMA_ARCHITECTURES:
        tokenizer, vocab_tokens, tokenizer_class = _gemma_tokenizer(tokens, metadata), tokens, "GemmaTokenizer"
    elif kind == "gpt2":
        tokenizer, vocab_tokens, tokenizer_class = _byte_level_tokenizer(tokens, metadata, gguf_path)
    else:
        what = f"SentencePiece ('llama') for architecture {architecture!r}" if kind == "llama" else repr(kind)
        raise UnsupportedTokenizerError(
            f"{gguf_path}: GGUF tokenizer.ggml.model {what} is not supported; expected 'gpt2' (byte-level BPE) or "
            f"'llama' (SentencePiece) in a {'/'.join(_GEMMA_ARCHITECTURES)} file"
        )
    _add_special_tokens(tokenizer, vocab_tokens, token_types, byte_level=kind == "gpt2")

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise, and transformers follows.
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
    }
    # Named special tokens that are not control tokens are still special to transformers.
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    named = [config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config[k] is not None]
    missing = list(dict.fromkeys(t for t in named if t not in added))
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in missing])
    config["add_bos_token"] &= config["bos_token"] is not None
    config["add_eos_token"] &= config["eos_token"] is not None
    tokenizer.post_processor = special_tokens_template(
        tokenizer, config["bos_token"] if config["add_bos_token"] else None,
        config["eos_token"] if config["add_eos_token"] else None,
    )
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def special_tokens_template(tokenizer: Tokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """The post-processor that puts `bos` before and `eos` after every sequence (None: nothing there)."""
    single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
    pair = " ".join(p for p in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
    special = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t is not None)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def write_tokenizer_files(tokenizer: Tokenizer, config: Mapping[str, Any], out_dir: str | Path) -> None:
    """Save `tokenizer.json` and `tokenizer_config.json` into `out_dir` (an existing folder)."""
    out_dir = Path(out_dir)
    # Compact JSON: Gemma 3's file is 14 MB instead of 33 MB, and parses faster.
    tokenizer.save(str(out_dir / TOKENIZER_FILE), pretty=False)
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, ensure_ascii=False) + "\n")


def _gemma_tokenizer(tokens: list[str], metadata: Mapping[str, Any]) -> Tokenizer:
    # Gemma files store the tokens of 2+ spaces with real spaces; the model looks them up as "▁▁...".
    spelled = [_SPIECE_UNDERLINE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    model = BPE(
        vocab=vocab,
        merges=_merges_in_vocab_order(vocab),
        unk_token=spelled[unk_id] if unk_id is not None and 0 <= unk_id < len(spelled) else None,
        fuse_unk=True,
        byte_fallback=True,
        dropout=None,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", _SPIECE_UNDERLINE)
    # Inert after the normalizer (no spaces are left), but part of Gemma's reference tokenizer.json.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tokenizer


def _merges_in_vocab_order(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, ranked by the merged token's position, longest left part first.

    SentencePiece BPE files list no merges: a token was made by joining two smaller ones, so each token's
    possible splits are its merges. Gemma's vocabulary is ordered by merge priority (its scores are not).
    """
    merges = []
    for token in sorted(vocab, key=vocab.__getitem__):
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def _byte_level_tokenizer(
    tokens: list[str], metadata: Mapping[str, Any], gguf_path: Path
) -> tuple[Tokenizer, list[str], str]:
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_SPLITS:
        raise UnsupportedTokenizerError(
            f"{gguf_path}: GGUF byte-level tokenizer.ggml.pre {pre!r} is not supported; "
            f"supported: {sorted(_BYTE_LEVEL_SPLITS)}"
        )
    if "tokenizer.ggml.merges" not in metadata:
        raise GGUFConversionError(f"{gguf_path}: GGUF byte-level (gpt2) tokenizer has no tokenizer.ggml.merges")
    alphabet = _byte_alphabet()
    symbols = set(alphabet)
    # Vocabulary entries are spelled in the byte alphabet; respell any that a writer left as plain text.
    spelled = [t if set(t) <= symbols else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    merges = []
    for merge in metadata["tokenizer.ggml.merges"]:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFConversionError(f"{gguf_path}: GGUF merge {merge!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    model = BPE(
        vocab={t: i for i, t in enumerate(spelled)},
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    split = _BYTE_LEVEL_SPLITS[pre]
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet was never a real token (llama.cpp mislabels some).
    usable = [t if set(t) <= symbols else None for t in tokens]
    return tokenizer, usable, "TokenizersBackend"


def _add_special_tokens(
    tokenizer: Tokenizer, tokens: list[str | None], token_types: list[int], *, byte_level: bool
) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, both matched whole."""
    control = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _CONTROL and t is not None]
    if control:
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tokenizer.get_vocab()
    user = [t for t, kind in zip(tokens, token_types, strict=True) if kind == _USER_DEFINED and t in vocab]
    if user:
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the rest
    (controls, space, DEL, NBSP, soft hyphen) map in order to characters from U+0100 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]
