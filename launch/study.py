"""Run a study: several methods × seeds with matched budgets, then a table and a plot.

(Over 400 lines: the runner, the paired statistics, the markdown table and the plot of one report.)

    python -m launch.study --study=NAME [--seeds=N] [--workdir=DIR] [--reuse=DIR[,DIR]] [--archive=DIR]
        [--config.a.b=value ...]

`experiments/NAME.py` defines `get_study(arg)` returning a `Study` (`experiments/_study.py`): methods
(an experiment plus a dict of config overrides each) and the metrics to tabulate. Each run's config is
the experiment's with `seed`, then the method's overrides, then the extra `--config.*` overrides of the
command line (later wins); every method's overrides are checked against its experiment's config before
the first run (an unknown key stops the study with the keys that exist). Each run lands in
WORKDIR/seed_{s}/{method}/ and is resumed or reused when rerun, so an interrupted study resumes. Stages
are shared by fingerprint (`rlhf_jax.pipelines.fingerprints`): a stage whose configuration and inputs
equal those of a stage another method of the same seed already finished (the SFT policy, the reward
model, RSO's samples) is copied instead of recomputed, and `--reuse=DIR` (another study's or run's
workdir) extends the search there; nothing is shared that a method's config changes. Every run uses
`launch.train`'s persistent compilation cache, so the study compiles each program once. Writes
WORKDIR/table.md, table.json (per method and metric: per-seed values, mean, marginal 95% interval, and
the paired difference from the study's baseline row) and plot.png.

Archive (`--archive=DIR`): a study longer than one sitting (a session, a preemptible machine) is split by
its finished runs. After each run its small files (config.json, results.json, stages.json and the
study's curve file; no checkpoints) are copied to DIR/seed_{s}/{method}/, and a run whose archived
config.json equals the config it would run (every key but `progress`) is taken from there instead of
being run: a later invocation with the same DIR (e.g. committed to the repository) runs only what is
missing and tabulates all of it. An archived run whose config differs is not used (the log names the
keys that differ) and is overwritten when the run finishes. A table's wall time is that of the command
that wrote it (near 0 when every run came from the archive); beside it, table.md and table.json
(`runs_wall_time_s`) give the sum of the runs' own wall times (each run's results.json `wall_time_s`,
which for a resumed run covers its last sitting only), what the runs cost when they ran.

Statistics. The marginal 95% interval is the t-interval over seeds (mean ± t_{0.975, n-1} · sd / √n;
with one seed the run's own bootstrap interval over prompts when the metric has one), clipped to the
metric's range (`METRIC_RANGES`) and marked `*` when clipped. Rows of one seed share the SFT policy, the
reward model and the evaluation keys, so they are compared paired: for each method with a baseline
(`Study.baseline`), d_s = x_s(method) - x_s(baseline) over the seeds both have, and the 95% t-interval
of mean(d) decides: resolved iff it excludes 0. One seed gives no paired interval (n/a). By default the
synthetic data and evaluation prompts are the same for every seed, so the intervals cover training and
sampling randomness only; `--config.data.vary_with_seed=true` ties them to the seed, so the intervals
also cover the draw of the data and prompts.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping

import numpy as np

from experiments import Method, Study  # re-exported: `launch.study.Method` and `Study` keep working
from launch import overrides as config_overrides

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]  # fmt: skip


# The known range of a metric by name pattern (fnmatch, first match wins): intervals are clipped to it
# and marked. A t-interval is symmetric about the mean and can leave the range (a win rate's upper end
# above 1, a KL's lower end below 0); unknown metrics are never clipped.
METRIC_RANGES = (
    ("win_rate*", (0.0, 1.0)),
    # Differences of two accuracies (RL − SFT, perplexity − generation, gains) lie in [-1, 1]; listed
    # before the accuracies themselves, which lie in [0, 1].
    ("*accuracy*_vs_*", (-1.0, 1.0)),
    ("*accuracy*gain*", (-1.0, 1.0)),
    ("*accuracy*", (0.0, 1.0)),
    ("call_exact_match*", (0.0, 1.0)),  # shares of held-out tool calls (`pipelines.tool_sft`)
    ("json_valid*", (0.0, 1.0)),
    ("kl*", (0.0, math.inf)),
    ("*length*", (0.0, math.inf)),
    ("entropy*", (0.0, math.inf)),
    ("samples*", (0.0, math.inf)),
    ("wall_time*", (0.0, math.inf)),
)


def metric_range(metric: str) -> tuple[float, float] | None:
    """The (low, high) a metric's value is known to lie in, or None when unknown."""
    return next((bounds for pattern, bounds in METRIC_RANGES if fnmatch.fnmatchcase(metric, pattern)), None)


