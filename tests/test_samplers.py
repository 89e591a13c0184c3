"""Samplers against numpy references: which tokens can be drawn, with what frequency, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.decoding.samplers import SamplerConfig, filtered_log_probs, sample

LOGITS = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.0, 0.0, 3.0, 1.0, 2.5, -2.0]])


def _draws(logits, config, n=4000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, config)))(keys))  # [n, B]


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_greedy_is_argmax_and_ignores_the_key():
    config = SamplerConfig()
    assert config.greedy
    for seed in range(3):
        np.testing.assert_array_equal(sample(LOGITS, jax.random.key(seed), config), [0, 2])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_frequencies_follow_softmax(temperature):
    draws = _draws(LOGITS, SamplerConfig(temperature=temperature))
    expected = _softmax(np.asarray(LOGITS) / temperature)
    for row in range(2):
        freq = np.bincount(draws[:, row], minlength=6) / len(draws)
        # 4000 draws: the standard error of a frequency is at most 0.008.
        np.testing.assert_allclose(freq, expected[row], atol=0.03)


def test_top_k_draws_only_the_k_most_likely():
    draws = _draws(LOGITS, SamplerConfig(temperature=1.0, top_k=2))
    assert set(draws[:, 0]) == {0, 1} and set(draws[:, 1]) == {2, 4}
    freq = np.mean(draws[:, 0] == 0)
    np.testing.assert_allclose(freq, _softmax(np.asarray([2.0, 1.0]))[0], atol=0.03)  # renormalised


def test_top_p_keeps_the_smallest_nucleus():
    probs = _softmax(np.asarray(LOGITS))
    for top_p in (0.3, 0.6, 0.9, 0.99):
        kept = np.isfinite(np.asarray(filtered_log_probs(LOGITS, SamplerConfig(temperature=1.0, top_p=top_p))))
        for row in range(2):
            order = np.argsort(-probs[row])
            before = np.cumsum(probs[row][order]) - probs[row][order]
            expected = np.zeros(6, bool)
            expected[order[before < top_p]] = True
            np.testing.assert_array_equal(kept[row], expected, err_msg=f"top_p={top_p} row={row}")
    draws = _draws(LOGITS, SamplerConfig(temperature=1.0, top_p=0.6))
    assert set(draws[:, 0]) <= {0, 1} and set(draws[:, 1]) <= {2, 4}


def test_combined_filters_and_huge_logits_stay_finite():
    huge = LOGITS * 1e4
    config = SamplerConfig(temperature=0.7, top_k=3, top_p=0.9)
    log_probs = filtered_log_probs(huge, config)
    assert not np.isnan(np.asarray(log_probs)).any()
    np.testing.assert_array_equal(sample(huge, jax.random.key(0), config), [0, 2])  # the only tokens left
    flat = jnp.full((1, 5), 1e4)  # ties everywhere: top-k keeps every tie, top-p the whole uniform mass
    np.testing.assert_allclose(filtered_log_probs(flat, config), np.log(0.2), rtol=1e-5)
    drawn = {int(sample(flat, key, config)[0]) for key in jax.random.split(jax.random.key(3), 64)}
    assert drawn == set(range(5))
    keys = jax.random.split(jax.random.key(1), 2)
    a = sample(LOGITS, keys[0], SamplerConfig(temperature=1.0))
    np.testing.assert_array_equal(a, sample(LOGITS, keys[0], SamplerConfig(temperature=1.0)))  # same key, same ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, r"temperature must be >= 0 \(0 means greedy\), got -0.1"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_k": 0}, r"top_k must be an integer >= 1 \(or None to disable\), got 0"),
        ({"top_k": 2.5}, "top_k must be an integer >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\] \(or None to disable\), got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_invalid_settings_name_the_setting_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def test_logits_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"logits must be \[B, V\], got shape \(6,\)"):
        sample(LOGITS[0], jax.random.key(0), SamplerConfig(temperature=1.0))
