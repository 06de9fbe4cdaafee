"""The layers of a model stored stacked (model.scan_layers): one Block whose weights carry a leading layer axis,
run by a scan, so that XLA compiles one block body and the optimizer updates one array per kind of weight instead
of one per layer: compile time stops growing with depth.

A `Stack` reads like the list of blocks it replaces: `len()` and iteration give each layer as a Block of its own
(its weights sliced out), which is how decoding with a KV cache and looking inside a model walk the layers.
`stack_layers` / `unstack_layers` convert a params tree (pure dicts) between the two layouts: runs load for
inference unrolled, and `train.init_from` lays any source over either layout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_KEYS = ("blocks", "enc_blocks", "dec_blocks")  # where the model families keep their layers
STACKED = "layers"  # the Stack's one Block, whose weights are (L, ...)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_values(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):  # an abstract model (shapes only)
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    return jnp.stack(xs)


class Stack(nnx.Module):
    """Blocks that share one structure, stored as one Block with a leading layer axis on every weight (logical axis
    "layers", never sharded)."""

    def __init__(self, blocks: list):
        graphdef = nnx.split(blocks[0])[0]

        def stacked(*vs):
            axes = vs[0].get_metadata().get("logical_axes")
            return vs[0].replace(_stack_values(*(v.get_value() for v in vs)),
                                 logical_axes=None if axes is None else ("layers", *axes))

        states = [nnx.split(b)[1] for b in blocks]
        self.n = len(blocks)
        setattr(self, STACKED, nnx.merge(graphdef, jax.tree.map(stacked, *states, is_leaf=_is_variable)))

    def split(self):
        """(graphdef of one layer, the stacked state): what a scan over the layers takes."""
        return nnx.split(getattr(self, STACKED))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        graphdef, state = self.split()
        for i in range(self.n):
            yield nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))


def stack_layers(tree: dict) -> dict:
    """A pure-dict params tree with its layers unrolled ({"blocks": {0: ..., 1: ...}}, at any depth) in the stacked
    layout ({"blocks": {"layers": ...}}); layers already stacked stay as they are."""
    def convert(key, sub):
        if key in LAYER_KEYS and sub and STACKED not in sub:
            return {STACKED: jax.tree.map(lambda *xs: jnp.stack(xs), *(sub[i] for i in sorted(sub, key=int)))}
        return stack_layers(sub)
    return {k: convert(k, v) if isinstance(v, dict) else v for k, v in tree.items()}


def unstack_layers(tree: dict) -> dict:
    """The inverse of `stack_layers`; layers already unrolled stay as they are."""
    def convert(key, sub):
        if key in LAYER_KEYS and STACKED in sub:
            n = jax.tree.leaves(sub[STACKED])[0].shape[0]
            return {i: jax.tree.map(lambda a, i=i: a[i], sub[STACKED]) for i in range(n)}
        return unstack_layers(sub)
    return {k: convert(k, v) if isinstance(v, dict) else v for k, v in tree.items()}