def difference_range(metric: str) -> tuple[float, float] | None:
    """The range of a difference of two values of `metric`: [low - high, high - low]."""
    bounds = metric_range(metric)
    return None if bounds is None else (bounds[0] - bounds[1], bounds[1] - bounds[0])


def clip_interval(
    ci: list[float] | None, bounds: tuple[float, float] | None
) -> tuple[list[float] | None, bool]:
    """`ci` clipped to `bounds`, and whether clipping changed it."""
    if ci is None or bounds is None:
        return ci, False
    clipped = [min(max(ci[0], bounds[0]), bounds[1]), min(max(ci[1], bounds[0]), bounds[1])]
    return clipped, clipped != list(ci)


def t_interval(values: list[float]) -> list[float] | None:
    """95% t-interval of the mean of `values`: mean ± t_{0.975, n-1} · sd / √n (None for fewer than two;
    beyond 30 degrees of freedom the 30-dof quantile, slightly wide)."""
    n = len(values)
    if n < 2:
        return None
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = _T975[min(n - 1, len(_T975)) - 1] * sd / math.sqrt(n)
    return [mean - half, mean + half]


def paired_difference(method: dict[int, float], baseline: dict[int, float], *, metric: str) -> dict:
    """The paired comparison of a method with its baseline over the seeds both have.

    d_s = x_s(method) - x_s(baseline) for each shared seed s; the 95% t-interval of mean(d) (n - 1
    degrees of freedom) decides: "resolved" iff it excludes 0, in the direction of its sign. With fewer
    than two shared seeds there is no interval over seeds and nothing is resolved (never a fallback to
    marginal overlap, which ignores that the rows share SFT policy, reward model and evaluation keys).

    Args:
      method, baseline: {seed: value} of one metric.
      metric: the metric's name (the interval is clipped to the range of a difference of its values).

    Returns:
      {seeds, values (the d_s), mean, ci95, ci95_clipped, resolved (bool, None under two seeds),
      direction ("higher"/"lower" when resolved, else None)}.
    """
    seeds = sorted(set(method) & set(baseline))
    diffs = [float(method[s] - baseline[s]) for s in seeds]
    raw = t_interval(diffs)
    ci, clipped = clip_interval(raw, difference_range(metric))
    resolved = None if raw is None else bool(raw[0] > 0 or raw[1] < 0)
    return {
        "seeds": seeds,
        "values": diffs,
        "mean": float(np.mean(diffs)) if diffs else None,
        "ci95": ci,
        "ci95_clipped": clipped,
        "resolved": resolved,
        "direction": ("higher" if raw[0] > 0 else "lower") if resolved else None,
    }


def _by_seed(runs) -> dict[int, dict]:
    """{seed: results} from a list in seed order (None for a missing run) or a {seed: results} mapping."""
    items = runs.items() if isinstance(runs, Mapping) else enumerate(runs)
    return {int(s): r for s, r in items if r}


