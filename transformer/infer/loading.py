"""Load a trained run directory for inference: config, tokenizer and params from one checkpoint, nothing else.
A pretrained model (a Hugging Face directory or a GGUF file, see `convert/`) loads the same way."""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import Future, ThreadPoolExecutor

import jax
from flax import nnx

from transformer import sharding
from transformer.checkpoint import CKPT_DIR, Checkpointer, abstract_like, laid_over
from transformer.config import Config, ConfigError, MeshConfig, first_line
from transformer.convert import is_pretrained, open_pretrained
from transformer.data.tokenizer import Tokenizer, tokenizer_from_json
from transformer.model import abstract_model, cast_params
from transformer.model.layers import DTYPES
from transformer.model.lora import adapter_state
from transformer.model.stack import stack_layers, unstack_layers


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    _params: nnx.State | Future  # a Future while a pretrained model's weights still load (load_run(background=True))
    step: int
    labels: list[str] | None = None  # a classifier's label names (label id i is labels[i])
    _abstract: object = dataclasses.field(default=None, repr=False)  # abstract_params while the weights load

    @property
    def params(self) -> nnx.State:
        if isinstance(self._params, Future):
            self._params = self._params.result()
        return self._params

    @property
    def abstract_params(self):
        """The params as ShapeDtypeStructs with their shardings: enough to compile for, even while they load."""
        if self._abstract is not None:
            return self._abstract
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._params)

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt token ids; text that encodes to nothing becomes BOS (or a newline for a char tokenizer)."""
        ids = self.tokenizer.encode(text).tolist()
        if ids:
            return ids
        return [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else self.tokenizer.encode("\n").tolist()


def load_run(run_dir: str, step: int | None = None, mesh=None, background: bool = False) -> LoadedRun:
    """Restore the params of `step` (default: the latest) onto `mesh` (default: all local devices, data-parallel).
    A pretrained model (a Hugging Face directory, a .gguf file) is imported instead; with `background`, its weights
    are read on a thread and `params` waits for them (a damaged weight is a ConfigError there), so that a caller can
    compile while they load."""
    if not os.path.isdir(os.path.join(run_dir, CKPT_DIR)):
        if is_pretrained(run_dir):
            return _load_pretrained(run_dir, step, mesh, background)
        if not os.path.exists(run_dir):
            raise ConfigError(f"{run_dir} not found: give a run directory, a Hugging Face model directory or a "
                              ".gguf file")
        raise ConfigError(f"{run_dir} is not a run directory (no {CKPT_DIR}/ inside), a Hugging Face model "
                          f"directory or a GGUF file; train one with train.py --train.run_dir={run_dir}")
    ckpt = Checkpointer(run_dir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"no finished checkpoint in {run_dir}; the run may have been stopped before its first "
                              "save")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError(f"no checkpoint for step {step} in {run_dir}; available: {steps}")
        try:
            meta = ckpt.restore_meta(step)
            cfg = Config.from_dict(meta["config"])
            tok = tokenizer_from_json(meta["tokenizer"])
        except ConfigError:
            raise
        except Exception as e:  # a damaged or foreign checkpoint: say which, not how orbax failed
            raise ConfigError(f"checkpoint {step} in {run_dir} is damaged ({type(e).__name__}); "
                              f"try another --step from {steps}") from None
        mesh = mesh or sharding.make_mesh(dataclasses.replace(cfg.mesh, data=-1, fsdp=1, tensor=1))
        abstract = abstract_model(cfg.model)
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        saved = adapter_state(abstract_params) if cfg.lora_base else abstract_params  # LoRA: adapters alone
        try:
            item = "ema" if cfg.optim.ema_decay > 0 else "params"  # the moving average, when the run kept one
            if item == "params":  # in the run's model.param_dtype (a moving average is float32)
                saved = cast_params(saved, DTYPES[cfg.model.param_dtype])
            params = ckpt.restore_params(step, abstract_like(saved, sharding.tree_shardings(saved, mesh)), item)
        except Exception as e:
            raise ConfigError(f"checkpoint {step} in {run_dir} could not be restored ({type(e).__name__}: "
                              f"{first_line(e)[:200]})") from None
    finally:
        ckpt.close()
    if cfg.lora_base:
        params = _over_base(params, cfg.lora_base, abstract_params, mesh, run_dir, cfg.model.scan_layers)
    if cfg.model.scan_layers:  # inference walks the layers one by one (the KV cache is per layer): unrolled
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
        graphdef, unrolled = nnx.split(abstract_model(cfg.model), nnx.Param)
        params = laid_over(unrolled, unstack_layers(nnx.to_pure_dict(params)))
    return LoadedRun(cfg, tok, graphdef, params, step, meta.get("labels"))


def _over_base(adapters: nnx.State, base: str, abstract_params: nnx.State, mesh, run_dir: str,
               stacked: bool) -> nnx.State:
    """A LoRA run's params: its adapters laid over the weights of the base model it was fine-tuned from."""
    try:
        base_params = nnx.to_pure_dict(load_run(base, mesh=mesh).params)
    except ConfigError as e:
        raise ConfigError(f"{run_dir} holds LoRA adapters over the base model {base}, which did not load ({e}); put "
                          "the base model back at that path") from None
    return laid_over(abstract_params, stack_layers(base_params) if stacked else base_params,
                     nnx.to_pure_dict(adapters))


def _load_pretrained(path: str, step: int | None, mesh, background: bool) -> LoadedRun:
    """An imported model as a LoadedRun at step 0, its params laid out on `mesh` like a checkpoint's."""
    if step is not None:
        raise ConfigError(f"{path} is a pretrained model, not a run directory: it has no checkpoint steps (drop "
                          "--step)")
    pre = open_pretrained(path)
    cfg = Config(model=pre.cfg, preset=pre.source).validate()
    mesh = mesh or sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    graphdef, params = nnx.split(abstract_model(pre.cfg), nnx.Param)
    shardings = sharding.tree_shardings(params, mesh)
    abstract = abstract_like(params, shardings)

    def place() -> nnx.State:
        nnx.replace_by_pure_dict(params, pre.params)
        return jax.device_put(params, shardings)

    return LoadedRun(cfg, pre.tokenizer, graphdef, _LOADER.submit(place) if background else place(), 0,
                     _abstract=abstract)


_LOADER = ThreadPoolExecutor(1, thread_name_prefix="load-weights")
