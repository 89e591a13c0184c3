"""The SigLIP sigmoid loss: dense against numpy, blocked and ring against dense (loss, gradients, stats), the
blocked loss's compiled memory against dense, and input errors. The ring runs on 8 simulated CPU devices in a
subprocess (the device count must be set before JAX starts, and this process's JAX already has one device)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.losses import (
    IMPLS,
    STAT_NAMES,
    sigmoid_loss,
    sigmoid_loss_blocked,
    sigmoid_loss_dense,
)

T, BIAS = 10.0, -10.0  # the paper's initialisation (t = exp(log 10))


def embeddings(batch: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((2, batch, dim)).astype(np.float32)
    y = 0.6 * x + 0.4 * y  # correlated pairs, so positives and negatives differ and the loss is not trivial
    return x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)


def numpy_reference(x: np.ndarray, y: np.ndarray, t: float, b: float) -> tuple[float, dict[str, float]]:
    logits = t * x.astype(np.float64) @ y.astype(np.float64).T + b
    z = 2 * np.eye(len(x)) - 1
    loss = np.sum(np.logaddexp(0.0, -z * logits)) / len(x)  # -log_sigmoid(u) = log(1 + exp(-u))
    pos, neg = logits[np.eye(len(x), dtype=bool)], logits[~np.eye(len(x), dtype=bool)]
    stats = {f"{kind}_{fn}": float(getattr(v, fn)()) if v.size else np.nan
             for kind, v in (("pos", pos), ("neg", neg)) for fn in ("mean", "min", "max")}
    return float(loss), stats


def value_and_grads(loss_fn, x, y, t=T, b=BIAS):
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))(x, y, jnp.float32(t),
                                                                                  jnp.float32(b))


def max_abs(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize(("batch", "t", "b"), [(24, T, BIAS), (24, 3.0, 0.5), (600, 100.0, -5.0), (7, -2.0, 1.0)])
def test_dense_matches_numpy(batch, t, b):
    x, y = embeddings(batch, 16)
    loss, stats = sigmoid_loss_dense(x, y, t, b)
    ref_loss, ref_stats = numpy_reference(x, y, t, b)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    assert list(stats) == list(STAT_NAMES)
    for k in STAT_NAMES:
        np.testing.assert_allclose(float(stats[k]), ref_stats[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_bfloat16_inputs_compute_in_float32():
    x, y = embeddings(16, 8)
    loss, _ = sigmoid_loss_dense(jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16), T, BIAS)
    xb, yb = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, y))  # the rounded inputs
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), numpy_reference(xb, yb, T, BIAS)[0], rtol=1e-5)
    grads = jax.grad(lambda a, c: sigmoid_loss_blocked(a, c, T, BIAS, block_size=5)[0], argnums=(0, 1))(
        jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16))
    assert all(g.dtype == jnp.bfloat16 for g in grads)  # gradients come back in the inputs' dtype


@pytest.mark.parametrize(("batch", "block"), [(32, 8), (30, 8), (13, 64), (17, 1)])
def test_blocked_matches_dense(batch, block):
    """Loss, gradients w.r.t. zimg, ztxt, t and b, and stats; also when B is not a multiple of the block."""
    x, y = embeddings(batch, 12, seed=batch)
    (loss_d, stats_d), grads_d = value_and_grads(sigmoid_loss_dense, x, y)
    (loss_b, stats_b), grads_b = value_and_grads(lambda *a: sigmoid_loss_blocked(*a, block_size=block), x, y)
    assert abs(float(loss_d) - float(loss_b)) < 1e-5
    assert max_abs(grads_d, grads_b) < 1e-5
    assert [g.shape for g in grads_b] == [(batch, 12), (batch, 12), (), ()]
    assert sorted(stats_b) == sorted(STAT_NAMES)  # (jit returns dicts in sorted key order)
    assert max_abs(stats_d, stats_b) < 1e-5


def test_t_and_b_as_size_one_arrays():
    """big_vision keeps t' and b as shape [1] parameters; their gradients keep that shape."""
    x, y = embeddings(8, 4)
    t, b = jnp.full((1,), T), jnp.full((1,), BIAS)
    for impl in ("dense", "blocked"):
        grads = jax.grad(lambda t, b, impl=impl: sigmoid_loss(x, y, t, b, impl, block_size=3)[0], argnums=(0, 1))(t, b)
        assert [g.shape for g in grads] == [(1,), (1,)]