def summarize(study: Study, results: dict) -> dict:
    """{method: {metric: entry}} from each method's per-seed results.json dicts.

    Args:
      study: the study.
      results: {method: its runs' results.json dicts}, a list in seed order (element i is seed i's run,
        None where it is missing) or a {seed: dict} mapping; the seed pairs runs across methods.

    Returns:
      Per method and metric: `values` (per seed, where numeric), `seeds`, `mean`, `ci95` (the marginal
      95% t-interval over seeds, clipped to the metric's range; with one seed the run's own bootstrap
      interval over prompts when it has one), `ci95_clipped`, `ci95_kind` ("seeds", "bootstrap" or None)
      and, for a method with a baseline, `diff_vs_baseline` (`paired_difference` plus `baseline`). Per
      method also `wall_time_s` (summed over its runs), `wall_time_runs` (how many runs record one),
      `runs`, and `eval_prompts` / `samples_per_prompt` (the distinct values the runs report).
    """
    runs_of = {m.name: _by_seed(results.get(m.name, [])) for m in study.methods}

    def values(name, metric):
        return {s: r[metric] for s, r in runs_of[name].items() if isinstance(r.get(metric), (int, float))}

    table = {}
    for method in study.methods:
        runs = runs_of[method.name]
        base = study.baseline_of(method.name)
        row = {}
        for metric in study.metrics:
            by_seed = values(method.name, metric)
            vals = [by_seed[s] for s in sorted(by_seed)]
            ci, kind = t_interval(vals), "seeds"
            if ci is None:
                own = next(iter(runs.values()), {}).get(metric + "_ci95") if len(runs) == 1 else None
                ci, kind = (own, "bootstrap") if isinstance(own, list) else (None, None)
            ci, clipped = clip_interval(ci, metric_range(metric))
            entry = {
                "values": vals,
                "seeds": sorted(by_seed),
                "mean": float(np.mean(vals)) if vals else None,
                "ci95": ci,
                "ci95_clipped": clipped,
                "ci95_kind": kind,
            }
            if base is not None:
                entry["diff_vs_baseline"] = {
                    "baseline": base,
                    **paired_difference(by_seed, values(base, metric), metric=metric),
                }
            row[metric] = entry
        row["wall_time_s"] = float(sum(r.get("wall_time_s") or 0 for r in runs.values()))
        row["wall_time_runs"] = sum(isinstance(r.get("wall_time_s"), (int, float)) for r in runs.values())
        row["runs"] = len(runs)
        for key in ("eval_prompts", "samples_per_prompt"):
            row[key] = sorted({r[key] for r in runs.values() if isinstance(r.get(key), int)})
        table[method.name] = row
    return table


def _interval_text(mean: float, ci, clipped: bool, signed: bool = False) -> str:
    """`mean [low, high]`, with `*` when the interval was clipped."""
    f = "{:+.3f}" if signed else "{:.3f}"
    text = f.format(mean)
    if ci:
        text += f" [{f.format(ci[0])}, {f.format(ci[1])}]" + ("*" if clipped else "")
    return text


_MARGINAL_NOTE = (
    "Marginal: mean over seeds [95% t-interval over seeds]. Rows of one seed share the SFT policy, reward "
    "model and evaluation keys, so compare rows in the paired table, not by overlap of these intervals."
)
_PAIRED_NOTE = (
    "Paired: difference from the baseline row, the mean over seeds of the per-seed difference [95% "
    "t-interval of that mean, n - 1 dof]; resolved iff the interval excludes 0."
)
_CLIPPED_NOTE = "\\* interval clipped to the metric's range (win rates and accuracies in [0, 1], KL ≥ 0)."
_BOOTSTRAP_NOTE = "With one seed a marginal interval is the run's bootstrap interval over evaluation prompts."


def runs_wall_time(table: dict) -> tuple[float, int, int]:
    """(the runs' own wall times summed in seconds, how many runs record one, how many runs) of a
    `summarize` table."""
    rows = table.values()
    return (
        sum(row.get("wall_time_s") or 0.0 for row in rows),
        sum(row.get("wall_time_runs", 0) for row in rows),
        sum(row.get("runs", 0) for row in rows),
    )


