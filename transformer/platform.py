"""The fast path on this machine, for the config fields left on "auto" (`mesh.cpu_devices`, `model.matmul_dtype`).

Both choices only change how the same mathematics runs, never the parameters, so a run may resume on a machine that
resolves them differently. On a CPU both were first decided by the one feature that separated the two machine kinds
measured with the 0.8M-parameter baby GPT (`python train.py`, tokens/s after warm-up; README "Fast defaults"):
- a 2-core x86 VM with AVX512-BF16: the host split into 2 XLA devices, each training on half of every batch, ran
  at 31k tokens/s against 18k as one device (XLA:CPU spreads a small model's ops over the cores poorly), and bf16
  matmul inputs (float32 accumulation) added 15-20%;
- a 2-vCPU AMD EPYC VM with AVX2 only: the split was ~10% slower (7.7k vs 8.5k) and bf16 inputs ~15% slower (XLA
  converts them, no bf16 dot instructions), so one device in float32 is its fast path.
The split is fast but not safe: the devices of a split host meet at every gradient all-reduce in one process, and
XLA:CPU (jaxlib 0.10.2) sometimes never brings the second one there. On the AVX512-BF16 VM, 700-step runs of the
default model on 2 devices hung at the all-reduce in 1 of 10 runs alone on the machine (with a 600 s timeout) and
aborted (XLA's 40 s timeout, SIGABRT) in 3 of 5 and 4 of 6 runs with a second such run on the cores; a run of
bert_mlm_tiny next to the test suite died the same way. One device has no such rendezvous. So "auto" leaves the CPU
as one device everywhere, and feeds bf16 to the matmuls only where the CPU multiplies bf16 natively (AVX512-BF16 or
AMX); a user who wants the ~1.8x of the split on such a machine asks for it (--mesh.cpu_devices=2) and takes the
risk. On accelerators the activation dtype (model.dtype) decides the matmul inputs, so "auto" means float32 there.
"""
from __future__ import annotations

import dataclasses

from transformer.config import Config

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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


def auto_cpu_devices() -> int:
    """How many XLA devices "auto" splits a CPU host into: 0 (JAX's default, one device) -- see the module docstring
    for why the faster 2-device split is opt-in."""
    return 0


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
        mesh = dataclasses.replace(mesh, cpu_devices=auto_cpu_devices())
    distributed.use_cpu_devices(mesh.cpu_devices)
    import jax

    if model.matmul_dtype == "auto":
        model = dataclasses.replace(model, matmul_dtype=auto_matmul_dtype(jax.default_backend()))
    check_attention(model.attention, jax.devices()[0])
    return dataclasses.replace(cfg, mesh=mesh, model=model)


def check_attention(attention: str, device) -> None:
    """model.attention=cudnn only where cuDNN runs: an NVIDIA GPU."""
    from transformer.config import ConfigError

    if attention == "cudnn" and (device.platform != "gpu" or "nvidia" not in device.client.platform_version.lower()
                                 and "cuda" not in device.client.platform_version.lower()):
        raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU; this run's devices are {device.platform} "
                          f"({device.device_kind}): use model.attention=xla or chunked")
