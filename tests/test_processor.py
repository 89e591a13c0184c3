"""The PaliGemma processor against transformers' `PaliGemmaProcessor`, built here from the same tokenizer files.

Reference: transformers' processor over an HF tokenizer loaded from the folder our `load_tokenizer` reads (the
packaged models' tokenizers built from their GGUF metadata, shown equal to transformers' own GGUF tokenizers in
test_tokenizer.py) and the slow PIL `SiglipImageProcessorPil` (the default `SiglipImageProcessor` needs
torchvision). Images are 28 x 28 with 4 image tokens to keep the batches small.
"""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from big_vision_lite.checkpoints.tokenizer import load_tokenizer
from big_vision_lite.data.processor import EXTRA_TOKENS, PaliGemmaProcessor

SIZE, N = 28, 4
PREFIXES = ["caption en", "detect cat ; dog\n  and   more 12345 Café 日本"]
SUFFIXES = ["a cat", "<loc0001><loc1023><loc0000><loc0512> cat ; <seg127> dog"]


def _hf_processor(folder):
    from transformers import AutoTokenizer
    from transformers import PaliGemmaProcessor as HFPaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    image_processor.image_seq_length = N
    return HFPaliGemmaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def pair(packaged_cache):
    """name -> (our processor, transformers' processor) of a packaged model's tokenizer, built once."""
    built = {}

    def get(name):
        if name not in built:
            # The session's packaged cache: its GGUF and tokenizer builds are shared with the other test files.
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("BVL_CACHE_DIR", str(packaged_cache))
                tokenizer = load_tokenizer(name)
            built[name] = (PaliGemmaProcessor(tokenizer, image_size=SIZE), _hf_processor(tokenizer.source))
        return built[name]

    return get


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8))]


def _hf_call(hf, images, prefixes, suffixes=None, padding_side="right"):
    out = hf(images=images, text=prefixes, suffix=suffixes, padding="longest", padding_side=padding_side,
             return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def _assert_same(ours, theirs):
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_array_equal(ours["token_type_ids"], theirs["token_type_ids"])
    np.testing.assert_array_equal(ours["input_mask"], theirs["attention_mask"] == 1)
    np.testing.assert_array_equal(ours["pixel_values"], theirs["pixel_values"].transpose(0, 2, 3, 1))


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_training_batch_matches_transformers(pair, name):
    ours, hf = pair(name)
    batch = ours(_images(), PREFIXES, SUFFIXES)
    theirs = _hf_call(hf, _images(), PREFIXES, SUFFIXES)
    _assert_same(batch, theirs)
    np.testing.assert_array_equal(batch["loss_mask"], theirs["labels"] != -100)
    assert batch["input_ids"].dtype == np.int32 and batch["pixel_values"].dtype == np.float32
    assert batch["pixel_values"].shape == (2, SIZE, SIZE, 3)
    assert not batch["truncated"].any()


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_generation_prompts_match_transformers(pair, name):
    ours, hf = pair(name)
    batch = ours(_images(), PREFIXES, padding_side="left")
    _assert_same(batch, _hf_call(hf, _images(), PREFIXES, padding_side="left"))
    assert batch["input_mask"][:, -1].all()  # every row's last prompt token is in the last column
    assert not batch["loss_mask"].any() and not batch["mask_ar"].any()
    # The same prompts right-padded also match, and differ only in where the padding sits.
    right = ours(_images(), PREFIXES)
    _assert_same(right, _hf_call(hf, _images(), PREFIXES))
    for row in range(2):
        np.testing.assert_array_equal(batch["input_ids"][row][batch["input_mask"][row]],
                                      right["input_ids"][row][right["input_mask"][row]])


def test_added_token_ids_and_vocab_size(pair):
    ours, hf = pair("gemma3-270m")
    # Gemma 3's tokenizer has none of them: they follow its 262144 ids in transformers' order.
    assert ours.image_token_id == hf.image_token_id == 262_144
    assert ours.added_tokens["<loc0000>"] == 262_145 and ours.added_tokens["<seg127>"] == 263_296
    assert ours.vocab_size == len(hf.tokenizer) == 263_297
    assert hf.tokenizer.convert_tokens_to_ids(list(ours.added_tokens)) == list(ours.added_tokens.values())


def test_tokens_the_tokenizer_already_has_keep_their_ids(tmp_path):
    # A word-level tokenizer that already knows "<image>" and one location token.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "cat", "<loc0005>", "<image>", "\n", "on"]
    rust = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    rust.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    rust.save(str(tmp_path / "tokenizer.json"))
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(specials))

    ours = PaliGemmaProcessor(tmp_path, image_size=SIZE)
    hf = _hf_processor(tmp_path)
    assert hf.tokenizer.__class__ is PreTrainedTokenizerFast
    assert ours.image_token_id == hf.image_token_id == 7
    assert ours.added_tokens["<loc0005>"] == 6
    assert ours.added_tokens["<loc0000>"] == 10 and ours.added_tokens["<loc0006>"] == 15
    assert ours.vocab_size == len(hf.tokenizer) == 10 + len(EXTRA_TOKENS) - 1
    # Without spaces around them, added tokens are still cut out of the text before the words.
    prefixes, suffixes = ["a cat", "cat<loc0005>on a"], ["<loc0005>a<loc0007> on", "cat"]
    batch = ours(_images(), prefixes, suffixes)
    _assert_same(batch, _hf_call(hf, _images(), prefixes, suffixes))
    assert batch["input_ids"][1, N + 1:N + 5].tolist() == [5, 6, 9, 4]  # the "\n" is whitespace here


