"""Launch an experiment.

    python -m launch.train --experiment=NAME[:VARIANT] [--workdir=DIR] [--reuse=DIR[,DIR]]
        [--config.a.b=value ...]

Looks up `experiments/NAME.py`, calls its `get_config(VARIANT)`, applies `--config.*` overrides
(an unknown key or a value of the wrong type stops with a message listing what exists), validates the
result into frozen dataclasses, writes the resolved config to `WORKDIR/config.json`, and runs the
experiment's pipeline. Every stage lives in WORKDIR/{stage}/{fingerprint}/, where the fingerprint covers
exactly the configuration and inputs the stage depends on (`rlhf_jax.pipelines.fingerprints`): rerunning
the same config resumes or reuses its stages; rerunning with another config reuses the stages that still
match (the log says `reused sft/ (fingerprint 3f2a9c1e0b7d)`) and computes the rest in new directories, and
`results.json` and the printed table are always those of the config just run. `--reuse=DIR` also looks
for matching finished stages in other workdirs and copies them in.

Multi-process: on a TPU pod slice (or any launcher that sets JAX's cluster environment)
`jax.distributed.initialize()` runs automatically; for several processes on one machine (CPU tests)
pass `--coordinator=127.0.0.1:PORT --num_processes=N --process_id=I`; `--distributed=on` forces
`jax.distributed.initialize()` (Cloud TPU VMs do not always set an environment variable we can
detect). Only process 0 logs and writes.

Compiled programs go to a persistent JAX compilation cache (`--compilation_cache=DIR`, default
`$JAX_COMPILATION_CACHE_DIR` or `~/.cache/rlhf_jax/jax`; `--compilation_cache=off` disables it): the
stages of one run and every rerun or resume compile many identical programs, and reading them back is
several times faster than compiling (`bench/README.md` has a measured rerun).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import sys
import time

import experiments

_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def available_experiments() -> list[str]:
    """Names of the experiment modules under `experiments/` (those defining `get_config`)."""
    names = []
    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"experiments.{info.name}")
        if hasattr(module, "get_config"):
            names.append(info.name)
    return sorted(names)


def parse_experiment(spec: str) -> tuple[str, str | None]:
    """Splits `NAME[:VARIANT]` into its parts."""
    name, _, variant = spec.partition(":")
    return name, (variant or None)


def default_compilation_cache() -> str:
    """$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/rlhf_jax/jax (default ~/.cache/rlhf_jax/jax)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rlhf_jax", "jax")


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in `path` ('off' or '' leaves it off).

    Only programs that took at least 0.5 s to compile are stored, so the cache holds the train, eval
    and sampling steps rather than thousands of tiny helpers."""
    if not path or path == "off":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def resolve_config(spec: str, overrides: list[str]):
    """The ConfigDict `launch.train --experiment=spec` runs: `get_config(VARIANT)` of
    `experiments/NAME.py` with the `--config.*` overrides applied (raises `overrides.ConfigError`)."""
    from launch.overrides import apply_overrides

    name, variant = parse_experiment(spec)
    return apply_overrides(importlib.import_module(f"experiments.{name}").get_config(variant), overrides)


def _init_distributed(args) -> None:
    import jax

    if args.coordinator:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )
    elif args.distributed == "on" or (
        args.distributed == "auto" and any(os.environ.get(k) for k in _CLUSTER_ENV)
    ):
        jax.distributed.initialize()  # discovers the cluster (Cloud TPU metadata, SLURM, env variables)


# The pipelines, by `config.pipeline`: modules of `rlhf_jax.pipelines`, each with `plan(config)` (the
# experiment's ConfigDict validated into its frozen stage configs) and `run_pipeline(plan, workdir,
# reuse_from=)`.
PIPELINES = (
    "sft", "reward", "preference", "rso", "inpo", "grpo", "gencls", "epo", "direct_advantage_po", "rft",
    "tool_sft",
)  # fmt: skip


def pipeline_module(name: str):
    """The module of pipeline `name` (raises ValueError naming the known ones)."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    return importlib.import_module(f"rlhf_jax.pipelines.{name}")


