"""Throughput: real tokens per second, and the model FLOP utilisation they amount to."""
from __future__ import annotations

import contextlib
import time

import jax

from transformer.config import Config


def flops_per_token(cfg: Config, n_params: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 N for the weights plus 12 L T D for attention scores."""
    m = cfg.model
    n_nonembed = n_params - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 0)
    n_nonembed -= m.max_len * m.d_model if m.positions == "learned" else 0
    # The tied unembedding is a real matmul every step: count it back in. With LoRA the frozen weights get no
    # gradient of their own: 2 N forward + 2 N for the inputs' gradients (the small adapters are left out).
    per_weight = 4 if m.lora_rank else 6
    return per_weight * (n_nonembed + m.vocab_size * m.d_model) + 12 * m.n_layers * m.max_len * m.d_model


# Peak dense TFLOP/s per chip for MFU, bf16 unless noted; override with --train.peak_tflops.
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0, "a10": 125.0, "v100": 125.0,
               "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0,
               "cpu": 0.5}  # cpu: ~fp32 matmul peak of a few-core VM, measured on this project's 2-core machines


def peak_tflops(cfg: Config) -> float:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    kind = jax.devices()[0].device_kind.lower()
    for name, value in PEAK_TFLOPS.items():
        if name in kind:
            return value
    return PEAK_TFLOPS["cpu"] if jax.devices()[0].platform == "cpu" else 0.0


class Throughput:
    """Real (non-padding) tokens trained per second since the last reading, and the MFU they amount to. Time spent
    inside `excluded()` (evaluation) does not count as training time."""

    def __init__(self, cfg: Config, n_params: int, mesh):
        self.flops_per_token = flops_per_token(cfg, n_params)
        # The CPU peak is a whole host's, however many devices (mesh.cpu_devices) the host is split into.
        chips = jax.process_count() if jax.devices()[0].platform == "cpu" else mesh.size
        self.peak = peak_tflops(cfg) * 1e12 * chips
        self.since, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def excluded(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.since += time.perf_counter() - t0

    def read(self) -> tuple[float, float | None]:
        """(tokens/s, MFU or None without a known peak) since the last reading; starts a new interval."""
        now = time.perf_counter()
        tok_s = self.tokens / max(now - self.since, 1e-9)
        self.since, self.tokens = now, 0
        return tok_s, (self.flops_per_token * tok_s / self.peak if self.peak else None)
