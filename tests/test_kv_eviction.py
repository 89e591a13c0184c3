"""KV-cache eviction: the evicting cache equals the full one when nothing is evicted, eviction equals masking
the evicted keys out (with absolute positions), and rows and kv heads decide independently, as a loop-by-loop
numpy re-implementation of each policy decides."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.checkpoints import load
from big_vision_lite.decoding.engine import generate, prefill
from big_vision_lite.decoding.kv_eviction import (
    POLICIES,
    EvictionPolicy,
    global_layers,
    init_state,
    step,
    teacher_forced,
)

PROMPT = 8


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    loaded = load(tiny_checkpoints["llama"])  # 2 layers, 4 heads, 2 kv heads
    return loaded.module, loaded.params, loaded.config


@pytest.fixture(scope="module")
def gemma3(tiny_checkpoints):
    loaded = load(tiny_checkpoints["gemma3"])  # sliding, sliding, full (window 8)
    return loaded.module, loaded.params, loaded.config


def _tokens(rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 96, (rows, length)).astype(np.int32)


def _log_probs(module, params, tokens, mask) -> np.ndarray:
    """Teacher-forced log-probs [B, T, V] of one full forward under `mask` [B, T, T]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _, _ = module.apply({"params": params}, jnp.asarray(tokens), positions, jnp.asarray(mask))
    return np.asarray(jax.nn.log_softmax(logits, -1))


