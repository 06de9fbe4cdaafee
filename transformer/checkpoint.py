"""Orbax checkpoints of a run, three or four items per step: `params`, `train` (optimizer state, step, RNG), a JSON
`meta` holding the resolved config, the tokenizer and the data-iterator state, and `ema` (the weights' moving average)
when the run keeps one. One checkpoint directory is self-contained, and sampling restores one set of weights alone.

Keeps the latest `keep` checkpoints and, in addition, the best one by validation loss, over every step in the
directory whichever process wrote it: a step's val loss is saved with it (its `metrics` item), so a resumed run still
knows the best. Orbax writes each step to a temporary directory and renames it when complete, so an interrupted save
never shadows the last good checkpoint; the next writer removes such leftovers.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from transformer.config import ConfigError
from transformer.files import write_json_atomic

CKPT_DIR = "checkpoints"
WEIGHT_ITEMS = ("params", "ema")  # saved as their own items, so inference restores one set of weights alone
CONFIG_FILE = "config.json"


def _val_loss(metrics: dict) -> float:
    return metrics["val_loss"]


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 3, *, read_only: bool = False):
        directory = os.path.abspath(os.path.join(run_dir, CKPT_DIR))
        # On start orbax lists the steps already in the directory with the metrics it reads back from each one. Two
        # settings make that cover steps an earlier (killed or finished) process wrote:
        # - `best_fn` is what makes orbax write a step's metrics at all (a `preservation_policy` alone never does);
        # - BestN keeps steps without metrics unless told not to, so those older steps (and saves with no evaluation,
        #   such as the one on SIGTERM) were kept forever: every restart leaked up to `keep` + 1 checkpoints.
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=_val_loss, reverse=True, n=1,  # reverse: lower is better
                     keep_checkpoints_without_metrics=False),
        ])
        if not read_only and jax.process_index() == 0:
            _remove_unfinished_saves(directory)
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_val_loss, best_mode="min",
                                               create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=not read_only)
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_names=("params", "train", "meta", "ema"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, val_loss: float | None = None) -> None:
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        train = {k: v for k, v in state.items() if k not in WEIGHT_ITEMS}
        items = {k: ocp.args.StandardSave(state[k]) for k in WEIGHT_ITEMS if k in state}
        self.manager.save(step, args=ocp.args.Composite(train=ocp.args.StandardSave(train),
                                                        meta=ocp.args.JsonSave(meta), **items),
                          metrics=metrics, force=True)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStructs), whatever mesh saved it."""
        train = {k: v for k, v in abstract_state.items() if k not in WEIGHT_ITEMS}
        items = {k: ocp.args.StandardRestore(abstract_state[k]) for k in WEIGHT_ITEMS if k in abstract_state}
        out = self.manager.restore(step, args=ocp.args.Composite(
            train=ocp.args.StandardRestore(train), meta=ocp.args.JsonRestore(), **items))
        return {**{k: out[k] for k in items}, **out.train}, out.meta

    def restore_params(self, step: int, abstract_params, item: str = "params"):
        """One set of weights: the trained `params`, or their moving average `ema` when the run kept one."""
        return self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(abstract_params)}))[item]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _remove_unfinished_saves(directory: str) -> None:
    """A process killed mid-save leaves a temporary step directory that no step listing (so no policy) sees. Done
    here, before any save, rather than by orbax's `cleanup_tmp_directories`: that runs in a thread which a quick
    exit (a config error) cuts off at interpreter shutdown, printing a traceback. Readers never do it: they may be
    looking at a run that is still saving."""
    for tmp in ocp.path.step.all_temporary_paths(directory):
        shutil.rmtree(tmp.get(), ignore_errors=True)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with target shardings: what `restore` places the saved arrays onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_run_config(run_dir: str, config: dict) -> None:
    write_json_atomic(os.path.join(run_dir, CONFIG_FILE), config, indent=2, sort_keys=True)


def read_run_config(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); the run directory is damaged") from None


def laid_over(state, *sources: dict):
    """An nnx State (params, abstract or concrete) with the leaves of each pure dict in `sources` laid over it in
    turn wherever the paths match (`overlay`); returns the State, updated in place."""
    pure = nnx.to_pure_dict(state)
    for src in sources:
        overlay(pure, src)
    nnx.replace_by_pure_dict(state, pure)
    return state


def overlay(dst: dict, src: dict) -> None:
    """dst's leaves replaced by src's wherever src has the same path."""
    for k, v in src.items():
        if k in dst:
            if isinstance(v, dict) and isinstance(dst[k], dict):
                overlay(dst[k], v)
            else:
                dst[k] = v
