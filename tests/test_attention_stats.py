"""Attention statistics against hand-made arrays with known answers and against plain loops (the seed notebook's)."""

import functools
import itertools

import jax
import numpy as np
import pytest

from big_vision_lite.decoding import attention_stats as stats


def _random_probs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.dirichlet(np.ones(shape[-1]) * 0.3, size=shape[:-1]).astype(np.float32)


def _top_p_loop(probs: np.ndarray, p: float) -> np.ndarray:
    """The fewest keys, largest first, whose mass reaches p (no ties in random probabilities)."""
    mask = np.zeros(probs.shape, bool)
    for index in np.ndindex(probs.shape[:-1]):
        total = 0.0
        for key in np.argsort(-probs[index], kind="stable"):
            if total >= p or probs[index][key] == 0:
                break
            mask[(*index, key)] = True
            total += probs[index][key]
    return mask


def _causal_membership(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    """Random square membership [..., S, S]: query t may only hold keys s <= t."""
    size = shape[-1]
    return (rng.random(shape) < density) & (np.arange(size)[:, None] >= np.arange(size)[None, :])


def test_top_p_mask_known_sets_and_ties():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
    np.testing.assert_array_equal(stats.top_p_mask(probs, 0.8), [False, True, False, True])
    np.testing.assert_array_equal(stats.top_p_mask(probs, 0.81), [False, True, True, True])
    np.testing.assert_array_equal(stats.top_p_mask(probs, 0.5), [False, True, False, False])
    np.testing.assert_array_equal(stats.top_p_mask(probs, 1.0), [True] * 4)
    # Keys tied with the smallest member all enter; zero-probability keys never do, even at p = 1.
    np.testing.assert_array_equal(stats.top_p_mask(np.array([0.4, 0.2, 0.2, 0.2, 0.0]), 0.5),
                                  [True, True, True, True, False])
    np.testing.assert_array_equal(stats.top_p_mask(np.array([0.0, 1.0, 0.0]), 1.0), [False, True, False])
    assert stats.top_p_size(probs, 0.81) == 3


def test_top_p_mask_and_size_match_a_loop():
    probs = _random_probs(np.random.default_rng(0), (2, 3, 5, 17))
    for p in (0.5, 0.9, 0.95):
        mask = np.asarray(jax.jit(functools.partial(stats.top_p_mask, p=p))(probs))
        np.testing.assert_array_equal(mask, _top_p_loop(probs, p))
        np.testing.assert_array_equal(stats.top_p_size(probs, p), mask.sum(-1))


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_top_p_rejects_p_outside_the_unit_interval(p):
    with pytest.raises(ValueError, match=r"top-p mass p must be in \(0, 1\]"):
        stats.top_p_mask(np.ones(3) / 3, p)


def test_sink_mass():
    probs = np.array([[0.6, 0.1, 0.3], [0.2, 0.3, 0.5]], np.float32)  # [T, S]
    np.testing.assert_allclose(stats.sink_mass(probs, 1), [0.6, 0.2], rtol=1e-6)
    np.testing.assert_allclose(stats.sink_mass(probs, 2), [0.7, 0.5], rtol=1e-6)
    # Left padding: slot 0 is padding (position 0, never attended), so position 0 is slot 1.
    padded = np.array([[0.0, 0.7, 0.3]], np.float32)
    np.testing.assert_allclose(stats.sink_mass(padded, 1, np.array([0, 0, 1])), [0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="num_sinks must be an integer >= 1, got 0"):
        stats.sink_mass(probs, 0)


def test_forgotten_tokens_match_the_seed_loop():
    rng = np.random.default_rng(2)
    size, look_back = 40, 4
    member = _causal_membership(rng, (2, 3, size, size), 0.08)  # [L, N, S, S], sparse so that keys get forgotten
    valid = np.ones(size, bool)
    valid[:3] = False  # left padding: never attended, never forgotten
    member &= valid
    forgotten = np.asarray(jax.jit(lambda m, kv: stats.forgotten_tokens(m, look_back, kv))(member, valid))
    expected = np.zeros_like(forgotten)
    for layer in range(2):
        for head in range(3):
            for token in range(size - look_back * 3):  # the seed's loop, eligible keys only
                if not valid[token]:
                    continue
                for target in range(token + look_back, size):
                    if member[layer, head, target, token]:
                        break
                else:
                    expected[layer, head, token] = True
    np.testing.assert_array_equal(forgotten, expected)
    assert 0 < expected.sum() < 2 * 3 * (size - 3 * look_back - 3)
    eligible = np.asarray(stats.eligible_keys(size, look_back, valid))
    np.testing.assert_array_equal(eligible, valid & (np.arange(size) < size - 3 * look_back))
    assert not (forgotten & ~eligible).any()


def test_forgotten_known_answer():
    # 10 slots, look_back 2: keys 0..3 are eligible (s < 10 - 6).
    member = np.zeros((10, 10), bool)
    member[np.arange(10), np.arange(10)] = True  # every query holds itself
    member[5, 0] = True  # key 0 recalled at query 5 >= 0 + 2
    member[2, 1] = True  # key 1 recalled at query 2 < 1 + 2: too early to count
    member[3, 2] = True  # key 2 recalled at query 3 < 2 + 2
    member[5, 3] = True  # key 3 recalled at query 5 >= 3 + 2
    np.testing.assert_array_equal(stats.forgotten_tokens(member, 2), [False, True, True, False] + [False] * 6)


def _revived_loop(member: np.ndarray, look_back: int, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    revived = np.zeros(member.shape[:-2] + member.shape[-1:], bool)
    largest = np.zeros(revived.shape, np.int32)
    size = member.shape[-1]
    for index in np.ndindex(member.shape[:-2]):
        for key in range(size):
            if not valid[key]:
                continue
            activations = [key] + [t for t in range(key + 1, size) if member[(*index, t, key)]]
            gaps = [b - a for a, b in itertools.pairwise(activations)]
            largest[(*index, key)] = max(gaps, default=0)
            revived[(*index, key)] = any(gap - 1 > look_back for gap in gaps)
    return revived, largest


def test_revived_tokens_match_a_loop():
    rng = np.random.default_rng(3)
    size, look_back = 36, 3
    member = _causal_membership(rng, (2, 4, size, size), 0.1)
    valid = np.arange(size) >= 2
    member &= valid
    revived, largest = jax.jit(lambda m, kv: stats.revived_tokens(m, look_back, kv))(member, valid)
    expected_revived, expected_largest = _revived_loop(member, look_back, valid)
    np.testing.assert_array_equal(largest, expected_largest)
    np.testing.assert_array_equal(revived, expected_revived)
    assert 0 < expected_revived.sum() < expected_revived.size


def test_revived_known_answer():
    member = np.zeros((12, 12), bool)
    member[5, 0] = True  # key 0: inserted at 0, back at 5: 4 idle queries > look_back 3 -> revived, gap 5
    member[5, 1] = True  # key 1: back at 5 after 3 idle queries: not revived, gap 4
    member[[3, 11], 2] = True  # key 2: 2..3 then 11 (7 idle): revived, largest gap 8
    revived, largest = stats.revived_tokens(member, 3)
    np.testing.assert_array_equal(largest[:4], [5, 4, 8, 0])
    np.testing.assert_array_equal(revived[:4], [True, False, True, False])


def test_sequence_membership_and_key_steps():
    rng = np.random.default_rng(4)
    prefill = rng.random((2, 3, 4, 4)) < 0.5  # [L, N, T, T]
    steps = rng.random((5, 2, 3, 9)) < 0.5  # [M, L, N, S]
    full = np.asarray(stats.sequence_membership(prefill, steps))
    assert full.shape == (2, 3, 9, 9)
    np.testing.assert_array_equal(full[..., :4, :4], prefill)
    assert not full[..., :4, 4:].any()
    np.testing.assert_array_equal(full[..., 4:, :], steps.transpose(1, 2, 0, 3))
    with pytest.raises(ValueError, match=r"10 key slots, expected prompt 4 \+ steps 5 = 9"):
        stats.sequence_membership(prefill, np.zeros((5, 2, 3, 10), bool))

    steps = rng.random((6, 2, 1, 3, 7)) < 0.2  # [T, L, B, N, S]
    by_key = np.asarray(stats.key_steps(steps))
    assert by_key.shape == (2, 1, 7, 6)
    for layer, key in np.ndindex(2, 7):
        in_some_head = [t for t in range(6) if steps[t, layer, 0, :, key].any()]
        np.testing.assert_array_equal(np.flatnonzero(by_key[layer, 0, key]), in_some_head)


def test_time_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="look_back must be an integer >= 1, got 0"):
        stats.forgotten_tokens(np.zeros((4, 4), bool), 0)
    with pytest.raises(ValueError, match="look_back must be an integer >= 1, got -2"):
        stats.revived_tokens(np.zeros((4, 4), bool), -2)
    with pytest.raises(ValueError, match=r"must be square .* got T=3, S=4"):
        stats.forgotten_tokens(np.zeros((3, 4), bool), 1)


def test_kv_cosine_similarity_matches_the_seed_computation():
    rng = np.random.default_rng(5)
    k = rng.normal(size=(2, 7, 2, 4)).astype(np.float32)  # [L, S, K, H]
    v = rng.normal(size=(2, 7, 2, 4)).astype(np.float32)
    k[0, 5, 1] = 3 * k[0, 1, 1]  # one pair of parallel keys in layer 0, kv head 1 ...
    v[0, 5, 1] = v[0, 1, 1] + 1e-3  # ... whose values are near-equal too
    v[1, 3, 0] = 2 * v[1, 0, 0]  # parallel values only
    valid = np.array([False, True, True, True, True, True, True])  # slot 0 is padding
    sim = stats.kv_cosine_similarity(k, v, 0.9, valid)
    for layer, head in np.ndindex(2, 2):
        counts = {"k": 0, "v": 0, "both": 0}
        k_sims, v_sims = [], []
        for i in range(7):
            for j in range(i + 1, 7):
                if not (valid[i] and valid[j]):
                    continue
                cos = lambda x, i=i, j=j: x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])  # noqa: E731
                ks, vs = cos(k[layer, :, head]), cos(v[layer, :, head])
                k_sims.append(ks)
                v_sims.append(vs)
                counts["k"] += ks >= 0.9
                counts["v"] += vs >= 0.9
                counts["both"] += (ks >= 0.9) and (vs >= 0.9)
        assert sim.key_pairs[layer, head] == counts["k"]
        assert sim.value_pairs[layer, head] == counts["v"]
        assert sim.both_pairs[layer, head] == counts["both"]
        np.testing.assert_allclose(sim.key_mean[layer, head], np.mean(k_sims), atol=1e-5)
        np.testing.assert_allclose(sim.value_mean[layer, head], np.mean(v_sims), atol=1e-5)
    np.testing.assert_array_equal(sim.num_pairs, [15, 15])
    assert sim.both_pairs[0, 1] >= 1 and sim.value_pairs[1, 0] >= 1
    with pytest.raises(ValueError, match=r"cosine threshold must be in \[-1, 1\], got 1.5"):
        stats.kv_cosine_similarity(k, v, 1.5)
    with pytest.raises(ValueError, match="must have the same shape"):
        stats.kv_cosine_similarity(k, v[:, :3], 0.9)
