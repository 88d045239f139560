"""A TPU pod plan checked by the TPU compiler, from a CPU machine: per-chip memory, collectives and a
roofline bound of an experiment's steps on a described TPU topology.

    python -m bench.tpu_plan --experiment=dpo_hh --preset=7b --topology=v5e:4x4 --config.mesh.fsdp=16 \\
        [--config.model.remat=full ...] [--steps=preference,decode] [--json=PATH]

Needs the `libtpu` wheel next to jax (`pip install -e .[tpu]`), no TPU: JAX compiles ahead of time for
the devices of `jax.experimental.topologies.get_topology_desc("tpu", TOPOLOGY)`. The experiment's config
is loaded and overridden as `launch.train` does (`--preset=X` is `--config.model.preset=X`), its mesh is
built over the topology's devices, and each step of `bench.tpu_steps` (preference, reward, prefill,
decode, grpo) is lowered from abstract shapes and compiled. Per step and per chip it prints:

- memory from XLA's analysis of the TPU executable: arguments, temporaries, outputs, and the peak
  (arguments + outputs - donated + temporaries) against the chip's HBM (`bench.tpu_chips`);
- analytic model FLOPs (`bench.tpu_steps`: what is counted is printed with each step). XLA's own
  `cost_analysis()` counts a scanned layer stack once, so it is not used;
- the collectives of the compiled HLO with their bytes, loop bodies multiplied by their trip counts
  (`bench.hlo_collectives`);
- a roofline lower bound on the step time, max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI
  bandwidth) per chip, with HBM bytes = arguments + outputs (each read or written once), and the MFU
  bound FLOP time / that bound. It is a model, not a measurement: overlap, kernel efficiency and
  latency are ignored, so a real step is slower.

Exits with status 3 and names what to change (more fsdp, remat=full, a smaller batch) when a step does
not fit in the chip's HBM; status 2 on a bad argument.
"""

from __future__ import annotations

import os

# libtpu asks the GCE metadata server for the TPU it runs on unless told not to; there is none here.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Compiling touches no TPU, so several planning processes (a test run, a table) may share the host.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench import hlo_collectives, tpu_chips  # noqa: E402

GiB = 2**30


class DoesNotFitError(RuntimeError):
    """A step needs more HBM per chip than the chip has."""


def topology_devices(topology: str):
    """The devices of a TPU topology such as "v5e:4x4" (raises RuntimeError when libtpu is missing)."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # noqa: BLE001 (libtpu absent or an unknown topology: say which)
        raise RuntimeError(
            f"cannot describe TPU topology {topology!r} ({e}); this needs the libtpu wheel next to jax "
            "(pip install -e .[tpu]) and a name like v5e:4x4, v5p:4x4x2, v4:2x2x1, v6e:4x4"
        ) from e


def analyse(step, chip: tpu_chips.Chip, num_chips: int) -> dict:
    """Compiles `step` (a `tpu_steps.PlannedStep`) and returns its per-chip report row."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tpu_plan_") as dump:
        # The optimized HLO as libtpu's own XLA prints it: `compiled.as_text()` goes through an HLO
        # proto that this jaxlib's parser can reject for newer instructions (a multi-operand
        # async-update in the 7B steps).
        options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True}
        try:
            compiled = step.fn.lower(*step.args).compile(compiler_options=options)
        except Exception as e:  # noqa: BLE001 (the TPU compiler's own out-of-memory verdict)
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            return _oom_row(step, chip, str(e), time.perf_counter() - start)
        texts = sorted(glob.glob(os.path.join(dump, "*.after_optimizations.txt")), key=os.path.getmtime)
        if texts:
            with open(texts[-1], encoding="utf-8") as f:
                hlo = f.read()
        else:
            hlo = compiled.as_text()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    args, out = m.argument_size_in_bytes, m.output_size_in_bytes
    alias, temp = m.alias_size_in_bytes, m.temp_size_in_bytes
    peak = args + out - alias + temp
    coll = hlo_collectives.summary(hlo)
    ici = sum(v["ici_bytes"] for v in coll.values())
    flops_chip = step.flops / num_chips
    times = {
        "compute": flops_chip / chip.bf16_flops,
        "hbm": (args + out) / chip.hbm_bytes_per_s,
        "ici": ici / chip.ici_bytes_per_s,
    }
    bound = max(times.values())
    return {
        "step": step.name,
        "shape": step.shape,
        "compile_s": seconds,
        "arguments_GiB": args / GiB,
        "temp_GiB": temp / GiB,
        "outputs_GiB": out / GiB,
        "aliased_GiB": alias / GiB,
        "peak_GiB": peak / GiB,
        "hbm_GiB": chip.hbm_bytes / GiB,
        "fits": peak <= chip.hbm_bytes,
        "state_GiB_unsharded": step.param_bytes / GiB,
        "model_TFLOP_per_chip": flops_chip / 1e12,
        "flops_counted": step.flops_note,
        "collectives": {
            k: {"count": v["count"], "GB": v["bytes"] / 1e9} for k, v in coll.items() if v["count"]
        },
        "collective_GB": sum(v["bytes"] for v in coll.values()) / 1e9,
        "ici_GB": ici / 1e9,
        "roofline_ms": bound * 1e3,
        "bound_by": max(times, key=times.get),
        "mfu_bound": times["compute"] / bound if bound else 0.0,
        "top_collectives": hlo_collectives.top(hlo, 8),
    }


