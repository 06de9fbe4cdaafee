"""Per-device bytes of parameters + optimizer state under different meshes (8 devices; fake CPU ones by default).

    python benchmarks/sharding_memory.py [--config gpt2_small] [--compile-config shakespeare_char]

Two measurements, both per device (device 0):
  1. the train state's shard sizes, from the shardings the rules give each weight (an abstract state: nothing is
     allocated, so GPT-2 small's 124M parameters are fine on a laptop);
  2. the compiled train step's memory analysis (arguments, outputs, temporaries) for a smaller preset, which XLA
     reports per device.
FSDP should hold about 1/8 of what data parallelism holds.
"""
import argparse
import os
import sys
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

MESHES = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "data=2 x fsdp=4": (2, 4, 1), "fsdp=4 x tensor=2": (1, 4, 2),
          "tensor=8": (1, 1, 8)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="gpt2_small")
    ap.add_argument("--compile-config", default="shakespeare_char")
    args = ap.parse_args()
    n = jax.device_count()
    if n < 8:
        sys.exit(f"needs 8 devices, found {n}")
    devices = jax.devices()[:8]
    print(f"{devices[0].platform}, 8 devices")

    cfg, _ = parse_args(["--config", args.config, "--model.vocab_size=50304"])
    print(f"\n{args.config}: parameters + AdamW state per device (from the shardings, nothing allocated)")
    base = None
    for name, sizes in MESHES.items():
        mesh = sharding.make_mesh(MeshConfig(*sizes), devices)
        _, _, abstract, shardings, _ = build_state(cfg, mesh)
        per_dev = sharding.bytes_per_device(abstract, shardings)
        base = base or per_dev
        print(f"  {name:18s} {per_dev / 2**20:9.1f} MiB   {per_dev / base:.3f} of data=8")

    cfg, _ = parse_args(["--config", args.compile_config, "--model.vocab_size=64", "--train.batch_size=16"])
    print(f"\n{args.compile_config}: compiled train step, per device (XLA memory analysis)")
    base = None
    for name, sizes in MESHES.items():
        mesh = sharding.make_mesh(MeshConfig(*sizes), devices)
        graphdef, tx, abstract, shardings, _ = build_state(cfg, mesh)
        step, _ = make_steps(graphdef, tx, cfg, mesh, shardings)
        tokens = jax.ShapeDtypeStruct((1, cfg.train.batch_size, cfg.model.max_len), np.int32,
                                      sharding=sharding.batch_sharding(mesh, lead_axes=1))
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        mem = step.lower(state, {"inputs": tokens, "targets": tokens}).compile().memory_analysis()
        args_b = mem.argument_size_in_bytes
        base = base or args_b
        print(f"  {name:18s} arguments {args_b / 2**20:7.2f} MiB ({args_b / base:.3f} of data=8), "
              f"outputs {mem.output_size_in_bytes / 2**20:7.2f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:7.2f}"
              " MiB")


if __name__ == "__main__":
    main()