def _mode_zoo():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (23, 37, 1), dtype=np.uint8)], axis=2)
    transparent = base.quantize(16)
    transparent.info["transparency"] = 3
    zoo = {mode: base.convert(mode) for mode in ["1", "L", "P", "I", "F", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"]}
    zoo |= {
        "LA": Image.fromarray(rgba[:, :, [0, 3]]),
        "RGBA": Image.fromarray(rgba),
        "PA": Image.fromarray(rgba).convert("PA"),
        "P with transparency": transparent,
        "I;16": Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257),
        "RGB larger": Image.fromarray(rng.integers(0, 256, (90, 61, 3), dtype=np.uint8)),
        "RGB smaller": Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)),
        "RGB same size": Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),
        "array RGB": rgb,
        "array RGBA": rgba,
        "array gray [H, W, 1]": rgb[:, :, :1].copy(),
    }
    return zoo


def test_image_modes_match_transformers(pair):
    ours, hf = pair("gemma3-270m")
    zoo = _mode_zoo()
    theirs = hf.image_processor(list(zoo.values()), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    pixels = ours.process_images(list(zoo.values()))
    for k, mode in enumerate(zoo):
        np.testing.assert_array_equal(pixels[k], theirs[k], err_msg=mode)
    assert pixels.min() >= -1 and pixels.max() <= 1


def test_arrays_of_other_dtypes_give_the_pixels_of_their_uint8_levels(pair):
    ours, _ = pair("gemma3-270m")
    u8 = np.random.default_rng(2).integers(0, 256, (17, 30, 3), dtype=np.uint8)
    reference = ours.process_images([u8])
    # u8 / 255 in float32 is not always on the level after * 255 (transformers truncates it and loses one).
    for other in [u8 / 255, (u8 / 255).astype(np.float32), (u8 / 255).astype(np.float16), u8.astype(np.int64)]:
        np.testing.assert_array_equal(ours.process_images([other]), reference, err_msg=str(other.dtype))
    gray = u8[:, :, 0]
    np.testing.assert_array_equal(ours.process_images(gray), ours.process_images([gray[:, :, None]]))
    np.testing.assert_array_equal(ours.process_images(np.stack([u8, u8])), np.concatenate([reference, reference]))


@pytest.mark.parametrize(("bad", "problem"), [
    (np.zeros((2, 8, 8, 3), np.uint8), r"expected shape \[H, W\] or \[H, W, C\].*4 dims"),
    (np.zeros((8, 8, 2), np.uint8), r"2 channels in shape \(8, 8, 2\)"),
    (np.zeros((3, 8, 8), np.uint8), r"8 channels in shape \(3, 8, 8\).*channels last"),
    (np.zeros((0, 8, 3), np.uint8), r"empty image, shape \(0, 8, 3\)"),
    (Image.new("RGB", (0, 5)), r"empty image, size 0x5"),
    (np.full((8, 8, 3), 1.5, np.float32), r"float pixels must lie in \[0, 1\], found values in \[1.5, 1.5\]"),
    (np.full((8, 8, 3), -0.25), r"float pixels must lie in \[0, 1\], found values in \[-0.25, -0.25\]"),
    (np.full((8, 8, 3), np.nan), r"float pixels must lie in \[0, 1\], found NaN or inf"),
    (np.full((8, 8, 3), 300, np.int32), r"int32 pixels must lie in \[0, 255\], found values in \[300, 300\]"),
    (np.zeros((8, 8, 3), bool), r"unsupported dtype bool"),
    (np.zeros((8, 8, 3), np.complex64), r"unsupported dtype complex64"),
    (np.full((8, 8, 3), "x"), r"unsupported dtype <U1"),
    ([[0, 1], [2, 3]], r"expected a PIL image or a numpy array, got list"),
])
def test_bad_images_are_refused_naming_index_and_problem(pair, bad, problem):
    ours, _ = pair("gemma3-270m")
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=rf"^image 1: {problem}"):
        ours([good, bad], ["a", "b"])


