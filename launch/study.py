"""Run a study: several methods × seeds with matched budgets, then a table and a plot.

    python -m launch.study --study=NAME [--seeds=N] [--workdir=DIR] [--reuse=DIR[,DIR]]
        [--config.a.b=value ...]

`experiments/NAME.py` defines `get_study(arg)` returning a `Study`: methods (an experiment plus
overrides each) and the metrics to tabulate. Extra `--config.*` overrides apply to every run. Each run
lands in WORKDIR/seed_{s}/{method}/ and is resumed or reused when rerun, so an interrupted study
resumes. Stages are shared by fingerprint (`rlhf_jax.pipelines.fingerprints`): a stage whose
configuration and inputs equal those of a stage another method of the same seed already finished (the
SFT policy, the reward model, RSO's samples) is copied instead of recomputed, and `--reuse=DIR` (another
study's or run's workdir) extends the search there; nothing is shared that a method's config changes.
Every run uses `launch.train`'s persistent compilation cache, so the study compiles each program once. Writes
WORKDIR/table.md, table.json (per method and metric: per-seed values, mean, 95% interval) and plot.png.
The 95% interval is the t-interval over seeds (mean ± t_{0.975, n-1} · sd / √n); with one seed it is
the run's own bootstrap interval when the metric has one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time

import numpy as np

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of a study: `experiment` run with `overrides` (a list of `--config.a.b=value`)."""

    name: str
    experiment: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Study:
    """Attributes:
    name: the study's name.
    methods: the rows, run with matched budgets.
    metrics: results.json keys to tabulate (the first one is plotted).
    share: workdir subdirectories trained once per seed (by the first method) and copied to the others.
    curve: optional (file, x key, y keys) of a per-run JSONL curve to plot instead of bars.
    note: what the study checks, printed above the table.
    """

    name: str
    methods: tuple[Method, ...]
    metrics: tuple[str, ...]
    share: tuple[str, ...] = ("sft",)
    curve: tuple[str, str, tuple[str, ...]] | None = None
    note: str = ""


def t_interval(values: list[float]) -> list[float] | None:
    """95% t-interval of the mean of `values` (None for fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = _T975[min(n - 1, len(_T975)) - 1] * sd / math.sqrt(n)
    return [mean - half, mean + half]


def summarize(study: Study, results: dict[str, list[dict]]) -> dict:
    """{method: {metric: {values, mean, ci95}}} from each method's per-seed results.json dicts."""
    table = {}
    for method in study.methods:
        runs = results.get(method.name, [])
        row = {}
        for metric in study.metrics:
            values = [r[metric] for r in runs if isinstance(r.get(metric), (int, float))]
            ci = t_interval(values)
            if ci is None and len(runs) == 1 and isinstance(runs[0].get(metric + "_ci95"), list):
                ci = runs[0][metric + "_ci95"]
            row[metric] = {"values": values, "mean": float(np.mean(values)) if values else None, "ci95": ci}
        row["wall_time_s"] = float(sum(r.get("wall_time_s") or 0 for r in runs))
        table[method.name] = row
    return table


def markdown(study: Study, table: dict, seeds: int, wall: float, command: str) -> str:
    """The table as markdown: mean [95% interval] per method and metric."""

    def cell(entry):
        if entry["mean"] is None:
            return "n/a"
        ci = entry["ci95"]
        return f"{entry['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = [f"### Study `{study.name}`", "", study.note, "", f"Command: `{command}`", "",
             f"Seeds: {seeds}; wall time {wall / 60:.1f} min.", ""]  # fmt: skip
    lines += ["| method | " + " | ".join(study.metrics) + " |", "|---|" + "---|" * len(study.metrics)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(cell(row[m]) for m in study.metrics) + " |")
    return "\n".join(lines) + "\n"


