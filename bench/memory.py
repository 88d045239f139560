"""Peak memory of the DPO train step with and without remat, per-device state bytes under FSDP, and a
7B DPO step's compiled per-device memory, full fine-tuning against LoRA.

    python -m bench.memory [--preset=small] [--devices=8] [--json=PATH] [--lora-rank=16] [--no-7b]

Part 1 compiles the step (layers under a rolled scan, `scan_unroll=1`) for each `remat` policy
("none", "save_dots", "full") and reads XLA's memory
analysis: arguments (state, batch, reference params), outputs, aliased (donated) bytes and temporaries;
peak = arguments + outputs - aliased + temporaries, the most the step holds at once.

Part 2 runs on `--devices` simulated CPU devices (XLA's `xla_force_host_platform_device_count`, set
before JAX starts, so this module must be run as a program): it places the train state on a mesh with
`fsdp=devices` and sums the bytes of the params and of the optimizer state that each device holds,
against the whole unsharded state; with FSDP each device should hold 1/devices of it (up to the few
small arrays, norms' scales and counters, that are replicated because they do not divide).

Part 3 compiles (never runs: every input is abstract) the DPO step of the `7b` preset (Llama-2-7B
shape, bfloat16 parameters and compute, full remat, online reference forward) on a simulated mesh with
fsdp=`--devices`, once training every weight (the reference a second copy of them, AdamW moments of
every weight) and once training LoRA adapters (`rlhf_jax.lora`, all seven projections, rank
`--lora-rank`; the frozen base is the reference, so one copy of the weights), and reads XLA's
per-device memory analysis of each.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # Simulated devices must be requested before JAX is imported.
    _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), "8")
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}".strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402

from bench import common  # noqa: E402

MiB = 2**20


def remat_memory(preset: str, remat: str) -> dict:
    """XLA's memory analysis of the compiled step (single device) with the given remat policy."""
    # A rolled scan (the library default): unrolled layers let XLA:CPU schedule the recomputation early,
    # and most of remat's saving is lost (see `ModelConfig.scan_unroll`).
    p = common.get_preset(preset, remat=remat, scan_unroll=1)
    s = common.jax_dpo_step(p)
    stats = s.step_fn.lower(s.state, s.batch, s.reference_params).compile().memory_analysis()
    if stats is None:
        return {"remat": remat, "peak_MiB": None}
    args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    return {
        "remat": remat, "arguments_MiB": args / MiB, "outputs_MiB": out / MiB, "aliased_MiB": alias / MiB,
        "temp_MiB": temp / MiB, "peak_MiB": (args + out - alias + temp) / MiB,
    }  # fmt: skip


def fsdp_state_bytes(preset: str, devices: int) -> dict:
    """Bytes of params and optimizer state on each device with fsdp=`devices`, and unsharded."""
    import jax

    from rlhf_jax import sharding

    if jax.device_count() < devices:
        raise RuntimeError(
            f"{jax.device_count()} devices, {devices} wanted: run `python -m bench.memory` (it asks XLA for "
            "simulated devices before JAX starts) or set XLA_FLAGS=--xla_force_host_platform_device_count"
        )
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=devices, tensor=1), jax.devices()[:devices])
    p = common.get_preset(preset)
    p = dataclasses.replace(p, pairs=math.lcm(p.pairs, devices))  # the batch splits over the devices
    state = common.jax_dpo_step(p, mesh=mesh).state
    row = {"devices": devices}
    for part in ("params", "opt_state"):
        leaves = jax.tree.leaves(getattr(state, part))
        total = sum(x.nbytes for x in leaves)
        per_device = [sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
                      for d in mesh.devices.flat]  # fmt: skip
        row[f"{part}_total_MiB"] = total / MiB
        row[f"{part}_per_device_MiB"] = max(per_device) / MiB
        row[f"{part}_fraction"] = max(per_device) / total
    return row


