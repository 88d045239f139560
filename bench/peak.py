"""The machine's practical peak: measured dense matmul throughput of the current backend, in GFLOP/s.

    python -m bench.peak [--dtype=float32,bfloat16] [--sizes=1024,2048] [--compare=torch] [--json=PATH]

For each dtype and square size n it times `a @ b` (2 n^3 FLOPs) under `jax.jit` and reports the median
GFLOP/s; the peak of a dtype is the best size's median. This is the denominator of MFU in
`bench.train_step`, which calls `measure` in the same run, so both see the same machine load. bfloat16
is skipped where the backend has no fast bfloat16 matmul (it is reported, slower, on CPUs that
emulate it). With `--compare=torch` the same matmuls are timed in PyTorch (float32 only on CPU).
"""

from __future__ import annotations

import argparse
import sys

from bench import common

DEFAULT_SIZES = (1024, 2048)


def _jax_matmul_seconds(n: int, dtype: str, iters: int) -> list[float]:
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return common.time_calls(lambda: mm(a, b).block_until_ready(), warmup=2, iters=iters, min_seconds=0.5)


def _torch_matmul_seconds(n: int, dtype: str, iters: int) -> list[float]:
    import torch

    torch.set_num_threads(common.cores())
    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    return common.time_calls(lambda: torch.mm(a, b), warmup=2, iters=iters, min_seconds=0.5)


def measure(
    dtype: str = "float32", sizes=DEFAULT_SIZES, *, iters: int = 5, framework: str = "jax"
) -> dict[str, object]:
    """Median GFLOP/s of an n x n matmul for each size, and the best of them (`peak_gflops`)."""
    timer = _jax_matmul_seconds if framework == "jax" else _torch_matmul_seconds
    per_size = {}
    for n in sizes:
        per_size[n] = 2.0 * n**3 / common.median(timer(n, dtype, iters)) / 1e9
    return {
        "framework": framework,
        "dtype": dtype,
        "gflops_by_size": per_size,
        "peak_gflops": max(per_size.values()),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated n")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--compare", default="", choices=["", "torch"])
    ap.add_argument("--json", default="bench_results/peak.json")
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = []
    for dtype in args.dtype.split(","):
        rows.append(measure(dtype, sizes, iters=args.iters))
        if args.compare == "torch":
            rows.append(measure(dtype, sizes, iters=args.iters, framework="torch"))
    table = [
        {"framework": r["framework"], "dtype": r["dtype"],
         **{f"n={n}": g for n, g in r["gflops_by_size"].items()}, "peak GFLOP/s": r["peak_gflops"]}
        for r in rows
    ]  # fmt: skip
    common.print_table(table, list(table[0]))
    record = {"machine": common.machine(), "results": rows}
    common.write_json(args.json, record)
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
