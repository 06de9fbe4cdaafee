"""Device mesh and the one table that maps logical axis names to mesh axes.

Modules name the logical axes of their weights (`layers.param(..., axes)`); nothing outside this file knows the
mesh axis names. The same code runs on one CPU device (every axis has size 1) and on a pod slice.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes); None = replicated. Weights use the first group, activations the "act_" group:
# FSDP shards a weight's embed axis but an activation's batch, so the two need different names.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",  # key/value heads of grouped-query attention (replicated where tensor does not divide them)
    "mlp": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "layers": None,  # the leading axis of stacked layers (model.scan_layers): every device holds all layers' shards
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
}

ACT_BTD = ("batch", "length", "act_embed")  # the residual stream between blocks

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("transformer_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
    """While tracing a step under this context, `constrain` pins activations onto `mesh`."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def is_partitioned() -> bool:
    """True while tracing a step whose activations are spread over several devices."""
    mesh = _ACTIVE_MESH.get()
    return mesh is not None and mesh.size > 1


def data_only_mesh() -> Mesh | None:
    """The traced step's mesh when it splits only the batch (every device holds every weight whole), else None."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1 or mesh.shape["data"] != mesh.size:
        return None
    return mesh


def constrain(x, axes: tuple[str | None, ...]):
    """Sharding constraint on an activation by logical axes (used at block boundaries). Outside `activation_mesh`
    (plain eager calls, one-device unit tests) it returns x unchanged."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fit(logical_to_spec(axes), x.shape, mesh)))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch rows are split: the data x fsdp axes."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def one_cpu_device(tree):
    """`tree` copied onto one device when it is replicated over the devices of a split CPU host (mesh.cpu_devices):
    those devices share the same cores, and step-by-step decoding of a batch runs faster on one of them than
    repeated on each. Anything else (one device, accelerators, sharded weights) is returned as it is."""
    leaves = jax.tree.leaves(tree)
    if not leaves or not all(isinstance(x, jax.Array) for x in leaves):
        return tree
    devices = leaves[0].sharding.device_set
    if len(devices) == 1 or next(iter(devices)).platform != "cpu" or jax.process_count() > 1:
        return tree
    if not all(x.sharding.is_fully_replicated for x in leaves):
        return tree
    return jax.device_put(tree, min(devices, key=lambda d: d.id))


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError("only one of mesh.data / mesh.fsdp / mesh.tensor may be -1")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise ConfigError(f"mesh sizes must be positive or -1, got {sizes}")
    if free:
        if len(devices) % fixed:
            raise ConfigError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of size {fixed}")
        sizes[free[0]] = len(devices) // fixed
    need = math.prod(sizes.values())
    if need > len(devices) or (need < len(devices) and (free or jax.process_count() > 1)):
        raise ConfigError(f"mesh {sizes} needs {need} devices but {len(devices)} are present; "
                          "set one axis to -1 to use the rest")
    devices = devices[:need]  # one process may run on fewer devices than it has (e.g. --mesh.data=1)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes) -> P:
    return P(*(RULES.get(a) if a is not None else None for a in axes))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Leave replicated every dimension that its mesh axes do not divide evenly (e.g. 4 heads on tensor=8)."""
    out = []
    for dim, axis in zip(shape, spec):
        names = (axis,) if isinstance(axis, str) else (axis or ())
        size = math.prod(mesh.shape[n] for n in names)
        out.append(axis if names and dim % size == 0 else None)
    return P(*out)


def _spec_for(leaf, mesh: Mesh) -> P:
    """Partition spec of a weight from its logical axes."""
    axes = leaf.get_metadata().get("logical_axes") if _is_variable(leaf) else None
    if axes is None:
        return P()
    return _fit(logical_to_spec(axes), leaf.shape, mesh)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments) and plain arrays (replicated)."""
    def f(leaf):
        spec = _spec_for(leaf, mesh)
        return leaf.replace(NamedSharding(mesh, spec)) if _is_variable(leaf) else NamedSharding(mesh, spec)
    return jax.tree.map(f, tree, is_leaf=_is_variable)


def bytes_per_device(tree, shardings) -> int:
    """The bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`."""
    return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def mesh_of(tree) -> Mesh | None:
    """The mesh that a pytree of arrays (e.g. restored params) is laid out on, or None if not on a NamedSharding."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def rows_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Leading axis over data x fsdp where it divides evenly (e.g. a batch of prompts), the rest replicated."""
    return NamedSharding(mesh, _fit(P(RULES["batch"]), shape[:1], mesh))


def batch_sharding(mesh: Mesh, lead_axes: int = 0) -> NamedSharding:
    """Batch axis (after `lead_axes` whole axes, e.g. the gradient-accumulation one) split over data x fsdp."""
    return NamedSharding(mesh, P(*(None,) * lead_axes, RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_rows(batch: NamedSharding, global_shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """The [lo, hi) range of `axis` that this process's devices hold: the only rows it needs to read."""
    slices = [idx[axis] for idx in batch.addressable_devices_indices_map(tuple(global_shape)).values()]
    lo = min(s.start or 0 for s in slices)
    hi = max(global_shape[axis] if s.stop is None else s.stop for s in slices)
    return lo, hi


def put_batch(local: np.ndarray, batch: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """A global batch array from this process's rows (every process passes its own `local_rows`)."""
    return jax.make_array_from_process_local_data(batch, local, global_shape)
