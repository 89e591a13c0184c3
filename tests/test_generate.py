"""The jitted decode loop (end tokens per row, sampling with explicit keys, input errors) and `bvl generate`."""

import json

import jax
import numpy as np
import pytest

from big_vision_lite.checkpoints import load
from big_vision_lite.checkpoints.tokenizer import load_tokenizer
from big_vision_lite.cli import main
from big_vision_lite.decoding.engine import generate, left_pad
from big_vision_lite.decoding.samplers import SamplerConfig
from big_vision_lite.parity.decoder import parity_batch


def greedy(module, params, tokens, mask, max_new_tokens):
    """Greedy ids with no early stop."""
    return generate(module, params, tokens, mask, max_new_tokens).tokens


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    loaded = load(tiny_checkpoints["gemma3"])
    tokens, mask = parity_batch(loaded.config.vocab_size, 12)
    return loaded.module, loaded.params, tokens, mask


def test_rows_stop_at_their_own_end_token(model):
    module, params, tokens, mask = model
    free = greedy(module, params, tokens, mask, 10)
    end = int(free[0, 2])  # row 0 ends at step 2 at the latest
    result = generate(module, params, tokens, mask, 10, end_ids=[end], pad_id=-1)
    for row in range(2):
        hits = np.flatnonzero(free[row] == end)
        length = hits[0] + 1 if hits.size else 10
        assert result.lengths[row] == length
        np.testing.assert_array_equal(result.tokens[row, :length], free[row, :length])
        assert (result.tokens[row, length:] == -1).all()


def test_sampling_is_reproducible_with_explicit_keys(model):
    module, params, tokens, mask = model
    config = SamplerConfig(temperature=1.5, top_k=20)
    a = generate(module, params, tokens, mask, 12, sampler=config, rng=jax.random.key(1)).tokens
    b = generate(module, params, tokens, mask, 12, sampler=config, rng=jax.random.key(1)).tokens
    c = generate(module, params, tokens, mask, 12, sampler=config, rng=jax.random.key(2)).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy(module, params, tokens, mask, 12)).any()


def test_input_errors(model):
    module, params, tokens, mask = model
    empty = mask.copy()
    empty[1] = False
    with pytest.raises(ValueError, match=r"prompt rows \[1\] are empty"):
        generate(module, params, tokens, empty, 4)
    with pytest.raises(ValueError, match="must be left-padded"):
        generate(module, params, tokens, mask[:, ::-1], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(module, params, tokens, mask, 0)
    with pytest.raises(ValueError, match="needs an explicit PRNG key"):
        generate(module, params, tokens, mask, 4, sampler=SamplerConfig(temperature=1.0))
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        generate(module, params, tokens[0], mask[0], 4)


def test_cache_length_limits(model):
    module, params, tokens, mask = model
    with pytest.raises(ValueError, match=r"12 tokens long \(padding included\), longer than the cache of 10 slots"):
        generate(module, params, tokens, mask, 4, cache_length=10)
    with pytest.raises(ValueError, match=r"cache of 14 slots .* too small for 12 prompt tokens \+ max_new_tokens 4: "
                                         r"it needs at least 16"):
        generate(module, params, tokens, mask, 4, cache_length=14)
    # Spare slots are never attended: a larger cache decodes the same ids.
    np.testing.assert_array_equal(generate(module, params, tokens, mask, 4, cache_length=40).tokens,
                                  greedy(module, params, tokens, mask, 4))


def test_left_pad():
    tokens, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[True] * 3, [False, False, True]])
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        left_pad([[1], []])
    with pytest.raises(ValueError, match="no prompts"):
        left_pad([])


def test_cli_generate_batches_prompts_of_different_lengths(tiny_with_tokenizer, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the lazy dog\n\nto be or not\n")
    assert main(["generate", str(tiny_with_tokenizer), "--prompt", "a stitch", "--prompt-file", str(prompts),
                 "--max-new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["prompt"] for c in result["completions"]] == ["a stitch", "the lazy dog", "to be or not"]
    assert result["new_tokens"] == sum(len(c["tokens"]) for c in result["completions"])
    assert result["tokens_per_s"] > 0 and result["compile_s"] > 0 and result["sampler"]["temperature"] == 0

    # The same ids as `generate` on the tokenizer's left-padded batch, each row cut after its first EOS.
    loaded = load(tiny_with_tokenizer)
    module, params, tokenizer = loaded.module, loaded.params, loaded.tokenizer
    assert tokenizer.vocab_size == load_tokenizer(tiny_with_tokenizer).vocab_size
    tokens, mask = left_pad(tokenizer.encode_batch(["a stitch", "the lazy dog", "to be or not"]), tokenizer.pad_id)
    assert tokens[0, 0] == tokenizer.pad_id and (tokens[mask.argmax(1) == 0][:, 0] == tokenizer.bos_id).all()
    expected = generate(module, params, tokens, mask, 6, end_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    for completion, ids, length in zip(result["completions"], expected.tokens, expected.lengths, strict=True):
        assert completion["tokens"] == ids[:length].tolist()
        assert completion["completion"] == tokenizer.decode(completion["tokens"])

    assert main(["generate", str(tiny_with_tokenizer), "--prompt", "to be", "--max-new-tokens", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_cli_generate_input_errors(tiny_with_tokenizer, tiny_checkpoints, tmp_path, capsys):
    model = str(tiny_with_tokenizer)
    assert main(["generate", model]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    assert main(["generate", model, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert main(["generate", model, "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "argument --top-p: expected a finite number in (0, 1], got 1.5" in capsys.readouterr().err
    assert main(["generate", model, "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "argument --max-new-tokens: expected an integer in [1, inf), got 0" in capsys.readouterr().err
    assert main(["generate", str(tiny_checkpoints["llama"]), "--prompt", "x"]) == 2
    assert "no tokenizer.json or tokenizer.model" in capsys.readouterr().err
    # A model of the wrong kind for the request is named as such, before anything is generated.
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    assert main(["generate", model, "--image", str(tmp_path / "image.png"), "--prompt", "x"]) == 2
    assert "is a decoder model; --image needs a PaliGemma" in capsys.readouterr().err
    assert main(["parity", str(tmp_path)]) == 2  # neither an HF folder nor a workdir
    assert "not a model: it holds neither config.json" in capsys.readouterr().err
