"""Launch an experiment: `python -m launch.train --experiment=NAME[:VARIANT] [--workdir=DIR]`.

Looks up `experiments/NAME.py`, calls its `get_config(VARIANT)`, and runs it. An unknown experiment
stops with a message listing the experiments that exist.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import experiments


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__)
    parser.add_argument("--experiment", required=True, help="NAME[:VARIANT], e.g. dpo_tldr:smoke")
    parser.add_argument("--workdir", default=None, help="output directory (default: ./workdirs/NAME)")
    args, overrides = parser.parse_known_args(argv)

    name, variant = parse_experiment(args.experiment)
    known = available_experiments()
    if name not in known:
        listing = ", ".join(known) if known else "(none yet: the experiment files arrive with later issues)"
        print(
            f"error: unknown experiment {name!r}. Experiments that exist in experiments/: {listing}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"experiments.{name}")
    config = module.get_config(variant)
    runner = getattr(module, "run", None)
    if runner is None:
        print(f"error: experiment {name!r} defines no run() entry point", file=sys.stderr)
        return 2
    return int(runner(config, workdir=args.workdir, overrides=overrides) or 0)


if __name__ == "__main__":
    sys.exit(main())
