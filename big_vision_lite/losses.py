"""SigLIP's pairwise sigmoid loss, in three implementations with one meaning.

Axis letters: B batch (image-text pairs), E embedding width, C a block of text columns, b the per-device batch
(B / number of devices) in the ring implementation.

For L2-normalised image embeddings x [B, E] and text embeddings y [B, E], a temperature t (already exp(t')) and a
bias b, the logits are `l_ij = t * <x_i, y_j> + b` [B, B] and the loss is

    loss = -(1/B) * sum_ij log_sigmoid(z_ij * l_ij),    z_ij = +1 if i == j (a matching pair) else -1.

Every implementation computes in float32 whatever the input dtype, and returns `(loss, stats)` where `stats` holds
training metrics of the logits, without gradient: `pos_mean, pos_min, pos_max` over the B positives (the diagonal)
and `neg_mean, neg_min, neg_max` over the B * (B - 1) negatives. The means and the positives' min/max come from
O(B * E) terms (sum_ij <x_i, y_j> = <sum_i x_i, sum_j y_j>, positives = row-wise dots); only the negatives' min/max
are running reductions over the logits, so no implementation but dense ever holds a [B, B] matrix.

- `sigmoid_loss_dense`: the whole [B, B] logits matrix at once (and its gradient in the backward pass).
- `sigmoid_loss_blocked`: one device; a `lax.scan` over column blocks of the texts with a rematerialised body, so
  the forward and backward passes keep only a [B, C] block of logits alive: memory grows as B * C, not B^2.
- `sigmoid_loss_ring`: many devices (`jax.shard_map`); each keeps its images and passes its texts around a
  `ppermute` ring, computing one [b, b] block per step; the sums are `psum`-ed and divided by the global B. Its
  `custom_vjp` backward sends the texts round again, their gradient travelling with them, so per-device memory
  (forward and backward) is O(b * E + b * b) at any device count.

`sigmoid_loss(..., impl=...)` picks one by name and checks the inputs.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

IMPLS = ("dense", "blocked", "ring")
# [B, 1024] blocks keep an accelerator's matmuls large; on the 2-core CPU 512 ran a little faster (and needs half the
# memory) at B = 16384, E = 512: see bench/siglip_loss.py.
DEFAULT_BLOCK_SIZE = 1024
STAT_NAMES = ("pos_mean", "pos_min", "pos_max", "neg_mean", "neg_min", "neg_max")

Stats = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _check_embeddings(zimg: jax.Array, ztxt: jax.Array) -> None:
    shapes = {"zimg": tuple(np.shape(zimg)), "ztxt": tuple(np.shape(ztxt))}
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D [B, E], got shape {shape}")
    (bi, ei), (bt, et) = shapes["zimg"], shapes["ztxt"]
    if bi != bt:
        raise ValueError(f"zimg and ztxt must hold the same number of pairs B: zimg has shape {shapes['zimg']}, "
                         f"ztxt has shape {shapes['ztxt']}")
    if ei != et:
        raise ValueError(f"zimg and ztxt must have the same embedding width E: zimg has shape {shapes['zimg']}, "
                         f"ztxt has shape {shapes['ztxt']}")
    if bi < 1:
        raise ValueError(f"zimg needs at least one pair, got shape {shapes['zimg']}")


def _as_scalar(name: str, value: jax.Array | float) -> jax.Array:
    """A float32 scalar from a scalar or a size-1 array (big_vision stores t' and b as shape [1] parameters)."""
    if np.size(value) != 1:
        raise ValueError(f"{name} must be a scalar (or hold one element), got shape {tuple(np.shape(value))}")
    return jnp.reshape(jnp.asarray(value), ()).astype(jnp.float32)


def _prepare(zimg: jax.Array, ztxt: jax.Array, t: jax.Array | float,
             b: jax.Array | float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    zimg, ztxt = jnp.asarray(zimg), jnp.asarray(ztxt)
    _check_embeddings(zimg, ztxt)
    # Why float32: in bfloat16, <x, y> of unit vectors has ~3 significant digits and the loss sums B^2 terms.
    return zimg.astype(jnp.float32), ztxt.astype(jnp.float32), _as_scalar("t", t), _as_scalar("b", b)


# ---------------------------------------------------------------------------------------------------------------
# Loss and statistics terms. Each implementation sums the same terms over its pieces of the [B, B] pairs.
#
# Why the means (and the positives' min/max) come from O(B * E) terms and not from the [B, B] logits: the sum of
# all dot products is <sum_i x_i, sum_j y_j> and the positives are the B row-wise dots <x_i, y_i>. Only the
# negatives' min and max need a pass over the logits; on CPU XLA materialises the input of every reduction, so
# each [B, B] reduction saved in the dense loss is a [B, B] buffer and a pass over it saved.


def _moment_terms(x: jax.Array, y: jax.Array, t: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
    """The stats terms of R matching pairs x [R, E], y [R, E] that need no [R, R] matrix (no gradient)."""
    x, y, t, b = (jax.lax.stop_gradient(a) for a in (x, y, t, b))
    diag = jnp.sum(x * y, axis=1)  # [R]: <x_i, y_i>
    pos = t * diag + b  # [R]: the positive logits
    return {"pos_sum": jnp.sum(pos), "pos_min": jnp.min(pos), "pos_max": jnp.max(pos),
            "diag_dot_sum": jnp.sum(diag), "x_sum": jnp.sum(x, axis=0), "y_sum": jnp.sum(y, axis=0)}  # [E] each


def _empty_block_terms() -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32), "neg_min": jnp.full((), jnp.inf, jnp.float32),
            "neg_max": jnp.full((), -jnp.inf, jnp.float32)}


def _block_terms(logits: jax.Array, positive: jax.Array, valid: jax.Array | None = None) -> dict[str, jax.Array]:
    """Loss sum and the negatives' min/max of one block of logits [R, C]; `positive` and `valid` (None: all) are
    bool masks that broadcast to [R, C] (padded columns are not valid). Only `loss_sum` carries gradient."""
    # Why log_sigmoid (not log(sigmoid)): it stays finite for large |t * <x, y> + b|.
    terms = jax.nn.log_sigmoid(jnp.where(positive, logits, -logits))  # [R, C]: log_sigmoid(z * logits)
    negative = ~positive
    if valid is not None:
        terms, negative = jnp.where(valid, terms, 0.0), negative & valid
    stat = jax.lax.stop_gradient(logits)
    return {"loss_sum": -jnp.sum(terms), "neg_min": jnp.min(jnp.where(negative, stat, jnp.inf)),
            "neg_max": jnp.max(jnp.where(negative, stat, -jnp.inf))}


def _combine(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: jnp.minimum(a[k], b[k]) if k.endswith("_min") else jnp.maximum(a[k], b[k]) if k.endswith("_max")
            else a[k] + b[k] for k in a}


def _finish(acc: dict[str, jax.Array], batch: int, t: jax.Array, b: jax.Array) -> tuple[jax.Array, Stats]:
    """(loss, stats) from the terms summed over all B x B pairs; with no negatives (B == 1) their stats are NaN."""
    t, b = jax.lax.stop_gradient(t), jax.lax.stop_gradient(b)
    n_neg = batch * (batch - 1)
    # sum over i != j of <x_i, y_j> = <sum_i x_i, sum_j y_j> - sum_i <x_i, y_i>
    neg_dot_sum = jnp.dot(acc["x_sum"], acc["y_sum"]) - acc["diag_dot_sum"]
    nan = jnp.full((), jnp.nan, jnp.float32)
    stats = {
        "pos_mean": acc["pos_sum"] / batch, "pos_min": acc["pos_min"], "pos_max": acc["pos_max"],
        # A float: B(B - 1) passes int32 from B = 46342 on, and a Python int beyond it is refused as a jit argument.
        "neg_mean": t * neg_dot_sum / float(n_neg) + b if n_neg else nan,
        "neg_min": acc["neg_min"] if n_neg else nan, "neg_max": acc["neg_max"] if n_neg else nan,
    }
    return acc["loss_sum"] / batch, stats


# ---------------------------------------------------------------------------------------------------------------
# Dense


def sigmoid_loss_dense(zimg: jax.Array, ztxt: jax.Array, t: jax.Array | float,
                       b: jax.Array | float) -> tuple[jax.Array, Stats]:
    """The loss from the whole [B, B] logits matrix: simplest, and fastest while B^2 floats fit in memory."""
    x, y, t, b = _prepare(zimg, ztxt, t, b)
    batch = x.shape[0]
    logits = t * (x @ y.T) + b  # [B, B]: row i image, column j text
    positive = jnp.eye(batch, dtype=bool)  # [B, B]
    return _finish(_moment_terms(x, y, t, b) | _block_terms(logits, positive), batch, t, b)


# ---------------------------------------------------------------------------------------------------------------
# Blocked (one device)


def sigmoid_loss_blocked(zimg: jax.Array, ztxt: jax.Array, t: jax.Array | float, b: jax.Array | float,
                         block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[jax.Array, Stats]:
    """The loss scanning over blocks of `block_size` text columns; peak memory (forward and backward) ~ B * block.

    The block body is rematerialised (`jax.checkpoint`): the backward pass recomputes each [B, C] block of logits
    instead of keeping all of them, which would add up to B^2 again. B need not be a multiple of the block: the
    texts are padded with zero rows whose columns are masked out of the loss and the stats.
    """
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x, y, t, b = _prepare(zimg, ztxt, t, b)
    batch, width = x.shape
    block = min(int(block_size), batch)  # a block wider than B would only add padding
    n_blocks = -(-batch // block)
    pad = n_blocks * block - batch
    y_blocks = jnp.pad(y, ((0, pad), (0, 0))).reshape(n_blocks, block, width)  # [N, C, E]
    rows = jnp.arange(batch)[:, None]  # [B, 1]

    @jax.checkpoint
    def body(acc: dict[str, jax.Array], inputs: tuple[jax.Array, jax.Array]) -> tuple[dict[str, jax.Array], None]:
        y_block, start = inputs  # [C, E], first column index of the block
        cols = start + jnp.arange(block)[None, :]  # [1, C]
        logits = t * (x @ y_block.T) + b  # [B, C]
        valid = cols < batch if pad else None  # [1, C]; only the last block has padded columns
        return _combine(acc, _block_terms(logits, rows == cols, valid)), None

    starts = jnp.arange(n_blocks) * block  # [N]
    acc, _ = jax.lax.scan(body, _empty_block_terms(), (y_blocks, starts))
    return _finish(_moment_terms(x, y, t, b) | acc, batch, t, b)


# ---------------------------------------------------------------------------------------------------------------
# Ring (many devices)


def _axis_names(axis_name: str | Sequence[str]) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _ring_perm(n_dev: int) -> list[tuple[int, int]]:
    """Device i sends to i + 1, so after k steps device i holds the texts of device i - k (mod n_dev)."""
    return [(i, (i + 1) % n_dev) for i in range(n_dev)]


def _ring_forward(batch: int, axes: tuple[str, ...], n_dev: int) -> Callable:
    """The per-device forward of `sigmoid_loss_ring` (runs inside `shard_map`): (loss, stats), nothing saved."""

    def local(x: jax.Array, y: jax.Array, t: jax.Array, b: jax.Array) -> tuple[jax.Array, Stats]:

        def block(y: jax.Array, own: bool) -> dict[str, jax.Array]:
            logits = t * (x @ y.T) + b  # [b, b]: local images x the texts held this step
            # Positives (the diagonal) only on the step where the device holds its own texts.
            positive = jnp.eye(x.shape[0], dtype=bool) if own else jnp.zeros((), bool)  # [b, b] or all False
            return _block_terms(logits, positive)

        def step(carry: tuple[jax.Array, dict[str, jax.Array]], _: None):
            y, terms = carry
            y = jax.lax.ppermute(y, axes, _ring_perm(n_dev))
            return (y, _combine(terms, block(y, False))), None

        terms = block(y, True)
        if n_dev > 1:
            (_, terms), _ = jax.lax.scan(step, (y, terms), None, length=n_dev - 1)
        # Sum over devices; min/max reduce with pmin/pmax. After these every value is the same on all devices.
        acc = {k: jax.lax.pmin(v, axes) if k.endswith("_min") else jax.lax.pmax(v, axes) if k.endswith("_max")
               else jax.lax.psum(v, axes) for k, v in (_moment_terms(x, y, t, b) | terms).items()}
        return _finish(acc, batch, t, b)

    return local


def _ring_backward(batch: int, axes: tuple[str, ...], n_dev: int) -> Callable:
    """The per-device backward of `sigmoid_loss_ring` (runs inside `shard_map`): the gradients of the loss w.r.t.
    the local images x [b, E], the local texts y [b, E] and the scalars t, b, given the loss's cotangent g.

    The texts go round the ring a second time and each step's [b, b] block of logits is recomputed. d/dx sums
    locally; d/dy of the texts held this step travels round the ring with them, and one last hop after the final
    block brings each shard's gradient back to its owner. d/dt and d/db are per-device partial sums, psum-ed.
    What a device holds is x, y, their gradients and one block: O(b * E + b * b), whatever the device count.
    """

    def local(x: jax.Array, y: jax.Array, t: jax.Array, b: jax.Array,
              g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        scale = g / batch  # the loss is loss_sum / B

        def block(y: jax.Array, own: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
            dots = x @ y.T  # [b, b]
            # z = +1 on the positives (the diagonal of the device's own block), -1 elsewhere;
            # d(-log_sigmoid(z * l)) / dl = -z * sigmoid(-z * l).
            z = jnp.where(jnp.eye(x.shape[0], dtype=bool), 1.0, -1.0) if own else -1.0  # [b, b] or a scalar
            dlogits = -z * jax.nn.sigmoid(-z * (t * dots + b)) * scale  # [b, b]
            return t * (dlogits @ y), t * (dlogits.T @ x), jnp.sum(dlogits * dots), jnp.sum(dlogits)

        def step(carry: tuple[jax.Array, ...], _: None) -> tuple[tuple[jax.Array, ...], None]:
            y, dy, dx, dt, db = carry
            # The texts and their gradient so far move together: device i now holds those of device i - k.
            y, dy = jax.lax.ppermute((y, dy), axes, _ring_perm(n_dev))
            gx, gy, gt, gb = block(y, False)
            return (y, dy + gy, dx + gx, dt + gt, db + gb), None

        dx, dy, dt, db = block(y, True)
        if n_dev > 1:
            (_, dy, dx, dt, db), _ = jax.lax.scan(step, (y, dy, dx, dt, db), None, length=n_dev - 1)
            dy = jax.lax.ppermute(dy, axes, _ring_perm(n_dev))  # held by device i - 1: one hop home
        return dx, dy, jax.lax.psum(dt, axes), jax.lax.psum(db, axes)

    return local


def _ring_loss(mesh: Mesh, axes: tuple[str, ...], batch: int, n_dev: int) -> Callable:
    """(x, y, t, b) -> (loss, stats) over the ring, with a `custom_vjp`: the backward recomputes the blocks on a
    second trip round the ring instead of keeping each step's text shard, as autodiff through the forward scan
    would (n_dev * b * E = B * E floats per device). The stats carry no gradient; their cotangents are ignored."""
    spec = P(axes)  # the batch axis split over all the named axes (the first one major)
    names = frozenset(axes)
    forward = jax.shard_map(_ring_forward(batch, axes, n_dev), mesh=mesh, in_specs=(spec, spec, P(), P()),
                            out_specs=(P(), {k: P() for k in STAT_NAMES}), axis_names=names)
    backward = jax.shard_map(_ring_backward(batch, axes, n_dev), mesh=mesh, in_specs=(spec, spec, P(), P(), P()),
                             out_specs=(spec, spec, P(), P()), axis_names=names)

    @jax.custom_vjp
    def loss(x: jax.Array, y: jax.Array, t: jax.Array, b: jax.Array) -> tuple[jax.Array, Stats]:
        return forward(x, y, t, b)

    def loss_fwd(x: jax.Array, y: jax.Array, t: jax.Array, b: jax.Array) -> tuple[tuple[jax.Array, Stats], tuple]:
        return forward(x, y, t, b), (x, y, t, b)  # the inputs alone: O(b * E) per device

    def loss_bwd(residuals: tuple, cotangents: tuple[jax.Array, Stats]) -> tuple[jax.Array, ...]:
        g, _ = cotangents  # the stats' cotangents: the stats are metrics, without gradient
        return backward(*residuals, g)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss


def sigmoid_loss_ring(zimg: jax.Array, ztxt: jax.Array, t: jax.Array | float, b: jax.Array | float, mesh: Mesh,
                      axis_name: str | tuple[str, ...] = "data") -> tuple[jax.Array, Stats]:
    """The loss across the devices of `mesh` along `axis_name` (one mesh axis, or several taken together).

    The inputs are global arrays [B, E] (placed or not); the batch is split over the axes (B must be a multiple of
    their total size), each device keeps its b = B / n images and the text shards go round a `ppermute` ring, so
    each device computes one [b, b] block of logits per step and never holds more than b texts, in the backward
    pass too (see `_ring_backward`). Differentiable w.r.t. all four inputs; the result is the same `(loss, stats)`
    as `sigmoid_loss_dense`.
    """
    axes = _axis_names(axis_name)
    missing = [a for a in axes if a not in mesh.shape]
    if not axes or missing:
        raise ValueError(f"axis_name {axis_name!r} names axes {missing} that mesh (axes {dict(mesh.shape)}) lacks")
    x, y, t, b = _prepare(zimg, ztxt, t, b)
    batch = x.shape[0]
    n_dev = int(np.prod([mesh.shape[a] for a in axes]))
    if batch % n_dev:
        raise ValueError(f"zimg batch {batch} (shape {tuple(x.shape)}) must be a multiple of the {n_dev} devices "
                         f"along mesh axes {axes}")
    sharding = NamedSharding(mesh, P(axes))
    # Auto axes take a sharding constraint; Explicit ones (jax.make_mesh's default) must be resharded explicitly.
    axis_types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    place = (jax.sharding.reshard if any(axis_types[a] == jax.sharding.AxisType.Explicit for a in axes)
             else jax.lax.with_sharding_constraint)
    x, y = place(x, sharding), place(y, sharding)
    loss, stats = _ring_loss(mesh, axes, batch, n_dev)(x, y, t, b)
    return loss, {k: stats[k] for k in STAT_NAMES}  # a pytree dict comes back in sorted key order


# ---------------------------------------------------------------------------------------------------------------
# Dispatch


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, t: jax.Array | float, b: jax.Array | float, impl: str = "dense",
                 *, block_size: int = DEFAULT_BLOCK_SIZE, mesh: Mesh | None = None,
                 axis_name: str | tuple[str, ...] = "data") -> tuple[jax.Array, Stats]:
    """The SigLIP sigmoid loss and its stats by implementation name: "dense", "blocked" or "ring" (needs `mesh`)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown sigmoid loss impl {impl!r}; valid: {', '.join(IMPLS)}")
    _check_embeddings(zimg, ztxt)
    if impl == "dense":
        return sigmoid_loss_dense(zimg, ztxt, t, b)
    if impl == "blocked":
        return sigmoid_loss_blocked(zimg, ztxt, t, b, block_size=block_size)
    if mesh is None:
        raise ValueError("impl 'ring' needs a mesh (jax.sharding.Mesh), got mesh=None")
    return sigmoid_loss_ring(zimg, ztxt, t, b, mesh, axis_name=axis_name)


__all__ = ["DEFAULT_BLOCK_SIZE", "IMPLS", "STAT_NAMES", "sigmoid_loss", "sigmoid_loss_blocked",
           "sigmoid_loss_dense", "sigmoid_loss_ring"]
