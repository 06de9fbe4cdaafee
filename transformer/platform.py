"""The fast path on this machine, for the config fields left on "auto" (`mesh.cpu_devices`, `model.matmul_dtype`).

Both choices only change how the same mathematics runs, never the parameters, so a run may resume on a machine that
resolves them differently. On a CPU they are taken together, by the one feature that separated the two machine kinds
measured with the 0.8M-parameter baby GPT (`python train.py`, tokens/s after warm-up; README "Fast defaults"):
- a 2-core x86 VM with AVX512-BF16: the host split into 2 XLA devices, each training on half of every batch, ran
  at 31k tokens/s against 18k as one device (XLA:CPU spreads a small model's ops over the cores poorly), and bf16
  matmul inputs (float32 accumulation) added 15-20%;
- a 2-vCPU AMD EPYC VM with AVX2 only: the split was ~10% slower (7.7k vs 8.5k) and bf16 inputs ~15% slower (XLA
  converts them, no bf16 dot instructions), so one device in float32 is its fast path.
So "auto" splits a CPU host into 2 devices (when the batch divides) and feeds bf16 to the matmuls only where the CPU
multiplies bf16 natively (AVX512-BF16 or AMX). Bigger hosts were not measured: set the fields yourself there. On
accelerators the activation dtype (model.dtype) decides the matmul inputs, so "auto" means float32 there, and the CPU
is left as one device.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

from transformer.config import Config

AUTO_CPU_DEVICES = 2
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def accelerator_installed() -> bool:
    """Whether JAX will find a GPU / TPU backend (a plugin is installed and JAX_PLATFORMS does not pin the CPU),
    known without starting any backend: the CPU split must be decided before that."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("", "cpu")
    return any(importlib.util.find_spec(m) is not None for m in ACCELERATOR_MODULES)


def auto_cpu_devices(batch_rows: int, cores: int | None = None, bf16_cpu: bool | None = None) -> int:
    """How many XLA devices to split a CPU host into: AUTO_CPU_DEVICES on a CPU with native bf16 where the cores and
    the batch allow, else 1; 0 (JAX's default) when the run will be on an accelerator."""
    if accelerator_installed() or not (cpu_has_bf16() if bf16_cpu is None else bf16_cpu):
        return 0
    cores = os.cpu_count() if cores is None else cores
    n = min(AUTO_CPU_DEVICES, cores or 1)
    while batch_rows % n:
        n -= 1
    return n


def auto_matmul_dtype(platform: str, bf16_cpu: bool | None = None) -> str:
    if platform == "cpu":
        return "bfloat16" if (cpu_has_bf16() if bf16_cpu is None else bf16_cpu) else "float32"
    return "float32"


def resolve(cfg: Config) -> Config:
    """`cfg` with its "auto" fields decided for this machine. Splits the CPU backend first (before any device
    query), then looks at the platform the run will use."""
    from transformer import distributed

    mesh, model = cfg.mesh, cfg.model
    if mesh.cpu_devices < 0:
        mesh = dataclasses.replace(mesh, cpu_devices=auto_cpu_devices(cfg.train.batch_size))
    distributed.use_cpu_devices(mesh.cpu_devices)
    if model.matmul_dtype == "auto":
        import jax

        model = dataclasses.replace(model, matmul_dtype=auto_matmul_dtype(jax.default_backend()))
    return dataclasses.replace(cfg, mesh=mesh, model=model)