def markdown(study: Study, table: dict, seeds: int, wall: float, command: str) -> str:
    """The tables as markdown: per method and metric the mean [marginal 95% interval], then each
    method's paired difference from its baseline [95% interval over seeds] with the verdict."""

    def cell(entry):
        if entry["mean"] is None:
            return "n/a"
        return _interval_text(entry["mean"], entry["ci95"], entry["ci95_clipped"])

    def diff_cell(d):
        if d is None or d["mean"] is None:
            return "n/a"
        n = len(d["seeds"])
        if d["resolved"] is None:
            return f"{d['mean']:+.3f}, n/a ({n} seed: no paired interval)"
        verdict = f"resolved, {d['direction']}" if d["resolved"] else "not resolved"
        text = _interval_text(d["mean"], d["ci95"], d["ci95_clipped"], signed=True) + " " + verdict
        return text + (f" (n={n})" if n < seeds else "")

    metrics = study.metrics
    marginal = [row[m] for row in table.values() for m in metrics]
    diffs = {n: [row[m].get("diff_vs_baseline") for m in metrics] for n, row in table.items()}
    diffs = {n: ds for n, ds in diffs.items() if any(ds)}
    sizes = sorted(
        {
            (p, s)
            for row in table.values()
            for p in row.get("eval_prompts", ())
            for s in row.get("samples_per_prompt", ())
        }
    )
    header = f"Seeds: {seeds}; wall time {wall / 60:.1f} min (this command)."
    # Runs taken from an archive cost this command nothing; their own wall times (results.json) say
    # what the study cost when they ran.
    runs_wall, timed, runs = runs_wall_time(table)
    if timed:
        header += " The runs' own wall times (results.json: a resumed run's last sitting) sum to "
        header += f"{runs_wall / 60:.1f} min"
        header += f" ({timed} of {runs} runs record one)." if timed < runs else "."
    if sizes:
        header += " Evaluation per run: " + ", ".join(f"{p} prompts × {s} samples" for p, s in sizes) + "."
    lines = [f"### Study `{study.name}`", "", study.note, "", f"Command: `{command}`", "", header, ""]
    lines += [_MARGINAL_NOTE, ""]
    lines += ["| method | " + " | ".join(f"{m} (marginal)" for m in metrics) + " |"]
    lines += ["|---|" + "---|" * len(metrics)]
    lines += [
        f"| {name} | " + " | ".join(cell(row[m]) for m in metrics) + " |" for name, row in table.items()
    ]
    if diffs:
        lines += ["", _PAIRED_NOTE, "", "| method | baseline | " + " | ".join(metrics) + " |"]
        lines += ["|---|---|" + "---|" * len(metrics)]
        for name, ds in diffs.items():
            base = next(d["baseline"] for d in ds if d)
            lines.append(f"| {name} | {base} | " + " | ".join(diff_cell(d) for d in ds) + " |")
    entries = marginal + [d for ds in diffs.values() for d in ds if d]
    notes = [_BOOTSTRAP_NOTE] if any(e.get("ci95_kind") == "bootstrap" for e in marginal) else []
    notes += [_CLIPPED_NOTE] if any(e.get("ci95_clipped") for e in entries) else []
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def plot(study: Study, table: dict, workdir: str) -> str:
    """Bars with marginal 95% intervals of the first metric per method, next to each method's paired
    difference from its baseline (or the study's curves); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, "plot.png")
    if study.curve:
        filename, x_key, y_keys = study.curve
        fig, axes = plt.subplots(1, len(y_keys), figsize=(5 * len(y_keys), 3.5), squeeze=False)
        # One colour per method in every panel (not the axes' colour cycle, which shifts in a panel
        # where a method has no curve, e.g. train_flipped_fit at ε = 0), and one legend of them all.
        cmap = plt.get_cmap("tab10" if len(study.methods) <= 10 else "tab20")
        colors = {m.name: cmap(i % cmap.N) for i, m in enumerate(study.methods)}
        handles = {}
        for method in study.methods:
            for ax, y in zip(axes[0], y_keys, strict=True):
                xs, ys = _curve(workdir, method.name, filename, x_key, y)
                if xs:
                    (line,) = ax.plot(xs, ys, marker="o", label=method.name, color=colors[method.name])
                    handles.setdefault(method.name, line)
                ax.set_title(y)
                ax.set_xlabel(x_key)
                ax.grid(alpha=0.3)
        axes[0][0].legend(handles=list(handles.values()), fontsize=8)
    else:
        metric = study.metrics[0]
        diffs = {n: row[metric]["diff_vs_baseline"] for n, row in table.items()
                 if row[metric].get("diff_vs_baseline", {}).get("mean") is not None}  # fmt: skip
        panels = [(list(table), [table[n][metric] for n in table], "mean [marginal 95% interval over seeds]")]
        if diffs:
            title = "minus its baseline row, paired over seeds [95% interval]"
            panels.append((list(diffs), list(diffs.values()), title))
        width = max(5, 0.8 * len(table))
        fig, axes = plt.subplots(len(panels), 1, figsize=(width, 3.8 * len(panels)), squeeze=False)
        axes = [row[0] for row in axes]
        for ax, (names, entries, title) in zip(axes, panels, strict=True):
            means = [e["mean"] or 0.0 for e in entries]
            cis = [e["ci95"] or [m, m] for e, m in zip(entries, means, strict=True)]
            err = [[m - ci[0] for m, ci in zip(means, cis, strict=True)],
                   [ci[1] - m for m, ci in zip(means, cis, strict=True)]]  # fmt: skip
            ax.bar(range(len(names)), means, yerr=err, capsize=4, color="tab:blue", alpha=0.8)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(metric)
            ax.grid(axis="y", alpha=0.3)
        if "win_rate" in metric:
            axes[0].axhline(0.5, color="gray", lw=1, ls="--")
        if diffs:
            axes[1].axhline(0.0, color="gray", lw=1, ls="--")
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


def curve_metrics(run_dir: str, study: Study) -> dict[str, float]:
    """{"KEY@X": value} for every numeric KEY of every point of the run's `study.curve` file, X its x
    value (`%g`: 244, 0.5); {} without a curve or a file (the `KEY@X` metrics of `Study.metrics`)."""
    if not study.curve:
        return {}
    filename, x_key, _ = study.curve
    path = run_file(run_dir, filename)
    if path is None:
        return {}
    out = {}
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        x = rec.get(x_key)
        if isinstance(x, (int, float)):
            out.update(
                {f"{k}@{x:g}": v for k, v in rec.items() if k != x_key and isinstance(v, (int, float))}
            )
    return out


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


def render_overrides(overrides: Mapping[str, object] | tuple[tuple[str, object], ...]) -> list[str]:
    """`--config.KEY=TEXT` arguments that `launch.overrides` reads back as the given values.

    A string is written as it is (a string key takes the text verbatim); any other value as its `repr`,
    which round-trips exactly: a float's repr is the shortest text that parses back to the same float
    (1e-4 -> "0.0001"), ints and bools parse by the key's type, tuples and None by `ast.literal_eval`.
    `check_overrides` confirms the round trip against the experiment's config.
    """
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    return [f"--config.{key}={value if isinstance(value, str) else repr(value)}" for key, value in items]


def _run_overrides(method: Method, seed: int, overrides: list[str]) -> list[str]:
    """The `--config.*` arguments of `method`'s run at `seed`: the seed, the method's overrides, then the
    study's own command-line overrides (later wins)."""
    return [f"--config.seed={seed}", *render_overrides(method.overrides), *overrides]