def test_single_pair_has_no_negatives():
    x, y = embeddings(1, 4)
    for impl in ("dense", "blocked"):
        loss, stats = sigmoid_loss(x, y, T, BIAS, impl)
        ref_loss, ref_stats = numpy_reference(x, y, T, BIAS)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
        for k in STAT_NAMES:  # the negatives' are NaN on both sides
            np.testing.assert_allclose(float(stats[k]), ref_stats[k], rtol=1e-5, err_msg=k)


def test_dispatch():
    x, y = embeddings(10, 4)
    dense, _ = sigmoid_loss(x, y, T, BIAS)
    blocked, _ = sigmoid_loss(x, y, T, BIAS, "blocked", block_size=4)
    assert abs(float(dense) - float(blocked)) < 1e-5
    with pytest.raises(ValueError, match="dense, blocked, ring"):
        sigmoid_loss(x, y, T, BIAS, "sparse")
    with pytest.raises(ValueError, match="needs a mesh"):
        sigmoid_loss(x, y, T, BIAS, "ring")


@pytest.mark.parametrize("impl", IMPLS[:2])
@pytest.mark.parametrize(("zimg_shape", "ztxt_shape", "match"), [
    ((8, 4), (6, 4), r"same number of pairs.*zimg has shape \(8, 4\).*ztxt has shape \(6, 4\)"),
    ((8, 4), (8, 5), r"same embedding width.*\(8, 4\).*\(8, 5\)"),
    ((8,), (8, 4), r"zimg must be 2-D.*\(8,\)"),
    ((8, 4), (2, 8, 4), r"ztxt must be 2-D.*\(2, 8, 4\)"),
])
def test_bad_shapes(impl, zimg_shape, ztxt_shape, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_loss(np.zeros(zimg_shape, np.float32), np.zeros(ztxt_shape, np.float32), T, BIAS, impl)


def test_bad_scalars_and_block():
    x, y = embeddings(4, 4)
    with pytest.raises(ValueError, match=r"t must be a scalar.*\(2,\)"):
        sigmoid_loss_dense(x, y, jnp.ones(2), BIAS)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        sigmoid_loss_blocked(x, y, T, BIAS, block_size=0)


def test_blocked_compiled_memory_is_smaller_than_dense():
    """Behaviour, not speed: XLA's own accounting of the value-and-grad executables' temporaries at B = 2048."""
    batch, dim, block = 2048, 64, 256
    args = (jax.ShapeDtypeStruct((batch, dim), jnp.float32),) * 2 + (jax.ShapeDtypeStruct((), jnp.float32),) * 2

    def temp_bytes(loss_fn) -> int:
        fn = jax.jit(jax.value_and_grad(lambda *a: loss_fn(*a)[0], argnums=(0, 1, 2, 3)))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    dense = temp_bytes(sigmoid_loss_dense)
    blocked = temp_bytes(lambda *a: sigmoid_loss_blocked(*a, block_size=block))
    assert dense >= batch * batch * 4  # at least the [B, B] float32 logits
    assert blocked * 4 < dense, (blocked, dense)  # B x block: a handful of [B, 256] buffers, not [B, B] ones
    assert blocked < 8 * batch * block * 4


RING_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from big_vision_lite.losses import sigmoid_loss, sigmoid_loss_dense, sigmoid_loss_ring

    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    B, E = 32, 12
    x, y = rng.standard_normal((2, B, E)).astype(np.float32)
    y = 0.6 * x + 0.4 * y
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    args = (jnp.asarray(x), jnp.asarray(y), jnp.float32(10.0), jnp.float32(-10.0))

    def vg(fn, args):
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))(*args)

    def diff(a, b):
        return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    def rel(a, ref):  # per input: max |a - ref| / max |ref|
        return [diff(u, v) / float(np.max(np.abs(np.asarray(v, np.float64)))) for u, v in zip(a, ref, strict=True)]

    with_stats = lambda fn: lambda *a: (lambda loss, stats: (loss + sum(stats.values()), stats))(*fn(*a))
    (loss_d, stats_d), grads_d = vg(sigmoid_loss_dense, args)
    _, grads_ds = vg(with_stats(sigmoid_loss_dense), args)
    args2 = (*args[:2], jnp.float32(3.0), jnp.float32(0.5))  # a small t: no block of the gradient is ~0
    _, grads_d2 = vg(sigmoid_loss_dense, args2)
    auto = lambda n: jax.make_mesh(n, ("data", "fsdp")[:len(n)], axis_types=(AxisType.Auto,) * len(n))
    out = {}
    meshes = {
        "data8": (auto((8,)), "data"),
        "data4_fsdp2": (auto((4, 2)), ("data", "fsdp")),
        # The ring over one axis of two (replicated over the other), and a mesh with JAX's default Explicit axes.
        "data4_of_4x2": (auto((4, 2)), "data"),
        "fsdp2_of_4x2": (auto((4, 2)), "fsdp"),
        "explicit8": (jax.make_mesh((8,), ("data",)), "data"),
        "data1": (auto((1,)), "data"),  # a ring of one device: no step, no hop
    }
    for name, (mesh, axis) in meshes.items():
        ring = lambda *a, mesh=mesh, axis=axis: sigmoid_loss_ring(*a, mesh, axis_name=axis)
        (loss_r, stats_r), grads_r = vg(ring, args)
        _, grads_r2 = vg(ring, args2)
        _, grads_rs = vg(with_stats(ring), args)  # the stats carry no gradient, as in dense
        # Eager, with inputs already sharded, through the dispatcher.
        sharded = [jax.device_put(a, NamedSharding(mesh, P(axis))) for a in args[:2]] + list(args[2:])
        loss_e, stats_e = sigmoid_loss(*sharded, "ring", mesh=mesh, axis_name=axis)
        out[name] = {"loss": abs(float(loss_r) - float(loss_d)), "grads": diff(grads_r, grads_d),
                     "grads_rel": rel(grads_r, grads_d), "grads_rel_t3": rel(grads_r2, grads_d2),
                     "grads_with_stats": diff(grads_rs, grads_ds),
                     "stats": diff(stats_r, stats_d), "stat_keys": list(stats_r),
                     "eager_loss": abs(float(loss_e) - float(loss_d)), "eager_stats": diff(stats_e, stats_d),
                     "grad_shapes": [list(g.shape) for g in grads_r]}
    try:
        sigmoid_loss_ring(*[a[:30] for a in args[:2]], *args[2:], meshes["data8"][0])
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    try:
        sigmoid_loss_ring(*args, meshes["data8"][0], axis_name="model")
        out["axis_error"] = None
    except ValueError as e:
        out["axis_error"] = str(e)
    print(json.dumps(out))
""")


def test_ring_matches_dense_on_8_devices():
    """Loss, stats and each gradient (the ring's own backward, `custom_vjp`) against dense, on rings of 8, 4, 2
    and 1 devices; the ring needs B to be a multiple of its devices, so there is no uneven case, only its error."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", RING_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("data8", "data4_fsdp2", "data4_of_4x2", "fsdp2_of_4x2", "explicit8", "data1"):
        r = out[name]
        assert r["loss"] < 1e-5 and r["eager_loss"] < 1e-5, (name, r)
        assert r["grads"] < 1e-5 and r["grads_with_stats"] < 1e-5, (name, r)
        # Each of d/dzimg, d/dztxt, d/dt, d/db on its own scale, at t = 10, b = -10 and at t = 3, b = 0.5.
        assert max(r["grads_rel"] + r["grads_rel_t3"]) < 1e-5, (name, r)
        assert r["stats"] < 1e-5 and r["eager_stats"] < 1e-5, (name, r)
        assert sorted(r["stat_keys"]) == sorted(STAT_NAMES)
        assert r["grad_shapes"] == [[32, 12], [32, 12], [], []]
    assert "multiple of the 8 devices" in out["indivisible_error"]
    assert "'model'" in out["axis_error"]
