"""Where training metrics go: `metrics.jsonl`, TensorBoard event files, a progress bar, a PNG plot.

Only process 0 writes. On resume, records past the restored step (written after the last checkpoint
by the interrupted run, and about to be recomputed) are moved to `metrics.superseded.jsonl`, so
`metrics.jsonl` holds each step once and nothing written is deleted.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np


def _to_python(value):
    value = np.asarray(value)
    if value.ndim == 0:
        v = value.item()
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # JSON has no NaN/inf; keep them visible as strings
        return v
    return value.tolist()


class MetricsWriter:
    """Appends one JSON object per logged step to `WORKDIR/metrics.jsonl` and mirrors it to TensorBoard.

    Args:
      workdir: the run's directory.
      resume_step: the step training resumes from (0 for a fresh run); later records are superseded.
      tensorboard: also write TensorBoard event files under `WORKDIR/tensorboard`.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._supersede_after(resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _supersede_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        keep, drop = [], []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record_step = json.loads(line).get("step", 0)
                except json.JSONDecodeError:  # a line cut by a kill: superseded, not deleted
                    drop.append(line if line.endswith("\n") else line + "\n")
                    continue
                (keep if record_step <= step else drop).append(line)
        if drop:
            with open(os.path.join(os.path.dirname(self.path), "metrics.superseded.jsonl"), "a") as f:
                f.writelines(drop)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> dict:
        """Writes the metrics of `step` (device arrays are fetched); returns the Python values."""
        record = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl`, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, keys: tuple[str, ...] = ("loss",), filename: str = "curves.png") -> str | None:
    """Plots metrics over steps into `WORKDIR/filename` (one panel per key present); returns the path."""
    records = read_metrics(workdir)
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if not present or jax.process_index() != 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present, strict=True):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def keep_records_up_to(path: str, step: int) -> None:
    """Drops records with `step` > `step` from a JSONL file (a resumed run recomputes them)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
