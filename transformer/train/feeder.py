"""The per-host row plumbing: each step's global batch goes onto the mesh as (A, b, ...) arrays (A gradient-
accumulation micro-batches of b rows), and each process reads and puts only the rows its own devices hold."""
from __future__ import annotations

import functools

import numpy as np

from transformer import sharding


class BatchFeeder:
    def __init__(self, mesh, accum: int):
        self.A = accum
        self.sharding = sharding.batch_sharding(mesh, lead_axes=1)
        # (rows per micro-batch b) -> this process's [lo, hi) of them; a handful of sizes per run
        self._local = functools.lru_cache(maxsize=None)(
            lambda b: sharding.local_rows(self.sharding, (accum, b), axis=1))

    def next(self, pipeline, step: int) -> dict:
        """The pipeline's batch for `step`, sharded over the mesh."""
        A, asked = self.A, {}

        def rows(n: int) -> np.ndarray:
            """This process's row indices of an n-row global batch, split into A micro-batches of n / A rows."""
            b = n // A
            lo, hi = self._local(b)
            asked.update(b=b, lo=lo, hi=hi)
            return (np.arange(A)[:, None] * b + np.arange(lo, hi)).reshape(-1)

        local = pipeline.next(step, rows)
        b, n = asked["b"], asked["hi"] - asked["lo"]
        return {k: sharding.put_batch(a.reshape(A, n, *a.shape[1:]), self.sharding, (A, b, *a.shape[1:]))
                for k, a in local.items()}
