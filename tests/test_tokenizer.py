"""Tokenizers: ours against transformers' on a corpus of awkward text.

The real packaged models' tokenizers, built from GGUF metadata, must give transformers' ids both for the GGUF
file (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`) and for the converted HF folder. Small tokenizers
trained here (SentencePiece models, byte-level BPE vocabularies written into GGUF files) cover the
`tokenizer.model` path, the other GGUF pre-tokenizers, the cache and the error messages, all without downloads.
"""

import json
import os
import random
from pathlib import Path

import gguf
import pytest

from big_vision_lite.checkpoints.gguf.reader import GGUFConversionError
from big_vision_lite.checkpoints.gguf.tokenizer import UnsupportedTokenizerError
from big_vision_lite.checkpoints.tokenizer import TokenizerLoadError, load_tokenizer

# Plain text: the ids must match and decode(encode(text)) must give the text back.
CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, façade, jalapeño, Ångström, Straße, Ünïcödé",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji: 🤗🚀 👩‍👩‍👧 ✅",
    "12345 3.14159 -0.5e10 1,000,000 2024-06-01",
    "a  1  22   333",
    "multiple     spaces   here",
    "tabs\there\t\tand\t\t\tthere",
    "line one\nline two\n\n\nline five",
    "\n\n\n",
    "   leading spaces",
    " leading space",
    "trailing spaces   ",
    "\r\nwindows\r\nline endings",
    "mixed \t \n whitespace \u00a0 nbsp",
    "def f(x):\n    return x ** 2  # comment\n",
    "<html><body>tags</body></html>",
    "ligature ﬁ, zero\u200bwidth, combining e\u0301",
    "\n\n\n 12345",
]
# Text that spells special tokens: the ids must match; it round-trips only with the special tokens kept.
MARKUP = [
    "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>user\nHi!<|im_end|>\n",
]
PACKAGED = {
    # name: (bos_id, eos_ids, pad_id, vocab_size)
    "gemma3-270m": (2, (1,), 0, 262_144),
    "smollm2-135m": (1, (2,), 2, 49_152),
}


@pytest.fixture(scope="session")
def gguf_tokenizers(tmp_path_factory, converted):
    """name -> (ours from the GGUF file, built into a fresh cache; transformers' for the GGUF file)."""
    from transformers import AutoTokenizer

    cache = tmp_path_factory.mktemp("tokenizer_cache")
    results = {}

    def get(name: str):
        if name not in results:
            gguf_path, _ = converted(name)
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("BVL_CACHE_DIR", str(cache))
                ours = load_tokenizer(str(gguf_path))
            theirs = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            results[name] = ours, theirs
        return results[name]

    return get


def _assert_same_ids(ours, theirs, texts):
    for text in texts:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.encode(text, add_bos=False) == theirs(text, add_special_tokens=False).input_ids, text
    assert ours.encode_batch(texts) == [ours.encode(t) for t in texts]


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_gguf_matches_transformers(name, gguf_tokenizers):
    ours, theirs = gguf_tokenizers(name)
    _assert_same_ids(ours, theirs, CORPUS + MARKUP)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    for text in MARKUP:
        assert ours.decode(ours.encode(text, add_bos=False), skip_special_tokens=False) == text

    bos_id, eos_ids, pad_id, vocab_size = PACKAGED[name]
    assert (ours.bos_id, ours.eos_ids, ours.pad_id, ours.vocab_size) == (bos_id, eos_ids, pad_id, vocab_size)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, len(theirs)) == (
        bos_id, eos_ids[0], pad_id, vocab_size,
    )


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_converted_folder_matches_transformers(name, converted, gguf_tokenizers, packaged_cache, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    _, folder = converted(name)
    from_gguf, _ = gguf_tokenizers(name)
    # The conversion writes the tokenizer the GGUF path builds, byte for byte.
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / file).read_bytes() == (from_gguf.source / file).read_bytes(), file

    ours = load_tokenizer(str(folder))
    theirs = AutoTokenizer.from_pretrained(folder)
    _assert_same_ids(ours, theirs, CORPUS + MARKUP)
    # generate() stops on the config's eos ids; ours are those.
    eos = AutoConfig.from_pretrained(folder).eos_token_id
    assert ours.eos_ids == tuple(eos if isinstance(eos, list) else [eos])
    assert ours.pad_id == theirs.pad_token_id

    # By name, a current conversion is used as is.
    monkeypatch.setenv("BVL_CACHE_DIR", str(packaged_cache))
    assert load_tokenizer(name).source == folder


