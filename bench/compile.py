"""Compile time of the DPO train step against depth: `scan` over layers keeps it flat.

    python -m bench.compile [--preset=small] [--layers=4,16,32] [--unrolled] [--json=PATH]

For each layer count it builds the library's step (`bench.common.jax_dpo_step`, online reference) with
the layers under one rolled `scan` (`scan_unroll=1`) and times `jit(...).lower(...)` (tracing to
StableHLO) and `.compile()` (XLA) separately, each from a fresh jit so no cache is hit. `--unrolled`
adds the same models with the scan fully unrolled (`scan_unroll=layers`, what `bench.train_step` runs
at 4-8 layers), whose compile time grows with depth, for contrast. The ratio column is against the
first layer count.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import common


def measure(preset: str, layers: int, *, scan: bool = True) -> dict:
    """Lower and compile seconds of the train step of `preset` with `layers` layers, rolled or unrolled."""
    import jax

    p = common.get_preset(preset, layers=layers, scan_unroll=1 if scan else layers)
    s = common.jax_dpo_step(p)
    # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR, launch.train's default) would turn the
    # second measurement into a cache read: time a real compile.
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        start = time.perf_counter()
        lowered = s.step_fn.lower(s.state, s.batch, s.reference_params)
        lowered_at = time.perf_counter()
        lowered.compile()
        done = time.perf_counter()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
    return {
        "layers": layers, "scan": scan, "lower_s": lowered_at - start, "compile_s": done - lowered_at,
        "total_s": done - start,
    }  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    ap.add_argument("--layers", default="4,16,32")
    ap.add_argument("--unrolled", action="store_true", help="also time scan_unroll=layers")
    ap.add_argument("--json", default="bench_results/compile.json")
    args = ap.parse_args(argv)
    depths = [int(x) for x in args.layers.split(",")]
    rows = []
    for scan in (True, False) if args.unrolled else (True,):
        base = None
        for layers in depths:
            row = measure(args.preset, layers, scan=scan)
            base = base or row["total_s"]
            row["vs_first"] = row["total_s"] / base
            rows.append(row)
    common.print_table(rows, ["layers", "scan", "lower_s", "compile_s", "total_s", "vs_first"])
    scanned = [r for r in rows if r["scan"]]
    ratio = scanned[-1]["total_s"] / scanned[0]["total_s"]
    print(f"compile_ratio_{depths[-1]}_vs_{depths[0]}_layers={ratio:.3f}")
    record = {"benchmark": "compile", "preset": args.preset, "rows": rows, "ratio": ratio,
              "machine": common.machine()}  # fmt: skip
    common.write_json(args.json, record)
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
