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

import contextlib
import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
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
    used = set()
    for e in table:  # every tensor checked first, so an error names the first bad one in table order
        for name, shape in zip(e.names, e.shapes):
            if name not in tensors:
                raise ConfigError(f"{what}: tensor {name!r} is missing (the config implies it)")
            if tuple(tensors[name].shape) != shape:
                raise ConfigError(f"{what}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the config "
                                  f"implies {shape}")
            used.add(name)

    def laid_out(e: Entry) -> np.ndarray:
        target = tuple(_get(target_shapes, e.ours).shape)
        part_shape = _part_shape(target, len(e.names), e.axis)
        parts = [np.asarray(tensors[name], np.float32) for name in e.names]
        parts = [(p.T if e.kind == "linear" else p).reshape(part_shape) for p in parts]
        value = parts[0] if len(parts) == 1 else np.stack(parts, axis=e.axis)
        return np.ascontiguousarray(value, np.float32)

    out: dict = {}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # strided copies; numpy releases the GIL for them
        for e, value in zip(table, pool.map(laid_out, table)):
            _set(out, e.ours, value)
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
    """What an importer yields: the model config, the tokenizer, the format it came from, and the params (a nested
    dict of float32 numpy arrays shaped like `nnx.split(build_model(cfg), nnx.Param)`). Reading and laying out the
    weights is the slow part: `read_params` does it when `params` is first asked for, so a caller can compile for the
    config while they load."""
    cfg: object  # ModelConfig
    tokenizer: object  # HFTokenizer
    source: str  # e.g. "hf:llama", "gguf:llama"
    read_params: Callable[[], dict]

    @functools.cached_property
    def params(self) -> dict:
        with _small_pages():
            return self.read_params()


@contextlib.contextmanager
def _small_pages():
    """numpy asks the kernel for transparent huge pages for every large array. Where the kernel compacts memory to
    find them on request (transparent_hugepage/defrag = madvise, a common default), the first fresh arrays of an
    import stall in compaction: SmolLM2's weights took 1.1-2.2 s to lay out that way and 0.2-0.3 s on small pages."""
    set_hugepage = getattr(np._core.multiarray, "_set_madvise_hugepage", None)  # numpy's own switch (private)
    if set_hugepage is None:
        yield
        return
    before = set_hugepage(False)
    try:
        yield
    finally:
        set_hugepage(before)


def check_complete(params: dict, target) -> None:
    """Every param of the model filled, each with its shape (a family table that misses one is a bug here)."""
    import jax

    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    assert got == want, (sorted(set(want) ^ set(got)), [k for k in got if k in want and got[k] != want[k]])
