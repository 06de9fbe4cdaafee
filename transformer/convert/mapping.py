"""Name-mapping tables between our parameters and a checkpoint's tensors, read in both directions.

A family (convert/llama.py, convert/gpt2.py) lists `Entry`s: one parameter of ours (a path into the params tree), the
checkpoint tensor(s) it is made of, their shapes there, and how the layouts differ:

- "linear": a torch `nn.Linear` weight, stored [out, in]; ours is [in, *out] (e.g. D x N x H).
- "plain": the same row-major data in another shape (norm scales, embedding tables, GPT-2's Conv1D [in, out]).

Several tensors that one of our fused weights holds (q, k, v; gate, up) are stacked along `axis`. Importing checks
every tensor is there with the shape the config implies and that none is left over; exporting is the same table read
backwards, so a round trip reproduces the tensors bit for bit.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import numpy as np

from transformer.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: tuple[str | int, ...]  # path into the params tree, e.g. ("blocks", 0, "attn", "w_qkv_DCNH")
    names: tuple[str, ...]  # the checkpoint's tensor names
    shapes: tuple[tuple[int, ...], ...]  # their shapes there
    kind: Literal["linear", "plain"] = "plain"
    axis: int = 1  # where several tensors stack in ours


def entry(ours, names, shapes, kind="plain", axis=1) -> Entry:
    names = (names,) if isinstance(names, str) else tuple(names)
    shapes = (shapes,) if isinstance(shapes[0], int) else tuple(shapes)
    return Entry(tuple(ours), names, tuple(tuple(s) for s in shapes), kind, axis)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _part_shape(shape: tuple[int, ...], n: int, axis: int) -> tuple[int, ...]:
    return shape if n == 1 else shape[:axis] + shape[axis + 1:]


def import_tensors(table: list[Entry], tensors: dict[str, np.ndarray], target_shapes: dict, *,
                   ignored: Callable[[str], bool] = lambda name: False, what: str = "checkpoint") -> dict:
    """Our params (a nested dict of float32 arrays) from `tensors`, by `table`. `target_shapes` is the params tree of
    the model (anything with .shape at the leaves). Tensors `ignored` says yes to (buffers such as rotary inv_freq
    or a causal-mask constant) may be present; any other tensor the table does not use is an error, as is a
    missing or misshapen one."""
    out: dict = {}
    used = set()
    for e in table:
        parts = []
        for name, shape in zip(e.names, e.shapes):
            if name not in tensors:
                raise ConfigError(f"{what}: tensor {name!r} is missing (the config implies it)")
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ConfigError(f"{what}: tensor {name!r} has shape {tuple(t.shape)}, the config implies {shape}")
            used.add(name)
            parts.append(np.asarray(t, np.float32))
        target = tuple(_get(target_shapes, e.ours).shape)
        part_shape = _part_shape(target, len(parts), e.axis)
        parts = [(p.T if e.kind == "linear" else p).reshape(part_shape) for p in parts]
        value = parts[0] if len(parts) == 1 else np.stack(parts, axis=e.axis)
        _set(out, e.ours, np.ascontiguousarray(value, np.float32))
    left = sorted(n for n in tensors if n not in used and not ignored(n))
    if left:
        raise ConfigError(f"{what}: {len(left)} tensor(s) the config does not account for, e.g. {left[0]!r} "
                          f"(shape {tuple(tensors[left[0]].shape)})")
    return out


def export_tensors(table: list[Entry], params) -> dict[str, np.ndarray]:
    """The checkpoint's tensors (float32, C-contiguous) from our params tree, by the same `table`."""
    out = {}
    for e in table:
        value = np.asarray(_get(params, e.ours), np.float32)
        parts = [value] if len(e.names) == 1 else [np.take(value, i, axis=e.axis) for i in range(len(e.names))]
        for name, shape, part in zip(e.names, e.shapes, parts):
            if e.kind == "linear":
                part = part.reshape(shape[1], shape[0]).T
            out[name] = np.ascontiguousarray(part.reshape(shape))
    return out


@dataclasses.dataclass
class Pretrained:
    """What an importer yields: the model config, its params (a nested dict of float32 numpy arrays shaped like
    `nnx.split(build_model(cfg), nnx.Param)`), the tokenizer, and the format it came from."""
    cfg: object  # ModelConfig
    params: dict
    tokenizer: object  # HFTokenizer
    source: str  # e.g. "hf:llama", "gguf:llama"


def check_complete(params: dict, target) -> None:
    """Every param of the model filled, each with its shape (a family table that misses one is a bug here)."""
    import jax

    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    assert got == want, (sorted(set(want) ^ set(got)), [k for k in got if k in want and got[k] != want[k]])
