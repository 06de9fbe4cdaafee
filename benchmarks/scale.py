"""What scanning, rematerialisation and the attention formulation buy at scale, measured from compiled programs
(`jax.jit(step).lower(abstract inputs).compile()`: nothing big is ever allocated, so it runs on a laptop CPU).

    python benchmarks/scale.py            # everything (~10 minutes on 2 cores, most of it the unrolled compile)
    python benchmarks/scale.py --parts remat,presets

Parts (figures are XLA's, for the CPU it runs on; an accelerator's compiler makes other choices):
  compile   compile time of the train step of a 32-layer, d_model 1,024 decoder, layers scanned vs unrolled
  remat     the compiled step's temporary memory at 24 layers, T = 2,048, for each model.remat policy
  attention the compiled step's temporary memory at T = 8,192, chunked vs einsum attention, and both steps' measured
            time at T = 1,024 on this CPU
  presets   per-device parameter + AdamW bytes of the llama3_2_1b and gpt2_medium presets on fsdp=8 and
            fsdp=4 x tensor=2 (from the shardings the rules give, on 8 fake devices)
  param_dtype  llama3_2_1b on fsdp=8 with float32 vs bfloat16 weights (float32 master): the train state's bytes and
            the compiled step's temporaries per device
"""
import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from transformer import sharding  # noqa: E402
from transformer.cli import parse_args  # noqa: E402
from transformer.config import MeshConfig  # noqa: E402
from transformer.train import build_state  # noqa: E402
from transformer.train.step import make_steps  # noqa: E402

GiB = 2**30


def compiled_step(cfg, devices, mesh_cfg: MeshConfig | None = None):
    """The train step compiled for abstract inputs on a mesh of `devices` (data parallel unless `mesh_cfg` says
    otherwise), and the seconds compiling took."""
    mesh = sharding.make_mesh(mesh_cfg or MeshConfig(data=len(devices)), devices)
    graphdef, tx, abstract, shardings, _ = build_state(cfg, mesh)
    step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
    tokens = jax.ShapeDtypeStruct((1, cfg.train.batch_size, cfg.model.max_len), np.int32,
                                  sharding=sharding.batch_sharding(mesh, lead_axes=1))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    lowered = step.lower(state, {"inputs": tokens, "targets": tokens})
    t = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t


def decoder(layers: int, T: int, batch: int = 1, **model):
    cfg, _ = parse_args(["--model.vocab_size=32000", f"--model.n_layers={layers}", "--model.d_model=1024",
                         "--model.n_heads=16", f"--model.max_len={T}", f"--train.batch_size={batch}",
                         "--model.positions=rotary", "--model.matmul_dtype=float32", "--model.dropout=0"])
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def part_compile(devices):
    print("\ncompile: train step of a 32-layer, d_model 1,024 decoder (T = 256, batch 1), one device")
    times = {}
    for scan in (True, False):
        _, times[scan] = compiled_step(decoder(32, 256, scan_layers=scan), devices[:1])
        print(f"  {'scanned ' if scan else 'unrolled'}  {times[scan]:7.1f} s", flush=True)
    print(f"  scanned compiles {times[False] / times[True]:.1f}x faster (target: at least 5x)")


def part_remat(devices):
    print("\nremat: temporary memory of the compiled train step, 24 layers, d_model 1,024, T = 2,048, batch 1, "
          "layers scanned")
    temps = {}
    for policy in ("none", "full", "dots", "dots_no_batch"):
        compiled, secs = compiled_step(decoder(24, 2048, scan_layers=True, remat=policy), devices[:1])
        temps[policy] = compiled.memory_analysis().temp_size_in_bytes
        print(f"  {policy:14s} {temps[policy] / GiB:7.2f} GiB  ({temps[policy] / temps['none']:.2f} of none; "
              f"compiled in {secs:.0f} s)", flush=True)
    print(f"  full / none = {temps['full'] / temps['none']:.3f} (target: at most 1/3)")


