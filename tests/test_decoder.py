"""The decoder's own invariants: caches, experts, LoRA, scan/remat layouts, dtype policy, config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.checkpoints import load
from big_vision_lite.models.attention import Attention, rope_inv_freq
from big_vision_lite.models.gemma import Decoder, DecoderConfig, FeedForward, stack_layers, unstack_layers
from big_vision_lite.models.lora import Einsum, LoRAConfig, lora_equations
from big_vision_lite.models.masks import causal_mask, positions_from_mask, prefill_mask
from big_vision_lite.parity.decoder import parity_batch

from conftest import TINY_FAMILIES

SMALL = DecoderConfig(vocab_size=64, width=32, depth=3, mlp_dim=48, num_heads=4, num_kv_heads=2, head_dim=8,
                      family="gemma3_text", post_norms=True, qk_norm=True, layer_types=("sliding", "sliding", "full"),
                      sliding_window=4, attn_logit_softcap=5.0, final_logit_softcap=3.0, local_rope_theta=100.0)


def _init(module, tokens, mask, seed=0):
    args = (tokens, positions_from_mask(mask), prefill_mask(mask))
    return jax.jit(module.init)(jax.random.key(seed), *args)["params"]


def _apply(module, params, *args):
    # Jitted: un-jitted Flax applies dispatch op by op and make the suite several times slower.
    return jax.jit(module.apply)({"params": params}, *args)


def _load(folder, scan_layers=False):
    loaded = load(folder, scan_layers=scan_layers)
    return loaded.module, loaded.params, loaded.config


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_cache_steps_equal_one_pass(tiny_checkpoints, family):
    """Prefill a prefix, then feed one token at a time through the concatenation cache and through the
    fixed-capacity cache: both give the one-pass logits."""
    module, params, cfg = _load(tiny_checkpoints[family], scan_layers=True)
    tokens, mask = parity_batch(cfg.vocab_size, 16)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    apply = lambda *args: _apply(module, *args)  # noqa: E731
    positions = positions_from_mask(mask)
    full, _, _ = apply(params, tokens, positions, prefill_mask(mask), None)

    prefix = 11  # longer than the left padding of row 1 and the sliding windows (8), shorter than the sequence
    _, concat, _ = apply(params, tokens[:, :prefix], positions[:, :prefix], prefill_mask(mask[:, :prefix]), None)
    fixed = concat.with_capacity(tokens.shape[1])
    fixed_valid = jnp.pad(mask[:, :prefix], [(0, 0), (0, tokens.shape[1] - prefix)])
    for t in range(prefix, tokens.shape[1]):
        token, position = tokens[:, t : t + 1], positions[:, t : t + 1]
        step_mask = causal_mask(position, jnp.concatenate([concat.positions, position], 1), mask[:, : t + 1])
        logits, concat, _ = apply(params, token, position, step_mask, concat)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5, err_msg=f"concat step {t}")

        fixed_valid = fixed_valid.at[:, t].set(True)
        key_positions = fixed.positions.at[:, t].set(position[:, 0])
        logits, fixed, _ = apply(params, token, position, causal_mask(position, key_positions, fixed_valid), fixed)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5, err_msg=f"fixed step {t}")
    assert concat.k.shape == fixed.k.shape == (cfg.depth, 2, tokens.shape[1], cfg.num_kv_heads, cfg.head_dim)
    assert int(fixed.index) == tokens.shape[1]
    with pytest.raises(ValueError, match="capacity 3 is smaller than the 11 cached tokens"):
        module.apply({"params": params}, tokens[:, :prefix], positions[:, :prefix],
                     prefill_mask(mask[:, :prefix]))[1].with_capacity(3)


def test_scan_and_unrolled_layers_agree_and_convert():
    tokens, mask = (jnp.asarray(a) for a in parity_batch(SMALL.vocab_size, 10))
    scanned = Decoder([SMALL], scan_layers=True)
    params = _init(scanned, tokens, mask)
    unrolled = Decoder([SMALL], scan_layers=False)
    args = (tokens, positions_from_mask(mask), prefill_mask(mask))
    a = _apply(scanned, params, *args)[0]
    b = _apply(unrolled, unstack_layers(params, SMALL.depth), *args)[0]
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    restacked = stack_layers(unstack_layers(params, SMALL.depth), SMALL.depth)
    jax.tree.map(np.testing.assert_array_equal, restacked, params)


def test_remat_policy_keeps_values_and_gradients():
    tokens, mask = (jnp.asarray(a) for a in parity_batch(SMALL.vocab_size, 10))
    args = (tokens, positions_from_mask(mask), prefill_mask(mask))
    plain = Decoder([SMALL])
    params = _init(plain, tokens, mask)

    def loss(module, p):
        return jnp.mean(module.apply({"params": p}, *args)[0] ** 2)

    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
        remat = Decoder([SMALL], remat_policy=policy)
        g0 = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
        g1 = jax.jit(jax.grad(lambda p, m=remat: loss(m, p)))(params)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), g0, g1)
    with pytest.raises(ValueError, match="remat_policy 'no_such_policy'"):
        Decoder([SMALL], remat_policy="no_such_policy").apply({"params": params}, *args)


def test_attention_probabilities_on_request():
    tokens, mask = (jnp.asarray(a) for a in parity_batch(SMALL.vocab_size, 10))
    args = (tokens, positions_from_mask(mask), prefill_mask(mask))
    params = _init(Decoder([SMALL]), tokens, mask)
    _, _, out = _apply(Decoder([SMALL], return_probs=True), params, *args)
    probs = out["attn_probs"]  # [L, B, N, T, S]
    assert probs.shape == (SMALL.depth, 2, SMALL.num_heads, 10, 10)
    valid_rows = np.asarray(mask)[None, :, None, :, None]
    np.testing.assert_allclose(np.where(valid_rows, probs.sum(-1, keepdims=True), 1.0), 1.0, rtol=1e-5)
    # Padding and future keys get exactly zero weight; sliding layers drop keys beyond the window (4).
    assert float(probs[:, 1, :, 2:, :2].max()) == 0.0  # row 1 is left-padded by 10 // 4 = 2 tokens
    assert float(jnp.triu(probs[:, 0], k=1).max()) == 0.0
    assert float(probs[0, 0, :, 9, :6].max()) == 0.0 and float(probs[2, 0, :, 9, :6].min()) > 0.0
    _, _, out = _apply(Decoder([SMALL]), params, *args)
    assert "attn_probs" not in out


def test_bfloat16_compute_keeps_norms_and_softmax_in_float32():
    tokens, mask = (jnp.asarray(a) for a in parity_batch(SMALL.vocab_size, 10))
    args = (tokens, positions_from_mask(mask), prefill_mask(mask))
    params = _init(Decoder([SMALL]), tokens, mask)
    ref = _apply(Decoder([SMALL]), params, *args)[0]
    bf16 = Decoder([SMALL], dtype=jnp.bfloat16, param_dtype=jnp.float32, return_probs=True)
    logits, cache, out = _apply(bf16, params, *args)
    assert logits.dtype == jnp.float32 and out["attn_probs"].dtype == jnp.float32
    assert cache.k.dtype == jnp.bfloat16 and out["final"].dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < 3e-2, rel
    bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    pure_bf16 = Decoder([SMALL], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(_init(pure_bf16, tokens, mask))} == {jnp.dtype(jnp.bfloat16)}
    logits16 = _apply(pure_bf16, bf16_params, *args)[0]
    assert 0 < float(jnp.linalg.norm(logits16 - ref) / jnp.linalg.norm(ref)) < 5e-2


def _attention(configs, xs, positions, mask, params=None, seed=0):
    module = Attention(configs)
    inv_freq = jnp.asarray(rope_inv_freq(configs[0].head_dim, 10_000.0))
    if params is None:
        params = jax.jit(module.init)(jax.random.key(seed), xs, positions, mask, inv_freq)["params"]
    outs, kv, _ = jax.jit(module.apply)({"params": params}, xs, positions, mask, inv_freq)
    return outs, kv, params


def test_two_identical_experts_equal_one_expert_on_concatenated_tokens():
    cfg = dataclasses.replace(SMALL, qk_norm=True)
    x = jax.random.normal(jax.random.key(1), (2, 7, cfg.width))
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mask = causal_mask(positions, positions, jnp.ones((2, 7), bool))
    one, _, params = _attention([cfg], [x], positions, mask)
    # The second expert is a copy of the first: parameters duplicated under the `_1` names.
    two_params = params | {f"{k}_1": v for k, v in params.items()}
    (a, b), _, _ = _attention([cfg, cfg], [x[:, :3], x[:, 3:]], positions, mask, two_params)
    np.testing.assert_allclose(jnp.concatenate([a, b], axis=1), one[0], atol=1e-6, rtol=1e-6)


def test_experts_of_different_widths_mask_across_experts():
    small, wide = dataclasses.replace(SMALL, width=16), dataclasses.replace(SMALL, width=48)
    xa = jax.random.normal(jax.random.key(1), (2, 5, 16))
    xb = jax.random.normal(jax.random.key(2), (2, 3, 48))
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    # Causal over the concatenation: expert 0's 5 tokens never see expert 1's; expert 1 sees all before it.
    mask = causal_mask(positions, positions, jnp.ones((2, 8), bool))
    (a, b), (k, _), params = _attention([small, wide], [xa, xb], positions, mask)
    assert a.shape == (2, 5, 16) and b.shape == (2, 3, 48) and k.shape == (2, 8, SMALL.num_kv_heads, SMALL.head_dim)
    assert params["q_einsum"]["w"].shape == (4, 16, 8) and params["q_einsum_1"]["w"].shape == (4, 48, 8)
    (a2, b2), _, _ = _attention([small, wide], [xa, xb * 3.0], positions, mask, params)
    np.testing.assert_array_equal(a, a2)  # expert 0 cannot see the changed expert-1 tokens
    assert float(jnp.abs(b - b2).max()) > 1e-3
    (a3, _), _, _ = _attention([small, wide], [xa, None], positions[:, :5], mask[:, :5, :5], params)
    np.testing.assert_allclose(a3, a, atol=1e-6)
    with pytest.raises(AssertionError, match="experts disagree on num_heads"):
        _attention([small, dataclasses.replace(wide, num_heads=8)], [xa, xb], positions, mask)


@pytest.mark.parametrize("rslora", [False, True])
def test_fresh_lora_adapter_is_an_exact_no_op(rslora):
    tokens, mask = (jnp.asarray(a) for a in parity_batch(SMALL.vocab_size, 10))
    args = (tokens, positions_from_mask(mask), prefill_mask(mask))
    base = Decoder([SMALL])
    params = _init(base, tokens, mask)
    lora_cfg = dataclasses.replace(SMALL, lora=LoRAConfig(rank=2, alpha=4.0, rslora=rslora))
    lora_params = _init(Decoder([lora_cfg]), tokens, mask, seed=1)
    assert "lora_a" in lora_params["layers_0"]["attn"]["q_einsum"]
    assert "gating_einsum_lora_b" in lora_params["layers_0"]["mlp"]
    # Give the adapted model the base weights; its fresh adapters (B = 0) must change nothing.
    merged = jax.tree_util.tree_map_with_path(
        lambda path, a: a if "lora" in jax.tree_util.keystr(path) else _get(params, path), lora_params)
    np.testing.assert_array_equal(_apply(Decoder([lora_cfg]), merged, *args)[0], _apply(base, params, *args)[0])
    # A trained adapter (B != 0) does change the output, by exactly scale * B(A(x)).
    x = jax.random.normal(jax.random.key(0), (2, 3, 5))
    layer = Einsum((4, 5, 6), "BTD,NDH->BTNH", lora=LoRAConfig(2, alpha=4.0, rslora=rslora))
    p = layer.init(jax.random.key(0), x)["params"]
    p = p | {"lora_b": jnp.ones_like(p["lora_b"])}
    scale = 4.0 / (np.sqrt(2) if rslora else 2)
    expected = jnp.einsum("BTD,NDH->BTNH", x, p["w"]) + scale * jnp.einsum(
        "BTNL,NLH->BTNH", jnp.einsum("BTD,NDL->BTNL", x, p["lora_a"]), p["lora_b"])
    np.testing.assert_allclose(layer.apply({"params": p}, x), expected, rtol=1e-5, atol=1e-5)


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_lora_equations_and_errors():
    assert lora_equations("BSD,3KDH->3BSKH") == ("BSD,3KDL->3BSKL", "3BSKL,3KLH->3BSKH")
    assert lora_equations("BTNH,NHD->BTD") == ("BTNH,NHL->BTL", "BTL,LD->BTD")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig(rank=0)


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        dataclasses.replace(SMALL, num_kv_heads=3)
    with pytest.raises(ValueError, match="layer_types has 2 entries, depth is 3"):
        dataclasses.replace(SMALL, layer_types=("full", "full"))
    with pytest.raises(ValueError, match="sliding layers need a positive sliding_window"):
        dataclasses.replace(SMALL, sliding_window=None)
    with pytest.raises(ValueError, match="activation 'relu'"):
        dataclasses.replace(SMALL, activation="relu")


def test_per_layer_cache_equals_stacked_cache(tiny_checkpoints):
    """The decode loop's per-layer (tuple) cache gives the stacked cache's logits and keys; scanned layers refuse it."""
    module, params, cfg = _load(tiny_checkpoints["gemma2"])
    tokens, mask = parity_batch(cfg.vocab_size, 12)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    positions = positions_from_mask(mask)
    _, cache, _ = _apply(module, params, tokens[:, :-1], positions[:, :-1], prefill_mask(mask[:, :-1]))
    fixed = cache.with_capacity(tokens.shape[1])
    per_layer = fixed.per_layer()
    step = (tokens[:, -1:], positions[:, -1:], causal_mask(positions[:, -1:], positions, mask))
    stacked_logits, stacked, _ = _apply(module, params, *step, fixed)
    tuple_logits, tupled, _ = _apply(module, params, *step, per_layer)
    np.testing.assert_array_equal(tuple_logits, stacked_logits)
    assert isinstance(tupled.k, tuple) and len(tupled.k) == cfg.depth
    np.testing.assert_array_equal(tupled.stacked().k, stacked.k)
    scanned, scanned_params, _ = _load(tiny_checkpoints["gemma2"], scan_layers=True)
    with pytest.raises(ValueError, match=r"per-layer \(tuple\) cache needs scan_layers=False"):
        scanned.apply({"params": scanned_params}, *step, per_layer)


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=2, alpha=4.0)])
def test_gated_mlp_gradients_match_the_plain_formula(lora):
    """The gated MLP's hand-written backward (both halves of `gating_einsum` as plain matmuls) against autodiff of
    linear(gelu(x W0) * (x W1)), for the input and every parameter (LoRA's adapters folded into the formula)."""
    cfg = DecoderConfig(vocab_size=16, width=8, depth=1, mlp_dim=12, num_heads=2, num_kv_heads=1, head_dim=4, lora=lora)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    params = FeedForward(cfg).init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), params)  # LoRA B non-zero

    def plain(p, x):
        w = p["gating_einsum"]
        if lora is not None:
            w = w + lora.scale * jnp.einsum("cDL,cLF->cDF", p["gating_einsum_lora_a"], p["gating_einsum_lora_b"])
        linear = p["linear"]
        if lora is not None:
            linear = linear + lora.scale * p["linear_lora_a"] @ p["linear_lora_b"]
        hidden = jax.nn.gelu(x @ w[0], approximate=True) * (x @ w[1])
        return jnp.sum(jnp.sin(hidden @ linear))

    ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(FeedForward(cfg).apply({"params": p}, x))), argnums=(0, 1))
    got, want = ours(params, x), jax.grad(plain, argnums=(0, 1))(params, x)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5, err_msg=jax.tree_util.keystr(path))
