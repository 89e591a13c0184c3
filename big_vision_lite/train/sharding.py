"""Device mesh and sharding rules shared by every training task (big_vision style).

The mesh has two axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (parameters, gradients and
optimizer state sharded, batch sharded too). A batch is always split over both axes, so every device sees
`global_batch / num_devices` examples. Parameters are placed by a table of `(regex, rule)` pairs matched in order
(`re.search`) against their name, the '/'-joined path inside the params tree (`img/Transformer/encoderblock_0/
MlpBlock_0/Dense_0/kernel`); the first match wins and unmatched parameters are replicated. Optimizer state that
mirrors a parameter (Adam's moments) is named after that parameter, so it is placed exactly like it; other state
(step counts, the rng) is named by its path in the state. A rule is:

* `"fsdp"`: shard the parameter's largest axis that the `fsdp` axis size divides (replicate if none does);
* `"replicate"`: a full copy on every device;
* a tuple of mesh-axis names or None, one per array axis: an explicit `PartitionSpec`.

The same code runs on one device (a 1x1 mesh) and on many; only the mesh shape changes.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from big_vision_lite.utils.trees import path_name

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch axis of inputs and activations is split over every device

Rule = tuple[str, str | tuple[str | None, ...]]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data x fsdp` mesh over `devices` (default: all); -1 means "all devices left over"."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if fsdp < 1 or count % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {count} devices")
    if data == -1:
        data = count // fsdp
    if data * fsdp != count:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {count} are available")
    # Auto axes: jit inserts the collectives; JAX >= 0.10 would otherwise default to explicit sharding types.
    return Mesh(np.asarray(devices).reshape(data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    if fsdp_size == 1:
        return P()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):  # the largest axis first
        if shape[axis] >= fsdp_size and shape[axis] % fsdp_size == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def spec_for(name: str, shape: tuple[int, ...], rules: Sequence[Rule], mesh: Mesh) -> P:
    """The PartitionSpec the first matching rule gives the parameter `name` of `shape`."""
    for pattern, rule in rules:
        if not re.search(pattern, name):
            continue
        if rule == "fsdp":
            return _fsdp_spec(shape, mesh.shape["fsdp"])
        if rule == "replicate":
            return P()
        if isinstance(rule, str):
            raise ValueError(f"sharding rule {pattern!r}: unknown rule {rule!r} (use 'fsdp', 'replicate' or a tuple)")
        if len(rule) != len(shape):
            raise ValueError(f"sharding rule {pattern!r} -> {rule} has {len(rule)} axes, parameter {name} has "
                             f"shape {shape}")
        return P(*rule)
    return P()


def rule_name(path: str, param_names: frozenset[str]) -> str:
    """The name rules match for the leaf at `path` of a training state: the parameter it is or mirrors (the
    longest tail of its path that names a parameter, e.g. `opt_state/1/0/mu/img/head/kernel` -> `img/head/kernel`),
    else the path itself."""
    parts = path.split("/")
    return next(("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in param_names), path)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule]) -> Any:
    """A `NamedSharding` for every array leaf of `tree`: a params tree, or a training state holding one under
    `params` (its other leaves follow the parameters they mirror, see `rule_name`)."""
    params = tree["params"] if isinstance(tree, dict) and "params" in tree else tree
    param_names = frozenset(path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))

    def leaf_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        name = rule_name(path_name(path), param_names)
        return NamedSharding(mesh, spec_for(name, tuple(np.shape(leaf)), rules, mesh))
    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device, the other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch (arrays, or pytrees of them such as NaFlex images) on the mesh as global arrays. With
    several processes, `batch` holds this process's rows only (`distributed.process_rows`) and the global batch
    has process-count times as many; the global batch size must be a multiple of the device count."""
    devices, processes = mesh.devices.size, jax.process_count()
    sharding = batch_sharding(mesh)

    def place(path: tuple[Any, ...], value: Any) -> jax.Array:
        rows = np.shape(value)[0] * processes
        if rows % devices:
            raise ValueError(f"batch{jax.tree_util.keystr(path)} has {rows} rows in all, not a multiple of the "
                             f"{devices} devices")
        return jax.make_array_from_process_local_data(sharding, np.asarray(value), (rows, *np.shape(value)[1:]))
    return jax.tree_util.tree_map_with_path(place, batch)


def constrain_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Activation constraint inside jit: keep `x`'s leading axis split like the batch."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