def test_layout_and_masks(pair):
    ours, _ = pair("gemma3-270m")
    tok = ours.tokenizer
    batch = ours.tokenize(["what is this?", "q"], ["a red square", "yes"])
    for row, (prefix, suffix) in enumerate([("what is this?", "a red square"), ("q", "yes")]):
        prompt = [ours.image_token_id] * N + [tok.bos_id, *tok.encode(prefix + "\n", add_bos=False)]
        target = [*tok.encode(suffix, add_bos=False), tok.eos_ids[0]]
        n = len(prompt) + len(target)
        ids = batch["input_ids"][row]
        assert ids[:n].tolist() == prompt + target and (ids[n:] == 0).all() and ours.pad_id == 0
        assert batch["input_mask"][row].tolist() == [True] * n + [False] * (len(ids) - n)
        expected_suffix = [False] * len(prompt) + [True] * len(target) + [False] * (len(ids) - n)
        assert batch["loss_mask"][row].tolist() == expected_suffix
        as_int = [int(x) for x in expected_suffix]
        assert batch["mask_ar"][row].tolist() == batch["token_type_ids"][row].tolist() == as_int
    assert batch["input_mask"][0].all()  # the longer example sets T


def test_max_len_cuts_only_the_suffix(pair):
    ours, _ = pair("gemma3-270m")
    full = ours.tokenize(["q", "q"], ["one two three four five six", "ok"])
    prompt_len = int((full["input_mask"][0] & ~full["loss_mask"][0]).sum())
    max_len = prompt_len + 3
    with pytest.warns(UserWarning, match=r"1 of 2 suffixes cut to fit max_len .* \(examples \[0\]\)"):
        batch = ours.tokenize(["q", "q"], ["one two three four five six", "ok"], max_len=max_len)
    assert batch["input_ids"].shape == (2, max_len)
    assert batch["truncated"].tolist() == [True, False]
    np.testing.assert_array_equal(batch["input_ids"][0], full["input_ids"][0, :max_len])  # EOS cut with the end
    assert batch["loss_mask"][0].sum() == 3 and ours.eos_id not in batch["input_ids"][0]
    np.testing.assert_array_equal(batch["input_ids"][1], full["input_ids"][1, :max_len])
    # A prompt that fills max_len exactly keeps no suffix at all; one that does not fit is an error.
    with pytest.warns(UserWarning):
        assert not ours.tokenize(["q"], ["ok"], max_len=prompt_len)["loss_mask"].any()
    with pytest.raises(ValueError, match=rf"^example 1: image tokens \+ BOS \+ prefix take \d+ tokens, more than "
                                         rf"max_len {prompt_len}"):
        ours.tokenize(["q", "a much longer question"], ["ok", "ok"], max_len=prompt_len)
    # Fixed-width generation prompts: left padding up to max_len, and the same error when too long.
    left = ours.tokenize(["q"], max_len=prompt_len + 5, padding_side="left")
    assert left["input_mask"][0].tolist() == [False] * 5 + [True] * prompt_len
    with pytest.raises(ValueError, match=r"^example 0: .* more than max_len 3"):
        ours.tokenize(["q"], max_len=3, padding_side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut: no warning
        ours.tokenize(["q"], ["ok"], max_len=prompt_len + 2)


def test_bad_texts_are_refused(pair):
    ours, _ = pair("gemma3-270m")
    with pytest.raises(ValueError, match="padding_side='left' is for generation prompts"):
        ours.tokenize(["q"], ["a"], padding_side="left")
    with pytest.raises(ValueError, match=r"^prefix 1 contains the image token '<image>'"):
        ours.tokenize(["q", "<image> q"])
    with pytest.raises(ValueError, match="got 2 prefixes and 1 suffixes"):
        ours.tokenize(["q", "r"], ["a"])
    with pytest.raises(TypeError, match="suffix 0: expected str, got int"):
        ours.tokenize(["q"], [3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="got 1 images for 2 texts"):
        ours(_images()[:1], ["q", "r"])
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 14"):
        PaliGemmaProcessor(ours.tokenizer, image_size=30)


def test_decode_stops_at_eos_and_keeps_location_tokens(pair):
    ours, hf = pair("gemma3-270m")
    answer = ours.tokenize(["q"], ["<loc0100><loc0200><loc0300><loc0400> a cat ; <seg005>"])
    suffix = answer["input_ids"][0][answer["loss_mask"][0]].tolist()
    generated = [*suffix, 236746, 5866, ours.pad_id]  # past EOS: ignored
    text = ours.decode(generated)
    assert text == "<loc0100><loc0200><loc0300><loc0400> a cat ; <seg005>"
    assert text == hf.tokenizer.decode(suffix, skip_special_tokens=True)
    prompt = answer["input_ids"][0][:N + 3].tolist()
    assert ours.decode(prompt) == hf.tokenizer.decode(prompt, skip_special_tokens=True)
    kept = ours.decode(prompt, skip_special_tokens=False)
    assert kept == hf.tokenizer.decode(prompt, skip_special_tokens=False) and kept.startswith("<image>" * N + "<bos>")
    assert ours.batch_decode(np.array([generated, generated[::-1]]))[0] == text
