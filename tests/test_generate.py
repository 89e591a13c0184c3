"""The jitted decode loop: end tokens per row, sampling with explicit keys, and input errors."""

import jax
import numpy as np
import pytest

from big_vision_lite.checkpoints import load_decoder
from big_vision_lite.generate import generate, greedy, left_pad
from big_vision_lite.parity import parity_batch
from big_vision_lite.samplers import SamplerConfig


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    module, params, cfg = load_decoder(tiny_checkpoints["gemma3"])
    tokens, mask = parity_batch(cfg.vocab_size, 12)
    return module, params, tokens, mask


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