def lora_memory(
    devices: int, lora_rank: int, *, preset: str = "7b", pairs: int = 8, seq_len: int = 1024
) -> list[dict]:
    """Per-device compiled memory of a DPO step of the model preset `preset` (`rlhf_jax.models.PRESETS`)
    on fsdp=`devices`, training every weight and training LoRA adapters; nothing is allocated."""
    import functools

    import jax

    from rlhf_jax import lora, losses, models, sharding
    from rlhf_jax.train import optim, steps, trainer

    if jax.device_count() < devices:
        raise RuntimeError(f"{jax.device_count()} devices, {devices} wanted: run `python -m bench.memory`")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=devices, tensor=1), jax.devices()[:devices])
    cfg = models.preset(preset, param_dtype="bfloat16", dtype="bfloat16", remat="full", max_len=seq_len)
    model = models.Transformer(cfg, mesh=mesh)
    param_shapes, param_sh = models.param_shapes(model), models.param_shardings(model, mesh)
    objective = functools.partial(
        steps.preference_objective, model=model, loss_fn=losses.make("dpo"),
        loss_inputs=losses.required_inputs("dpo"), metric_beta=0.1,
    )  # fmt: skip
    tx = optim.make_optimizer(common.optim_config(), total_steps=1_000_000)
    shape = common.BenchPreset(preset, cfg, seq_len // 2, seq_len // 2, pairs)
    batch_sh = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in common.make_batch(shape).items()}  # fmt: skip
    rows = []
    for mode in ("full", "lora"):
        if mode == "full":
            trainable, trainable_sh, obj = param_shapes, param_sh, objective
        else:
            lc = lora.LoRAConfig(rank=lora_rank, alpha=2.0 * lora_rank)
            trainable = lora.adapter_shapes(param_shapes, lc)
            trainable_sh = lora.shardings(models.param_logical_axes(model), lc, mesh, model.rules)
            obj = lora.objective(objective, lc)
        state_sh = trainer.state_shardings(trainable, tx, mesh, trainable_sh)
        state = jax.eval_shape(lambda p: trainer.state_lib.create(p, tx, jax.random.key(0)), trainable)
        state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, state_sh
        )
        reference = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), param_shapes, param_sh
        )
        step_fn = trainer.make_train_step(
            obj, weight_fn=steps.pair_weight, tx=tx, mesh=mesh, state_shardings=state_sh,
            reference_shardings=param_sh,
        )  # fmt: skip
        stats = step_fn.lower(state, batch, reference).compile().memory_analysis()
        n_train = sum(x.size for x in jax.tree.leaves(trainable))
        args, out = stats.argument_size_in_bytes, stats.output_size_in_bytes
        alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
        GiB = 2**30
        rows.append({
            "mode": mode if mode == "full" else f"lora r={lora_rank}", "trainable_params": n_train,
            "arguments_GiB": args / GiB, "temp_GiB": temp / GiB,
            "peak_GiB": (args + out - alias + temp) / GiB,
        })  # fmt: skip
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=sorted(common.PRESETS))
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--remat", default="none,save_dots,full")
    ap.add_argument("--json", default="bench_results/memory.json")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--no-7b", action="store_true", help="skip part 3 (the 7B full vs LoRA compile)")
    args = ap.parse_args(argv)
    remat_rows = [remat_memory(args.preset, r) for r in args.remat.split(",")]
    print(f"peak memory of one train step, preset={args.preset} (XLA memory analysis, one device)")
    common.print_table(
        remat_rows, ["remat", "arguments_MiB", "outputs_MiB", "aliased_MiB", "temp_MiB", "peak_MiB"]
    )
    fsdp = fsdp_state_bytes(args.preset, args.devices)
    print(f"\ntrain state under FSDP on {args.devices} devices (largest per-device share vs unsharded)")
    common.print_table([fsdp], list(fsdp))
    record = {"benchmark": "memory", "preset": args.preset, "remat": remat_rows, "fsdp": fsdp,
              "machine": common.machine()}  # fmt: skip
    if not args.no_7b:
        rows = lora_memory(args.devices, args.lora_rank)
        print(f"\n7b DPO step (bf16, remat=full, 8 pairs x 1024 tokens), per device on fsdp={args.devices}")
        common.print_table(rows, ["mode", "trainable_params", "arguments_GiB", "temp_GiB", "peak_GiB"])
        record["lora_7b"] = rows
    common.write_json(args.json, record)
    return record


if __name__ == "__main__":
    sys.exit(main() and 0)