def _nll(log_probs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[steps, B]: what `teacher_forced` reports, from full-forward log-probs (step s predicts PROMPT + s + 1)."""
    steps = tokens.shape[1] - PROMPT - 1
    rows = np.arange(tokens.shape[0])[:, None]
    return -log_probs[rows, PROMPT + np.arange(steps), tokens[:, PROMPT + 1:]].T


@pytest.mark.parametrize("name", POLICIES)
def test_capacity_of_the_whole_sequence_equals_the_full_cache(llama, name):
    module, params, _ = llama
    tokens = _tokens(2, 24)
    greedy = 6
    full = teacher_forced(module, params, tokens, [30, 30], policy=EvictionPolicy(name, 1, 2, threshold=1),
                          prompt_len=PROMPT, greedy_steps=greedy)
    causal = np.tril(np.ones((24, 24), bool))[None].repeat(2, 0)
    np.testing.assert_allclose(full["nll"][:24 - PROMPT - 1], _nll(_log_probs(module, params, tokens, causal), tokens),
                               atol=2e-5)
    assert (full["evicted"] == 0).all() and np.abs(full["mass_lost"]).max() < 1e-6
    # The greedy continuation equals generate's over the plain fixed-capacity cache.
    ids = generate(module, params, tokens, np.ones_like(tokens, bool), greedy).tokens
    np.testing.assert_array_equal(full["argmax"][24 - PROMPT - 1:].T, ids)


def test_streaming_eviction_equals_masking_the_evicted_keys(llama):
    """Sinks + the most recent tokens: a full forward under that mask, with absolute RoPE positions, gives the
    same predictions, so freed slots are never attended and reused slots hold the right keys."""
    module, params, _ = llama
    length, capacity, sinks = 40, 12, 2
    tokens = _tokens(1, length, seed=1).repeat(2, 0)
    out = teacher_forced(module, params, tokens, [length, capacity],
                         policy=EvictionPolicy("streaming", num_sinks=sinks, recent_window=4), prompt_len=PROMPT)
    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    window = (key <= query) & ((key < sinks) | (query - key < capacity - sinks))
    np.testing.assert_allclose(out["nll"][:, 1], _nll(_log_probs(module, params, tokens[:1], window[None]),
                                                       tokens[:1])[:, 0], atol=2e-5)
    assert out["held"][-1, 1] == capacity and out["held"][-1, 0] == length - 1
    assert out["kl"][:, 1].max() > 0 and out["mass_lost"][-1, 1] > 0
    assert out["evicted"][1] == (length - capacity) * 2 * 2  # one per step, layer and kv head once full


def _run_steps(module, params, tokens, capacity, policy, evict_layers):
    """Step by step: returns per step the attention [L][B, N, S] and the positions held before and after."""
    module = module.clone(return_probs=True)
    mask = jnp.ones((tokens.shape[0], PROMPT), bool)
    _, cache, out = prefill(module, params, jnp.asarray(tokens[:, :PROMPT]), mask)
    slots = [tokens.shape[1]] * len(evict_layers)
    state = init_state(cache, mask, slots, policy, out["attn_probs"])
    jitted = jax.jit(functools.partial(step, module, policy=policy, evict_layers=evict_layers),
                     static_argnames=())
    records = []
    for t in range(PROMPT, tokens.shape[1]):
        position = jnp.full((tokens.shape[0],), t, jnp.int32)
        _, probs, held, state = jitted(params, state, jnp.asarray(tokens[:, t]), position,
                                       capacity=jnp.asarray(capacity), rng=jax.random.key(t))
        records.append((jax.tree.map(np.asarray, probs), jax.tree.map(np.asarray, held),
                        jax.tree.map(np.asarray, state.cache.positions)))
    return records, init_prefill_scores(out["attn_probs"], policy, cache.k.shape[3])


def init_prefill_scores(prefill_probs, policy, num_kv_heads):
    """h2o's starting scores by position [L, B, K, T]: the attention each prompt token got in the prefill."""
    probs = np.asarray(prefill_probs).sum(3)  # [L, B, N, T]
    layers, batch, heads, length = probs.shape
    return probs.reshape(layers, batch, num_kv_heads, heads // num_kv_heads, length).sum(3)


@pytest.mark.parametrize("name", ["h2o", "tova", "recently_activated", "streaming"])
def test_rows_and_kv_heads_evict_as_a_reference_implementation_decides(llama, name):
    module, params, cfg = llama
    tokens = _tokens(2, 36, seed=2)
    policy = EvictionPolicy(name, num_sinks=1, recent_window=3, top_p=0.8, threshold=4)
    capacity = [10, 14]
    records, prefill_scores = _run_steps(module, params, tokens, capacity, policy, (True, True))
    group = cfg.num_heads // cfg.num_kv_heads
    differ = 0
    for layer in range(cfg.depth):
        for row in range(2):
            for head in range(cfg.num_kv_heads):
                score = {p: prefill_scores[layer, row, head, p] if name == "h2o" else 0.0 for p in range(PROMPT)}
                for t, (probs, held, after) in enumerate(records, start=PROMPT):
                    slot_positions = held[layer][row, head]
                    attention = probs[layer][row, head * group:(head + 1) * group]  # [G, S]
                    # Freed slots get exactly zero attention; the held ones all of it.
                    assert (attention[:, slot_positions < 0] == 0).all()
                    np.testing.assert_allclose(attention[:, slot_positions >= 0].sum(-1), 1.0, rtol=1e-5)
                    score.setdefault(t, 0.0)
                    by_pos = {int(p): attention[:, s] for s, p in enumerate(slot_positions) if p >= 0}
                    for p, a in by_pos.items():
                        if name == "h2o":
                            score[p] += a.sum()
                        elif name == "tova":
                            score[p] = a.sum()
                        elif name == "recently_activated":
                            member = _top_p_members(attention, policy.top_p, slot_positions)
                            score[p] = 0.0 if p in member else score[p] + 1
                    eligible = [p for p in by_pos if p >= policy.num_sinks and p <= t - policy.recent_window]
                    stale = ({p for p in eligible if score[p] > policy.threshold}
                             if name == "recently_activated" else set())
                    expected = set(by_pos) - stale
                    if len(expected) >= capacity[row] and (candidates := [p for p in eligible if p not in stale]):
                        ranked = sorted((_keep(name, score, p), _slot_of(slot_positions, p), p) for p in candidates)
                        expected.discard(ranked[0][2])  # the lowest keep score; ties go to the first slot
                    assert set(after[layer][row, head][after[layer][row, head] >= 0].tolist()) == expected, (
                        name, layer, row, head, t)
                    for p in set(by_pos) - expected:
                        score.pop(p)
            held_by_head = [frozenset(records[-1][2][layer][row, h].tolist()) for h in range(cfg.num_kv_heads)]
            differ += len(set(held_by_head)) > 1
    if name == "tova":
        assert differ > 0  # the current query's attention differs between kv heads, and so do the kept tokens


def _top_p_members(attention: np.ndarray, p: float, slot_positions: np.ndarray) -> set[int]:
    members = set()
    for head in attention:
        order = np.argsort(-head, kind="stable")
        mass = 0.0
        for s in order:
            if mass >= p or head[s] == 0:
                break
            members.add(int(slot_positions[s]))
            mass += head[s]
    return members


def _keep(name: str, score: dict[int, float], position: int) -> float:
    return {"streaming": position, "recently_activated": -score[position]}.get(name, score[position])


def _slot_of(slot_positions: np.ndarray, position: int) -> int:
    return int(np.flatnonzero(slot_positions == position)[0])


def test_layer_scope_keeps_the_same_tokens_in_every_kv_head(llama):
    module, params, cfg = llama
    records, _ = _run_steps(module, params, _tokens(1, 30, seed=3), [9], EvictionPolicy("h2o", 1, 2, scope="layer"),
                            (True, True))
    for layer in range(cfg.depth):
        after = records[-1][2][layer][0]
        assert all((np.sort(after[h]) == np.sort(after[0])).all() for h in range(cfg.num_kv_heads))
        assert (after >= 0).sum(-1).max() == 8  # at capacity 9, one slot is kept free for the next token


def test_rows_are_independent(llama):
    module, params, _ = llama
    tokens = _tokens(2, 30, seed=4)
    policy = EvictionPolicy("h2o", 1, 2)
    both = teacher_forced(module, params, np.concatenate([tokens[:1], tokens]), [30, 9, 12], policy=policy,
                          prompt_len=PROMPT)
    alone = teacher_forced(module, params, np.concatenate([tokens[1:], tokens[1:]]), [30, 12], policy=policy,
                           prompt_len=PROMPT)
    np.testing.assert_allclose(both["nll"][:, 2], alone["nll"][:, 1], atol=1e-6)
    assert both["evicted"][2] == alone["evicted"][1]


def test_sliding_layers_keep_their_window_and_only_global_layers_evict(gemma3):
    module, params, cfg = gemma3
    assert global_layers(cfg) == (False, False, True)
    tokens = _tokens(1, 30, seed=5).repeat(2, 0)
    records, _ = _run_steps(module, params, tokens, [30, 10], EvictionPolicy("tova", 1, 2), global_layers(cfg))
    after = records[-1][2]
    assert (after[0][1] >= 0).sum(-1).tolist() == [tokens.shape[1]] * cfg.num_kv_heads  # sliding: nothing freed
    assert (after[2][1] >= 0).sum(-1).max() == 9
    out = teacher_forced(module, params, tokens, [30, 10], policy=EvictionPolicy("tova", 1, 2), prompt_len=PROMPT)
    assert out["held"][-1].tolist() == [29, 10]  # mean held tokens per head on the evicting (global) layer


def test_bad_settings_are_refused(llama):
    module, params, _ = llama
    tokens = _tokens(2, 20)
    with pytest.raises(ValueError, match="policy 'lru' is not one of"):
        EvictionPolicy("lru")
    with pytest.raises(ValueError, match="top_p must be in"):
        EvictionPolicy(top_p=1.5)
    with pytest.raises(ValueError, match="recent_window must be >= 1"):
        EvictionPolicy(recent_window=0)
    with pytest.raises(ValueError, match=r"capacity 5 \(row 1\) must exceed num_sinks \+ recent_window = 6"):
        teacher_forced(module, params, tokens, [20, 5], policy=EvictionPolicy(num_sinks=2, recent_window=4),
                       prompt_len=4)
    with pytest.raises(ValueError, match="must exceed the 8-token prompt"):
        teacher_forced(module, params, tokens, [20, 8], policy=EvictionPolicy("h2o", 1, 2), prompt_len=8)
    with pytest.raises(ValueError, match="reference row 0 must be full"):
        teacher_forced(module, params, tokens, [12, 20], policy=EvictionPolicy("h2o", 1, 2), prompt_len=4)
    with pytest.raises(ValueError, match=r"prompt_len must be in \[1, 19\]"):
        teacher_forced(module, params, tokens, [20, 20], policy=EvictionPolicy("h2o", 1, 2), prompt_len=20)
