"""Joining a multi-process run (TPU pod slices, multi-node GPU, or several processes on one host).

JAX is multi-controller: every host runs the same `train.py` and owns only its local devices. `initialize()` must run
before anything touches a device; it is a no-op for an ordinary single-process run.
"""
from __future__ import annotations

import os


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def multi_process_env() -> bool:
    """True when the environment describes more than one process: an explicit coordinator (JAX_COORDINATOR_ADDRESS),
    a multi-host TPU slice, or a SLURM / Open MPI job with several tasks."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or _int_env("SLURM_NTASKS") > 1
                or _int_env("OMPI_COMM_WORLD_SIZE") > 1)


def use_cpu_devices(n: int) -> None:
    """Run the CPU backend as `n` devices (0: leave JAX's default). Must come before anything touches a device; an
    explicit XLA_FLAGS=--xla_force_host_platform_device_count, or a backend already started, wins."""
    if n <= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend is already up (e.g. called twice in one process): keep its devices
        pass


def initialize() -> None:
    """Call `jax.distributed.initialize()` when started as one of several processes.

    With JAX_COORDINATOR_ADDRESS set, JAX_NUM_PROCESSES and JAX_PROCESS_ID give the rest (any launcher works);
    on TPU, SLURM and Open MPI, JAX detects everything itself.
    """
    if not multi_process_env():
        return
    import jax

    # Collectives between processes on CPU (tests, CPU clusters) go over gloo; accelerators use their own links.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {"num_processes": _int_env("JAX_NUM_PROCESSES"), "process_id": int(os.environ.get("JAX_PROCESS_ID",
                                                                                                    "0"))}
    jax.distributed.initialize(**kwargs)