def _oom_row(step, chip: tpu_chips.Chip, message: str, seconds: float) -> dict:
    """The row of a step the TPU compiler rejected for exceeding HBM (its temporaries alone)."""
    m = re.search(r"HLO temporaries \(([\d.]+)G\)", message)
    temp = float(m.group(1)) if m else float("nan")
    return {
        "step": step.name, "shape": step.shape, "compile_s": seconds, "arguments_GiB": None,
        "temp_GiB": temp, "outputs_GiB": None, "aliased_GiB": None, "peak_GiB": temp,
        "hbm_GiB": chip.hbm_bytes / GiB, "fits": False, "compiler_error": message.splitlines()[0][:300],
        "collectives": {}, "flops_counted": step.flops_note, "top_collectives": [],
    }  # fmt: skip


def plan(config, topology: str, step_names) -> list[dict]:
    """Report rows of the steps `step_names` of an experiment ConfigDict on `topology` (no fit check)."""
    from bench import tpu_steps
    from rlhf_jax import sharding
    from rlhf_jax.pipelines import config as config_lib

    chip = tpu_chips.chip(topology)
    devices = topology_devices(topology)
    mesh_cfg = sharding.MeshConfig(**config_lib.section_fields(sharding.MeshConfig, config.mesh, "mesh"))
    mesh = sharding.make_mesh(mesh_cfg, devices)
    return [analyse(tpu_steps.build(name, config, mesh), chip, len(devices)) for name in step_names]


def check_fits(rows: list[dict], config, topology: str) -> None:
    """Raises DoesNotFitError naming each step over the chip's HBM and the settings to change."""
    over = [r for r in rows if not r["fits"]]
    if not over:
        return
    lines = [
        f"{r['step']} needs {r['peak_GiB']:.1f} GiB per chip (arguments {r['arguments_GiB'] or 0:.1f}, "
        f"temporaries {r['temp_GiB']:.1f}); a {topology} chip has {r['hbm_GiB']:.0f} GiB"
        for r in over
    ]
    m, model, train = config.mesh, config.model, config.train
    lines.append(
        f"to fit: shard the state over more chips (--config.mesh.fsdp, now {m.fsdp}; data={m.data}), "
        f"recompute activations (--config.model.remat=full, now {model.remat!r}), use bfloat16 "
        f"(--config.model.dtype/param_dtype, now {model.dtype}/{model.param_dtype}), or a smaller batch "
        f"(--config.train.batch_size, now {train.batch_size}; or --config.train.grad_accum_steps)"
    )
    raise DoesNotFitError("\n".join(lines))


