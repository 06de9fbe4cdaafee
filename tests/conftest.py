"""8 fake CPU devices so sharding is exercised on any machine; set before jax is imported anywhere.

Compiling dominates this suite's time on a CPU (tiny models, many programs). One persistent compilation cache per
test session, shared with the train.py / sample.py subprocesses through the environment, compiles a program that
several tests (or the in-process and the subprocess side of one test) build only once. XLA's backend optimisation
level 0 compiles these tiny programs much faster and runs them about as fast (test_sampling.py + test_model.py:
64 s -> 42 s; three of the slowest tests: 102 s -> 83 s, on a 2-core VM); the library's own runs keep the default.
"""
import os
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"  # also for the train.py / sample.py subprocesses (one device)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
                           + FAST_COMPILE).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="transformer-tests-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
