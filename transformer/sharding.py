"""Device mesh and the one table that maps logical axis names to mesh axes.

Modules name the logical axes of their weights (`layers.param(..., axes)`); nothing outside this file knows the
mesh axis names. The same code runs on one CPU device (every axis has size 1) and on a pod slice.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from transformer.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes); None = replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "length": None,
}


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
    if math.prod(sizes.values()) != len(devices):
        raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are present; "
                          "set one axis to -1 to use the rest")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes) -> P:
    return P(*(RULES.get(a) if a is not None else None for a in axes))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _spec_for(leaf, mesh: Mesh) -> P:
    """Partition spec of a weight from its logical axes, leaving axes that the mesh does not divide replicated."""
    axes = leaf.get_metadata().get("logical_axes") if _is_variable(leaf) else None
    if axes is None:
        return P()
    shape = leaf.shape
    spec = []
    for dim, axis in zip(shape, logical_to_spec(axes)):
        names = (axis,) if isinstance(axis, str) else (axis or ())
        size = math.prod(mesh.shape[n] for n in names)
        spec.append(axis if names and dim % size == 0 else None)
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments) and plain arrays (replicated)."""
    def f(leaf):
        spec = _spec_for(leaf, mesh)
        return leaf.replace(NamedSharding(mesh, spec)) if _is_variable(leaf) else NamedSharding(mesh, spec)
    return jax.tree.map(f, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch split over data x fsdp; with gradient accumulation the leading micro-batch axis stays whole."""
    lead = (None,) * (ndim - 2)
    return NamedSharding(mesh, P(*lead, RULES["batch"], None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
