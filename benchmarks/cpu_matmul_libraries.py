"""Which XLA:CPU matmul library decodes fastest: the matmuls of SmolLM2-135M's 30 SwiGLU MLPs (d_model 576, hidden
1536) chained as in one decode step, at batch 1 and 16, float32 and bfloat16 weights, compiled with each library
XLA:CPU offers (per-program `compiler_options`, so one process compares them all, interleaved, on the same data).

    python benchmarks/cpu_matmul_libraries.py [--batches 1,16] [--repeats 5]

Prints ms per decode-shaped step (64 steps in one `fori_loop`, as the decode loop runs them) for each option set:
  - default: jax 0.10's choice (YNNPACK fusions for dots with more than one row, Eigen for a matrix-vector product);
  - ynn-off: `xla_cpu_experimental_ynn_fusion_type=""` (Eigen for every dot);
  - onednn: XLA's oneDNN matmul rewrite (`xla_cpu_use_onednn` + `xla_cpu_experimental_onednn_custom_call`);
  - xnn: XNNPACK for individual dots.
Each option set's best of the repeats and its median. The decode loop (`infer/sampling.py`) uses the default; this
script is how to tell, on a quiet machine, whether another choice pays there (2-core VM, noisy neighbours: interleave
and repeat).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

LAYERS, D, F, STEPS = 30, 576, 1536, 64

OPTIONS = {
    "default": {},
    "ynn-off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "onednn": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True,
               "xla_cpu_experimental_ynn_fusion_type": ""},
    "xnn": {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
            "xla_cpu_experimental_ynn_fusion_type": ""},
}


def steps(w_up, w_down, x):
    def mm(a, w):
        return jnp.dot(a.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def body(_, x):
        for up, down in zip(w_up, w_down):
            h = mm(x, up)
            x = x + mm(jax.nn.silu(h[:, :F]) * h[:, F:], down)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    return jax.lax.fori_loop(0, STEPS, body, x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        w_up = [jnp.asarray(rng.normal(0, 0.02, (D, 2 * F)), dtype) for _ in range(LAYERS)]
        w_down = [jnp.asarray(rng.normal(0, 0.02, (F, D)), dtype) for _ in range(LAYERS)]
        for batch in map(int, args.batches.split(",")):
            x = jnp.asarray(rng.normal(size=(batch, D)), jnp.float32)
            programs = {name: jax.jit(steps, compiler_options=opts or None) for name, opts in OPTIONS.items()}
            for program in programs.values():
                program(w_up, w_down, x).block_until_ready()
            times = {name: [] for name in programs}
            for _ in range(args.repeats):
                for name, program in programs.items():
                    t = time.perf_counter()
                    program(w_up, w_down, x).block_until_ready()
                    times[name].append((time.perf_counter() - t) / STEPS * 1e3)
            flops = 2 * batch * LAYERS * (D * 2 * F + F * D)
            for name, ts in times.items():
                best = min(ts)
                print(f"{jnp.dtype(dtype).name:8s} batch {batch:2d} {name:8s} best {best:6.1f} ms/step "
                      f"(median {statistics.median(ts):6.1f}; {flops / best / 1e6:6.1f} GFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