def build_plan(config):
    """Validates `config` into the frozen stage configs its pipeline runs (raises ValueError)."""
    return pipeline_module(config.pipeline).plan(config)


def run_pipeline(config, workdir: str, reuse_from: tuple[str, ...] = (), plan=None) -> dict:
    """Runs `config.pipeline` in `workdir`; each stage in WORKDIR/{stage}/{fingerprint} (reused when its
    fingerprint matches, here or under `reuse_from`); writes WORKDIR/results.json and stages.json.

    `plan`: `config` already validated by `build_plan` (built here when None)."""
    plan = build_plan(config) if plan is None else plan
    return pipeline_module(config.pipeline).run_pipeline(plan, workdir, reuse_from=reuse_from)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--experiment", required=True, help="NAME[:VARIANT], e.g. dpo_tldr:smoke")
    parser.add_argument(
        "--workdir", default=None, help="output directory (default: ./workdirs/NAME[_VARIANT])"
    )
    parser.add_argument(
        "--coordinator", default=None, help="host:port for a multi-process run on one machine"
    )
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument(
        "--distributed",
        choices=("auto", "on", "off"),
        default="auto",
        help="call jax.distributed.initialize(): 'on' always (e.g. every worker of a Cloud TPU pod), "
        "'auto' when a cluster environment variable is set, 'off' never",
    )
    parser.add_argument(
        "--compilation_cache",
        default=None,
        help="persistent JAX compilation cache directory, or 'off' (default: $JAX_COMPILATION_CACHE_DIR "
        "or ~/.cache/rlhf_jax/jax)",
    )
    parser.add_argument(
        "--reuse",
        default="",
        help="comma-separated workdirs (e.g. of an earlier run or study) to search for finished stages with "
        "this run's fingerprints; a match is copied in instead of being recomputed",
    )
    args, overrides = parser.parse_known_args(argv)

    name, variant = parse_experiment(args.experiment)
    known = available_experiments()
    if name not in known:
        listing = ", ".join(known) if known else "(none)"
        print(f"error: unknown experiment {name!r}. Experiments in experiments/: {listing}", file=sys.stderr)
        return 2
    from launch.overrides import ConfigError

    try:
        config = resolve_config(args.experiment, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    _init_distributed(args)  # before anything touches a JAX backend (validation below does)
    import jax

    if args.compilation_cache is not None or not jax.config.jax_compilation_cache_dir:
        # an explicit flag wins; otherwise keep a cache the caller (a test, a notebook) already set
        enable_compilation_cache(
            args.compilation_cache if args.compilation_cache is not None else default_compilation_cache()
        )

    from rlhf_jax.data.records import DataError
    from rlhf_jax.train.checkpoint import CheckpointError
    from rlhf_jax.train.preemption import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted

    try:
        plan = build_plan(config)  # once: every stage's config, validated before anything runs
        plan.main.mesh.resolve(jax.device_count())
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    logging.basicConfig(
        level=logging.INFO if jax.process_index() == 0 else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
    workdir = args.workdir or os.path.join("workdirs", name + (f"_{variant}" if variant else ""))
    workdir = os.path.abspath(workdir)
    reuse_from = tuple(os.path.abspath(d) for d in args.reuse.split(",") if d)
    for d in reuse_from:
        if not os.path.isdir(d):
            print(f"error: --reuse={d}: no such directory", file=sys.stderr)
            return 2
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"experiment": args.experiment, **config.to_dict()}, f, indent=2, sort_keys=True)
        print(f"[launch] {args.experiment} -> {workdir}", flush=True)
    start = time.perf_counter()
    try:
        results = run_pipeline(config, workdir, reuse_from=reuse_from, plan=plan)
    except (DataError, FileNotFoundError, NonFiniteError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Preempted as e:  # SIGTERM: a checkpoint was saved; 143 = 128 + SIGTERM, as if it had killed us
        print(f"[launch] {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    if jax.process_index() == 0:
        print(f"[launch] done in {time.perf_counter() - start:.1f}s; results in {workdir}/results.json")
        print(json.dumps(results, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