def _read_back(want, got) -> bool:
    """Whether a config value `got` is the override value `want` (an int given for a float key counts)."""
    if type(want) is int and type(got) is float:
        return got == want
    if isinstance(want, tuple) and isinstance(got, tuple) and len(want) == len(got):
        return all(_read_back(w, g) for w, g in zip(want, got, strict=True))
    return type(got) is type(want) and got == want


def check_overrides(study: Study) -> None:
    """Resolves each method's experiment with its overrides and checks every key reads back as given.

    Raises:
      launch.overrides.ConfigError: an unknown key (with the closest keys and the known ones), a value
        that does not parse as its key's type, or one that reads back as another value or type.
    """
    from launch import train

    for method in study.methods:
        try:
            config = train.resolve_config(method.experiment, render_overrides(method.overrides))
        except config_overrides.ConfigError as e:
            raise config_overrides.ConfigError(f"study {study.name!r}, method {method.name!r}: {e}") from None
        resolved = config_overrides.flat_keys(config)
        for key, value in method.overrides:
            if not _read_back(value, resolved[key]):
                got = resolved[key]
                raise config_overrides.ConfigError(
                    f"study {study.name!r}, method {method.name!r}: override {key!r} = {value!r} "
                    f"({type(value).__name__}) reads back as {got!r} ({type(got).__name__}); give a value "
                    "of the key's type"
                )


# Keys of a run's config.json that do not change its results (ignored when matching an archived run).
_NOT_RESULTS = ("progress",)


def _archived_config(config: dict) -> dict:
    """`config` as its JSON file reads back (tuples as lists), without the `_NOT_RESULTS` keys."""
    config = json.loads(json.dumps(config, sort_keys=True, default=str))
    return {k: v for k, v in config.items() if k not in _NOT_RESULTS}