def plot(study: Study, table: dict, workdir: str) -> str:
    """Bars with 95% intervals of the first metric per method (or the study's curves); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, "plot.png")
    if study.curve:
        filename, x_key, y_keys = study.curve
        fig, axes = plt.subplots(1, len(y_keys), figsize=(5 * len(y_keys), 3.5), squeeze=False)
        for method in study.methods:
            for ax, y in zip(axes[0], y_keys, strict=True):
                xs, ys = _curve(workdir, method.name, filename, x_key, y)
                if xs:
                    ax.plot(xs, ys, marker="o", label=method.name)
                ax.set_title(y)
                ax.set_xlabel(x_key)
                ax.grid(alpha=0.3)
        axes[0][0].legend()
    else:
        metric = study.metrics[0]
        names = list(table)
        means = [table[n][metric]["mean"] or 0.0 for n in names]
        cis = [table[n][metric]["ci95"] or [m, m] for n, m in zip(names, means, strict=True)]
        err = [[m - ci[0] for m, ci in zip(means, cis, strict=True)],
               [ci[1] - m for m, ci in zip(means, cis, strict=True)]]  # fmt: skip
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 3.8))
        ax.bar(range(len(names)), means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(metric)
        if "win_rate" in metric:
            ax.axhline(0.5, color="gray", lw=1, ls="--")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(study.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_file(run_dir: str, filename: str) -> str | None:
    """A file of a run: `filename` relative to the run's workdir, or `STAGE/rest` inside the directory
    of the stage the run used (its stages.json), e.g. "policy/eval_curve.jsonl"; None if absent."""
    path = os.path.join(run_dir, filename)
    if os.path.exists(path):
        return path
    index = os.path.join(run_dir, "stages.json")
    stage, _, rest = filename.rpartition("/")
    if stage and os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            entry = json.load(f)["stages"].get(stage)
        if entry and os.path.exists(os.path.join(run_dir, entry["dir"], rest)):
            return os.path.join(run_dir, entry["dir"], rest)
    return None


def _curve(workdir, method, filename, x_key, y_key):
    """Mean over seeds of y at each x from each run's JSONL curve."""
    points: dict[float, list[float]] = {}
    for seed_dir in sorted(d for d in os.listdir(workdir) if d.startswith("seed_")):
        path = run_file(os.path.join(workdir, seed_dir, method), filename)
        if path is None:
            continue
        for line in open(path, encoding="utf-8"):
            rec = json.loads(line)
            if isinstance(rec.get(y_key), (int, float)):
                points.setdefault(rec[x_key], []).append(rec[y_key])
    xs = sorted(points)
    return xs, [float(np.mean(points[x])) for x in xs]


def _run_overrides(method: Method, seed: int, overrides: list[str]) -> list[str]:
    """The `--config.*` arguments of `method`'s run at `seed` (the study's own overrides last)."""
    return [f"--config.seed={seed}", *method.overrides, *overrides]


def run_study(
    study: Study,
    *,
    seeds: int,
    workdir: str,
    overrides: list[str],
    command: str,
    reuse: list[str] | None = None,
) -> dict:
    """Runs every (seed, method), sharing stages by fingerprint within a seed (and, with `reuse`, with
    other studies); writes the table and the plot."""
    from launch import train

    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for seed in range(seeds):
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        for method in study.methods:
            run_dir = os.path.join(seed_dir, method.name)
            # Stages with the same fingerprint are computed once: by the first method of the seed that
            # needs them (found under seed_dir), or in another study given with --reuse.
            search = ",".join([seed_dir, *(reuse or [])])
            argv = [f"--experiment={method.experiment}", f"--workdir={run_dir}", f"--reuse={search}",
                    *_run_overrides(method, seed, overrides)]  # fmt: skip
            print(f"[study {study.name}] seed {seed}: {method.name}", flush=True)
            if train.main(argv) != 0:
                raise SystemExit(f"study {study.name}: run {run_dir} failed")
            with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
                results.setdefault(method.name, []).append(json.load(f))
    table = summarize(study, results)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "table.json"), "w", encoding="utf-8") as f:
        json.dump({"study": study.name, "seeds": seeds, "wall_time_s": wall, "command": command,
                   "methods": table}, f, indent=2)  # fmt: skip
    text = markdown(study, table, seeds, wall, command)
    with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(study, table, workdir)
    print("\n" + text)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--study", required=True, help="NAME[:VARIANT], e.g. rso_table:smoke")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="default ./studies/NAME[_VARIANT]")
    parser.add_argument(
        "--reuse",
        default="",
        help="comma-separated workdirs of other studies (or runs) whose finished stages are copied when "
        "their fingerprint equals this run's (e.g. the same SFT policy and reward model)",
    )
    args, overrides = parser.parse_known_args(argv)
    name, _, variant = args.study.partition(":")
    try:
        module = importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError:
        module = None
    if module is None or not hasattr(module, "get_study"):
        known = sorted(
            m[:-3] for m in os.listdir(os.path.dirname(importlib.import_module("experiments").__file__))
            if m.endswith(".py") and "get_study" in open(os.path.join(
                os.path.dirname(importlib.import_module("experiments").__file__), m), encoding="utf-8").read()
        )  # fmt: skip
        print(f"error: unknown study {name!r}; studies: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    study = module.get_study(variant or None)
    workdir = os.path.abspath(
        args.workdir or os.path.join("studies", name + (f"_{variant}" if variant else ""))
    )
    os.makedirs(workdir, exist_ok=True)
    reuse = [os.path.abspath(d) for d in args.reuse.split(",") if d]
    for d in reuse:
        if not os.path.isdir(d):
            print(f"error: --reuse={d}: no such directory", file=sys.stderr)
            return 2
    command = " ".join(
        ["python -m launch.study", f"--study={args.study}", f"--seeds={args.seeds}"]
        + ([f"--reuse={args.reuse}"] if args.reuse else [])
        + overrides
    )
    run_study(study, seeds=args.seeds, workdir=workdir, overrides=overrides, command=command, reuse=reuse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