def part_attention(devices):
    print("\nattention: 4 layers, d_model 512, 8 heads, batch 1, einsum (xla) vs chunked (tiles of 512)")
    temps = {}
    for form in ("xla", "chunked"):
        cfg = decoder(4, 8192, d_model=512, n_heads=8, attention=form)
        compiled, _ = compiled_step(cfg, devices[:1])
        temps[form] = compiled.memory_analysis().temp_size_in_bytes
        print(f"  T = 8,192 {form:8s} temporaries {temps[form] / GiB:7.2f} GiB", flush=True)
    print(f"  chunked / xla = {temps['chunked'] / temps['xla']:.3f} (target: at most 1/4)")
    for form in ("xla", "chunked"):
        cfg = decoder(4, 1024, d_model=512, n_heads=8, attention=form)
        print(f"  T = 1,024 {form:8s} step {step_seconds(cfg, devices[:1]) * 1e3:7.0f} ms (median of 5, this CPU)",
              flush=True)


def step_seconds(cfg, devices, repeats: int = 5) -> float:
    """The median time of a real train step (random tokens) after a warm-up one."""
    mesh = sharding.make_mesh(MeshConfig(data=len(devices)), devices)
    graphdef, tx, _, shardings, create = build_state(cfg, mesh)
    step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
    state = create()
    x = jax.device_put(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (1, cfg.train.batch_size,
                                                                                  cfg.model.max_len), np.int32),
                       sharding.batch_sharding(mesh, lead_axes=1))
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        state, metrics = step(state, {"inputs": x, "targets": x})
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def part_presets(devices):
    print("\npresets: parameters + AdamW state per device, from the shardings (nothing allocated)")
    for preset, vocab in (("llama3_2_1b", 128_256), ("gpt2_medium", 50_257)):
        cfg, _ = parse_args(["--config", preset, f"--model.vocab_size={vocab}"])
        for name, sizes in {"fsdp=8": (1, 8, 1), "fsdp=4 x tensor=2": (1, 4, 2), "data=8": (8, 1, 1)}.items():
            mesh = sharding.make_mesh(MeshConfig(*sizes), devices)
            _, _, abstract, shardings, _ = build_state(cfg, mesh)
            n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract["params"]))
            per_dev = sharding.bytes_per_device(abstract, shardings)
            print(f"  {preset:12s} {n / 1e9:5.2f}B params  {name:18s} {per_dev / GiB:6.2f} GiB per device")


def part_param_dtype(devices):
    print("\nparam_dtype: llama3_2_1b (T = 2,048, 8 rows a step) on fsdp=8: the train state per device and the "
          "compiled step's temporaries (gradients, gathered weights, activations)")
    for dtype in ("float32", "bfloat16"):
        cfg, _ = parse_args(["--config", "llama3_2_1b", "--model.vocab_size=128256", "--train.batch_size=8",
                             "--train.grad_accum=1", f"--model.param_dtype={dtype}"])
        mesh_cfg = MeshConfig(1, 8, 1)
        _, _, abstract, shardings, _ = build_state(cfg, sharding.make_mesh(mesh_cfg, devices))
        state = sharding.bytes_per_device(abstract, shardings)
        compiled, secs = compiled_step(cfg, devices, mesh_cfg)
        temps = compiled.memory_analysis().temp_size_in_bytes
        print(f"  {dtype:9s} state {state / GiB:5.2f} GiB, temporaries {temps / GiB:6.2f} GiB per device "
              f"(compiled in {secs:.0f} s)", flush=True)


PARTS = {"compile": part_compile, "remat": part_remat, "attention": part_attention, "presets": part_presets,
         "param_dtype": part_param_dtype}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = ap.parse_args()
    devices = jax.devices()
    print(f"{devices[0].platform}, {len(devices)} devices; jax {jax.__version__}")
    for part in args.parts.split(","):
        PARTS[part](devices)


if __name__ == "__main__":
    main()