def _archive_files(run_dir: str, study: Study) -> list[str]:
    """The run's files an archive keeps, relative to the run's workdir."""
    names = ["config.json", "results.json", "stages.json"]
    if study.curve:
        path = run_file(run_dir, study.curve[0])
        if path is not None:
            names.append(os.path.relpath(path, run_dir))
    return [n for n in names if os.path.exists(os.path.join(run_dir, n))]


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def archived_run(archive: str, seed: int, method: Method, config: dict) -> str | None:
    """ARCHIVE/seed_{seed}/{method} if it holds a finished run of exactly `config` (the resolved config
    the run would write, `launch.train`'s config.json), else None (printing why when one is there)."""
    path = os.path.join(archive, f"seed_{seed}", method.name)
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            got = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not os.path.exists(os.path.join(path, "results.json")):
        return None
    want, got = _archived_config(config), _archived_config(got)
    if want != got:
        want, got = _flatten(want), _flatten(got)
        differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        print(f"[study] archive {path}: config differs in {differ}; running it", flush=True)
        return None
    return path


def _copy_run_files(src: str, dst: str, names: list[str]) -> None:
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def run_study(
    study: Study,
    *,
    seeds: int,
    workdir: str,
    overrides: list[str],
    command: str,
    reuse: list[str] | None = None,
    archive: str | None = None,
) -> dict:
    """Runs every (seed, method), sharing stages by fingerprint within a seed (and, with `reuse`, with
    other studies), taking finished runs from `archive` and copying new ones there (module docstring);
    writes the table and the plot."""
    from launch import train

    check_overrides(study)
    start = time.perf_counter()
    results: dict[str, list[dict]] = {}
    for seed in range(seeds):
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        for method in study.methods:
            run_dir = os.path.join(seed_dir, method.name)
            # Stages with the same fingerprint are computed once: by the first method of the seed that
            # needs them (found under seed_dir), or in another study given with --reuse.
            search = ",".join([seed_dir, *(reuse or [])])
            run_args = _run_overrides(method, seed, overrides)
            argv = [
                f"--experiment={method.experiment}",
                f"--workdir={run_dir}",
                f"--reuse={search}",
                *run_args,
            ]
            print(f"[study {study.name}] seed {seed}: {method.name}", flush=True)
            found = None
            if archive is not None:
                config = {"experiment": method.experiment,
                          **train.resolve_config(method.experiment, run_args).to_dict()}  # fmt: skip
                found = archived_run(archive, seed, method, config)
            if found is not None:
                print(f"[study {study.name}] seed {seed}: {method.name} taken from {found}", flush=True)
                _copy_run_files(found, run_dir, _archive_files(found, study))
            else:
                if train.main(argv) != 0:
                    raise SystemExit(f"study {study.name}: run {run_dir} failed")
                if archive is not None:
                    dest = os.path.join(archive, f"seed_{seed}", method.name)
                    _copy_run_files(run_dir, dest, _archive_files(run_dir, study))
            with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
                results.setdefault(method.name, []).append({**json.load(f), **curve_metrics(run_dir, study)})
    table = summarize(study, results)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "table.json"), "w", encoding="utf-8") as f:
        runs_wall = runs_wall_time(table)[0]  # without archive reuse: ≈ wall
        json.dump({"study": study.name, "seeds": seeds, "wall_time_s": wall, "runs_wall_time_s": runs_wall,
                   "command": command, "methods": table}, f, indent=2)  # fmt: skip
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
    parser.add_argument(
        "--archive",
        default=None,
        help="directory of finished runs' small files: runs found there with the same config are not "
        "rerun, new ones are copied there (to split a long study across sittings)",
    )
    args, overrides = parser.parse_known_args(argv)
    name, _, variant = args.study.partition(":")
    try:
        module = importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError:
        module = None
    if module is None or not hasattr(module, "get_study"):
        folder = os.path.dirname(importlib.import_module("experiments").__file__)
        known = sorted(
            m[:-3] for m in os.listdir(folder)
            if m.endswith(".py") and not m.startswith("_")
            and "get_study" in open(os.path.join(folder, m), encoding="utf-8").read()
        )  # fmt: skip
        print(f"error: unknown study {name!r}; studies: {', '.join(known)}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    study = module.get_study(variant or None)
    try:
        check_overrides(study)  # before anything is written
    except config_overrides.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
        + ([f"--archive={args.archive}"] if args.archive else [])
        + overrides
    )
    archive = os.path.abspath(args.archive) if args.archive else None
    run_study(
        study, seeds=args.seeds, workdir=workdir, overrides=overrides, command=command, reuse=reuse,
        archive=archive,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
