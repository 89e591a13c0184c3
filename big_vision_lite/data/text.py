"""Caption tokenizer: a SentencePiece BPE model trained on the captions, and fixed-length token id arrays.

`train_caption_tokenizer` writes `out_dir/tokenizer.model` (SentencePiece) and `out_dir/tokenizer_config.json`
(which names the special tokens), so `checkpoints.tokenizer.load_tokenizer(out_dir)` loads it back with the
same ids. Fixed ids: pad 0, eos 1, bos 2, unk 3 (pad 0 as big_vision's SigLIP text tower expects).

`tokenize_fixed` gives int32 [B, L]: each text's ids (no BOS), then EOS, truncated to L (EOS kept last) and
padded with the pad id. Axis letters: B texts, L max_len.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece

from big_vision_lite.checkpoints.tokenizer import SENTENCEPIECE_FILE, Tokenizer, load_tokenizer
from big_vision_lite.utils.atomic import write_bytes_atomic

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def train_caption_tokenizer(
    captions: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 1000,
    *,
    max_sentences: int = 1_000_000,
) -> Tokenizer:
    """Trains a SentencePiece BPE tokenizer on `captions`, saves it into `out_dir` and returns it loaded from there.

    vocab_size: an upper bound (`hard_vocab_limit=False`): a small corpus gets fewer pieces, e.g. ~200 for the
    shapes captions, where every word becomes one piece. max_sentences: only the first this many captions are
    used (training time grows with the corpus; a million captions is plenty for a caption vocabulary).
    Deterministic: the same captions give the same file, byte for byte. Raises ValueError if there are no
    captions, or if `out_dir` holds a tokenizer.json, which `load_tokenizer` would read instead.
    """
    out = Path(out_dir)
    if (out / "tokenizer.json").exists():
        raise ValueError(f"{out}: already holds tokenizer.json, which load_tokenizer prefers over {SENTENCEPIECE_FILE}")
    texts = []
    for text in captions:
        if not isinstance(text, str):
            raise ValueError(f"captions must be str, got {type(text).__name__}")
        if text.strip():
            texts.append(text)
            if len(texts) >= max_sentences:
                break
    if not texts:
        raise ValueError("no (non-empty) captions to train a tokenizer on")
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(0)  # sampling of large corpora; fixed for byte-identical output
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            num_threads=1,  # multithreaded training may order merges of equal frequency differently
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. a vocab_size below the number of distinct characters
        raise ValueError(f"training a caption tokenizer (vocab_size={vocab_size}) failed: {e}") from e
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / SENTENCEPIECE_FILE, model.getvalue())
    config = {**_SPECIAL, "add_bos_token": False, "add_eos_token": False}
    write_bytes_atomic(out / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return load_tokenizer(out)


def tokenize_fixed(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Token ids int32 [B, L=max_len]: ids of each text without BOS, then EOS, truncated so EOS stays, padded.

    Keeping EOS on truncation (unlike a plain cut) means every row ends in EOS, so a text tower that pools at
    the last real token, or a model that learned "EOS ends the caption", sees the same structure for long texts.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for a token and EOS), got {max_len}")
    if not tokenizer.eos_ids:
        raise ValueError(f"{tokenizer}: has no EOS token; tokenize_fixed appends one")
    eos, pad = tokenizer.eos_ids[0], tokenizer.pad_id
    out = np.full((len(texts), max_len), pad if pad is not None else eos, dtype=np.int32)
    for row, ids in enumerate(tokenizer.encode_batch(list(texts), add_bos=False)):
        ids = [*ids[: max_len - 1], eos]
        out[row, : len(ids)] = ids
    return out