@pytest.mark.real
def test_packaged_name_without_conversion_builds_from_gguf(tmp_path, monkeypatch, gguf_tokenizers):
    # Without a current conversion, a name needs only the GGUF's metadata, not the weights converted.
    monkeypatch.setenv("BVL_CACHE_DIR", str(tmp_path))
    ours = load_tokenizer("smollm2-135m")
    assert ours.source.parent == tmp_path / "tokenizers"
    assert not (tmp_path / "models").exists()
    from_gguf, _ = gguf_tokenizers("smollm2-135m")
    assert [ours.encode(t) for t in CORPUS] == [from_gguf.encode(t) for t in CORPUS]


# --- tokenizer.model (SentencePiece) -----------------------------------------------------------------------------

_WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tokenizer", "model", "text", "line", "café",
    "naïve", "façade", "Straße", "東京", "日本語", "한국어", "12", "345", "3.14", "hello", "world", "über", "señor",
    "def", "return", "x",
]


def _train_sentencepiece(folder: Path, *, dummy_prefix: bool, config: dict) -> Path:
    """A tiny byte-fallback BPE SentencePiece model (Llama-style with `dummy_prefix`, else Gemma-style)."""
    import sentencepiece

    rng = random.Random(0)
    seps = [" ", " ", " ", "  ", "\n", "\t"]
    lines = ["".join(rng.choice(_WORDS) + rng.choice(seps) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


SPM_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def test_sentencepiece_gemma_style_matches_transformers(tmp_path):
    from transformers import AutoTokenizer, GemmaTokenizer

    config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, **SPM_SPECIALS}
    folder = _train_sentencepiece(tmp_path / "spm", dummy_prefix=False, config=config)
    assert sorted(os.listdir(folder)) == ["tokenizer.model", "tokenizer_config.json"]
    ours = load_tokenizer(str(folder))
    theirs = AutoTokenizer.from_pretrained(folder)
    assert isinstance(theirs, GemmaTokenizer)
    _assert_same_ids(ours, theirs, CORPUS)
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids[0] == ours.bos_id == 1
        assert ours.decode(ids) == text == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode([1, *ours.encode("hi", add_bos=False), 2], skip_special_tokens=False) == "<s>hi</s>"
    assert (ours.bos_id, ours.eos_ids, ours.pad_id, ours.vocab_size) == (1, (2,), 3, 420)


def test_sentencepiece_llama_style_matches_sentencepiece_and_transformers(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer, LlamaTokenizer

    folder = _train_sentencepiece(tmp_path / "spm", dummy_prefix=True, config={"tokenizer_class": "LlamaTokenizer"})
    ours = load_tokenizer(str(folder))
    theirs = AutoTokenizer.from_pretrained(folder)
    assert isinstance(theirs, LlamaTokenizer)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    # transformers' LlamaTokenizer rebuilds the model with a Metaspace pre-tokenizer, which prepends the
    # dummy "▁" only to text that does not start with a space, so it drops a space of leading whitespace.
    # SentencePiece (the reference for a tokenizer.model) always prepends it, and so do we.
    plain = [t for t in CORPUS if not t[:1].isspace()]
    _assert_same_ids(ours, theirs, plain)
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text), text  # no BOS: tokenizer_config.json does not ask
        assert ours.decode(ours.encode(text)) == text


# --- GGUF files written here --------------------------------------------------------------------------------------


def _byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a small byte-level BPE trained here, plus a user-defined token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = [*_WORDS, "don't", "it's", "we'll", "1234"]
    lines = ["".join(rng.choice(words) + rng.choice([" ", "  ", "\n", ""]) for _ in range(20)) for _ in range(500)]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    trained.train_from_iterator(lines, trainer)
    model = json.loads(trained.to_str())["model"]
    tokens = [*sorted(model["vocab"], key=model["vocab"].get), "<think>"]
    types = [3 if t.startswith("<|") else 1 for t in tokens[:-1]] + [4]  # control, normal, user-defined
    return tokens, types, [" ".join(pair) for pair in model["merges"]]


def _write_gguf(path: Path, tokenizer: dict | None) -> Path:
    """A tensor-less llama GGUF whose metadata describes `tokenizer` (None: no tokenizer at all)."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in dict(embedding_length=8, feed_forward_length=12, block_count=1, context_length=64,
                           vocab_size=600, **{"attention.head_count": 2, "attention.head_count_kv": 1}).items():
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", 10_000.0)
    if tokenizer is not None:
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["types"])
        writer.add_token_merges(tokenizer["merges"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(tokenizer.get("add_bos", False))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def byte_level_vocab():
    return _byte_level_vocab()


@pytest.mark.parametrize(("pre", "add_bos"), [("smollm", False), ("gpt-2", True), ("llama-bpe", True)])
def test_byte_level_gguf_matches_transformers(tmp_path, monkeypatch, byte_level_vocab, pre, add_bos):
    from transformers import AutoTokenizer

    monkeypatch.setenv("BVL_CACHE_DIR", str(tmp_path / "cache"))
    tokens, types, merges = byte_level_vocab
    spec = {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges, "add_bos": add_bos}
    path = _write_gguf(tmp_path / "tiny.gguf", spec)
    ours = load_tokenizer(str(path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    _assert_same_ids(ours, theirs, [*CORPUS, *MARKUP, "<think>x</think>"])
    for text in CORPUS:
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("x")[:1] == ([1] if add_bos else ours.encode("x", add_bos=False))
    assert ours.token_to_id("<think>") == len(tokens) - 1


def test_gguf_cache_reused_then_rebuilt_when_stale(tmp_path, monkeypatch, byte_level_vocab):
    monkeypatch.setenv("BVL_CACHE_DIR", str(tmp_path / "cache"))
    tokens, types, merges = byte_level_vocab
    spec = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "types": types, "merges": merges}
    path = _write_gguf(tmp_path / "tiny.gguf", spec)
    first = load_tokenizer(str(path))
    cached = first.source / "tokenizer.json"
    assert cached.parent.parent == tmp_path / "cache" / "tokenizers"
    stat = cached.stat()
    assert load_tokenizer(str(path)).source == first.source
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    _write_gguf(path, {**spec, "pre": "llama-bpe"})  # the file changes: the cache must follow
    os.utime(path, ns=(stat.st_mtime_ns + 10**9, stat.st_mtime_ns + 10**9))
    second = load_tokenizer(str(path))
    assert cached.stat().st_ino != stat.st_ino
    assert first.encode("1234") == [first.token_to_id("1234")]
    assert len(second.encode("1234")) > 1  # llama-bpe's regex cuts digit runs into threes
    assert not [p for p in os.listdir(cached.parent.parent) if p.startswith(".")]  # no temporary folders left


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_path_or_unknown_name(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerLoadError, match="no such file or folder") as info:
        load_tokenizer(str(missing))
    assert str(missing) in str(info.value) and "gemma3-270m" in str(info.value)
    with pytest.raises(ValueError, match=r"'no-such-model': no such file or folder.*packaged model name"):
        load_tokenizer("no-such-model")


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message


def test_file_that_is_not_gguf(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(TokenizerLoadError, match=r"expected a \.gguf file") as info:
        load_tokenizer(str(text))
    assert str(text) in str(info.value)
    bogus = tmp_path / "model.gguf"
    bogus.write_text('{"this": "is json"}')
    with pytest.raises(GGUFConversionError, match="not a GGUF file") as info:
        load_tokenizer(str(bogus))
    assert str(bogus) in str(info.value)


def test_unsupported_gguf_tokenizer(tmp_path, monkeypatch, byte_level_vocab):
    monkeypatch.setenv("BVL_CACHE_DIR", str(tmp_path / "cache"))
    tokens, types, merges = byte_level_vocab
    spec = {"model": "bert", "pre": "default", "tokens": tokens, "types": types, "merges": merges}
    path = _write_gguf(tmp_path / "bert.gguf", spec)
    with pytest.raises(UnsupportedTokenizerError, match=r"tokenizer\.ggml\.model 'bert' is not supported") as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value) and "expected 'gpt2'" in str(info.value)

    path = _write_gguf(tmp_path / "qwen.gguf", {**spec, "model": "gpt2", "pre": "qwen2"})
    with pytest.raises(UnsupportedTokenizerError, match=r"tokenizer\.ggml\.pre 'qwen2' is not supported") as info:
        load_tokenizer(str(path))
    assert "'smollm'" in str(info.value)  # names the supported ones

    # SentencePiece vocabularies are built the Gemma way only.
    path = _write_gguf(tmp_path / "llama.gguf", {**spec, "model": "llama"})
    with pytest.raises(UnsupportedTokenizerError, match=r"SentencePiece \('llama'\) for architecture 'llama'"):
        load_tokenizer(str(path))
    assert not (tmp_path / "cache" / "tokenizers").exists() or not os.listdir(tmp_path / "cache" / "tokenizers")


def test_gguf_without_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "weights_only.gguf", None)
    with pytest.raises(TokenizerLoadError, match="holds no tokenizer") as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep_fraction", [0.3, 0.9])
def test_truncated_gguf_metadata(tmp_path, byte_level_vocab, keep_fraction):
    tokens, types, merges = byte_level_vocab
    spec = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "types": types, "merges": merges}
    full = _write_gguf(tmp_path / "full.gguf", spec).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[: int(len(full) * keep_fraction)])
    with pytest.raises(GGUFConversionError, match="truncated or corrupt GGUF metadata") as info:
        load_tokenizer(str(cut))
    assert str(cut) in str(info.value)