COLUMNS = [
    "step",
    "shape",
    "arguments_GiB",
    "temp_GiB",
    "outputs_GiB",
    "peak_GiB",
    "hbm_GiB",
    "model_TFLOP_per_chip",
    "collective_GB",
    "roofline_ms",
    "bound_by",
    "mfu_bound",
    "compile_s",
]


def report(rows: list[dict], topology: str, num_chips: int, verbose: bool = False) -> None:
    from bench import common

    print(f"per chip on {topology} ({num_chips} chips); roofline = a model, not a measurement")
    common.print_table(rows, COLUMNS)
    for r in rows:
        kinds = ", ".join(f"{k} x{v['count']} {v['GB']:.3g} GB" for k, v in r["collectives"].items())
        print(f"  {r['step']}: FLOPs counted: {r['flops_counted']}; collectives: {kinds or 'none'}")
        if r.get("compiler_error"):
            print(f"  {r['step']}: the TPU compiler: {r['compiler_error']}")
        if verbose:
            for c in r["top_collectives"]:
                print(f"    {c['kind']} x{c['count']} {c['GB']:.3g} GB  {c['source']}")


def markdown(rows: list[dict]) -> str:
    """The report as a Markdown table (the README's TPU tables)."""
    out = [
        "| step | shape | args GiB | temp GiB | peak GiB | collect. GB | roofline ms | bound | MFU bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("compiler_error"):
            out.append(
                f"| {r['step']} | {r['shape']} | - | {r['temp_GiB']:.2f} | - | - | - | does not fit | - |"
            )
            continue
        out.append(
            f"| {r['step']} | {r['shape']} | {r['arguments_GiB']:.2f} | {r['temp_GiB']:.2f} | "
            f"{r['peak_GiB']:.2f} | {r['collective_GB']:.3g} | {r['roofline_ms']:.3g} | {r['bound_by']} | "
            f"{r['mfu_bound']:.2f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tpu_plan", description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", required=True, help="NAME[:VARIANT] of experiments/")
    ap.add_argument("--topology", required=True, help="e.g. v5e:4x4, v5p:4x4x2, v6e:4x4, v4:2x2x1")
    ap.add_argument("--preset", default=None, help="shorthand for --config.model.preset")
    ap.add_argument("--steps", default=",".join(("preference", "reward", "prefill", "decode", "grpo")))
    ap.add_argument("--json", default="", help="also write the report here")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--top", action="store_true", help="list each step's largest collectives and sources")
    args, overrides = ap.parse_known_args(argv)
    from launch import train
    from launch.overrides import ConfigError

    if args.preset:
        overrides = [f"--config.model.preset={args.preset}", *overrides]
    try:
        config = train.resolve_config(args.experiment, overrides)
        if config.data.task in ("hh", "math") and not (config.data.path or config.data.preference_path):
            config.data.path = "(not read by bench.tpu_plan)"  # the plan needs shapes, never the data
        chip = tpu_chips.chip(args.topology)
        rows = plan(config, args.topology, [s for s in args.steps.split(",") if s])
    except (ConfigError, ValueError, RuntimeError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    num_chips = len(topology_devices(args.topology))
    report(rows, args.topology, num_chips, verbose=args.top)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        record = {
            "benchmark": "tpu_plan",
            "experiment": args.experiment,
            "topology": args.topology,
            "chip": vars(chip) if hasattr(chip, "__dict__") else str(chip),
            "chips": num_chips,
            "overrides": overrides,
            "steps": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)
    try:
        check_fits(rows, config, args.topology)
    except DoesNotFitError as e:
        print(f"error: does not fit\n{e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
