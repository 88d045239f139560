"""The training loop: feed batches to a jitted step, log, checkpoint, stop on non-finite values or SIGTERM.

Host syncs. Between log and checkpoint steps the loop never waits for the device: tokens/s is counted
on the host (numpy) batch before it is placed on the devices, and the metrics are copied (with an
explicit `jax.device_get`) only at log and checkpoint steps.

Non-finite steps. The step never applies a non-finite update (`state.apply_gradients`), so the loop
only looks at the non-finite counter at its host syncs: with `nonfinite="stop"` it then waits for the
last good checkpoint to be on disk and raises `NonFiniteError` naming the first bad step; with
`nonfinite="skip"` it carries on (the count is in `metrics.jsonl` and the stage's `results.json`) until
more than `max_nonfinite_fraction` of the run's steps were skipped, and then raises `NonFiniteError`.

Preemption. TPU VMs and batch schedulers announce a preemption with SIGTERM. While the loop runs, a
SIGTERM does not kill the process: the loop finishes the step in flight, logs it, saves a checkpoint at
it (waiting for the write) and raises `Preempted`; the launcher then exits with status 143 (128 +
SIGTERM, what a shell reports for a process that SIGTERM killed), and rerunning the same command resumes
from that checkpoint. A periodic evaluation (`callback`) due at that step is skipped. With several
processes the stop step must be the same everywhere, so the signal is left to JAX's preemption sync
manager (started by `jax.distributed.initialize`) and `multihost_utils.reached_preemption_sync_point`
names the step. A SIGTERM outside the loop (data loading, evaluation) keeps its default effect, and a
rerun resumes from the latest periodic checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import MetricsWriter

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: a shell's status for a process that SIGTERM ended


class NonFiniteError(FloatingPointError):
    """The loss or a gradient was NaN or infinite (or, when skipping, too often)."""


class Preempted(Exception):  # noqa: N818 - a requested stop, not an error
    """SIGTERM stopped training after a checkpoint was saved; rerunning the command resumes from it.

    Attributes:
      step: the last step taken (and checkpointed).
      stage: the stage's name (the loop's `description`).
      checkpoint_dir: where the checkpoint is, or None when the loop had no checkpointer.
    """

    def __init__(self, *, step: int, stage: str, checkpoint_dir: str | None):
        self.step, self.stage, self.checkpoint_dir = step, stage, checkpoint_dir
        saved = (
            f"checkpoint saved in {checkpoint_dir}" if checkpoint_dir else "no checkpointing, nothing saved"
        )
        super().__init__(
            f"preempted by SIGTERM at step {step} of stage {stage}; {saved}; rerun the same command to resume"
        )


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Attributes:
    steps: total optimizer steps (the loop resumes from the state's step).
    log_every: write metrics every this many steps (and at checkpoint steps and the last step).
    nonfinite: "stop" (raise, after the last good checkpoint is safe) or "skip" (count and go on).
    max_nonfinite_fraction: with "skip", raise once more than this fraction of `steps` were skipped.
    progress: show a tqdm bar.
    """

    steps: int
    log_every: int = 10
    nonfinite: str = "stop"
    max_nonfinite_fraction: float = 0.05
    progress: bool = True

    def __post_init__(self):
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.steps < 0 or self.log_every < 1:
            raise ValueError(f"steps must be >= 0 and log_every >= 1, got {self.steps}, {self.log_every}")
        if not 0.0 <= self.max_nonfinite_fraction <= 1.0:
            raise ValueError(f"max_nonfinite_fraction must be in [0, 1], got {self.max_nonfinite_fraction}")


class _PreemptionWatch:
    """Says after each step whether to stop: SIGTERM seen (one process), or JAX's agreed step (several).

    One process: a SIGTERM handler that only sets a flag, installed for the loop's lifetime (`close`
    puts the previous one back). Several: JAX's preemption sync manager owns SIGTERM.
    """

    def __init__(self):
        self.received = False
        self._previous = None
        self._installed = False
        self._sync = jax.process_count() > 1
        if self._sync:
            if not jax.config.jax_enable_preemption_service:
                logging.warning("jax_enable_preemption_service is off: SIGTERM will not save a checkpoint")
                self._sync = False
            return
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training outside the main thread: SIGTERM will not save a checkpoint")
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.received = True  # only a flag: the handler may run between any two bytecodes

    def reached(self, step: int) -> bool:
        if self._sync:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _global_count(n: int) -> int:
    """`n` summed over processes (a collective; called at log steps only, which every process reaches)."""
    if jax.process_count() == 1:
        return n
    # float32: exact to 2**24 and then to 7 digits, plenty for a rate; int64 is unavailable without x64.
    return int(np.sum(multihost_utils.process_allgather(np.float32(n))))


def run(
    *,
    state,
    step_fn: Callable,
    frozen,
    batches: Iterator,
    config: LoopConfig,
    checkpointer: Checkpointer | None,
    writer: MetricsWriter,
    data_iterator=None,
    place: Callable[[dict], dict] | None = None,
    tokens_in: Callable[[dict], int] | None = None,
    description: str = "train",
    callback: Callable[[int, object], None] | None = None,
):
    """Runs `step_fn` from `state.step` to `config.steps`; returns the final state.

    Args:
      state: the (possibly restored) train state.
      step_fn: jitted `(state, batch, frozen) -> (state, metrics)`.
      frozen: the step's read-only input (reference params or None).
      batches: yields this process's host batches (or device-ready batches when `place` is None).
      config: loop settings.
      checkpointer: saves state and `data_iterator` at its interval and at the end (None: no saves).
      writer: metrics sink.
      data_iterator: the grain iterator behind `batches`, checkpointed with the state.
      place: puts a host batch on the devices (e.g. `sharding.shard_batch`); None: use it as it is.
      tokens_in: counts the real tokens of a host batch, before `place` (so no device sync). The
        logged `tokens_per_s` is the global figure: every process's count since the previous log
        step, summed over processes at the log step, per second of wall time.
      description: the stage's name, for the progress bar and messages.
      callback: called as callback(step, state) after each step (e.g. a periodic evaluation).

    Raises:
      NonFiniteError: a non-finite step with `nonfinite="stop"`, or too many with "skip".
      Preempted: SIGTERM arrived; the state after the step named in it is checkpointed.
    """
    start = int(jax.device_get(state.step))
    is_main = jax.process_index() == 0
    bar = tqdm(total=config.steps, initial=start, desc=description, disable=not (config.progress and is_main))
    tokens = 0
    t0 = time.perf_counter()

    def last_good() -> str:
        if checkpointer is None:
            return "no checkpointing configured"
        checkpointer.wait()
        good = checkpointer.latest_step()
        if good is None:
            return f"no checkpoint saved yet in {checkpointer.directory}"
        return f"last good checkpoint: step {good} in {checkpointer.directory}"

    def check_skipped(skipped: int) -> None:
        limit = config.max_nonfinite_fraction * config.steps
        if config.nonfinite == "skip" and skipped > limit:
            raise NonFiniteError(
                f"{description}: {skipped} of {config.steps} steps were skipped for a non-finite loss or "
                f"gradient, more than the stage's max_nonfinite_fraction={config.max_nonfinite_fraction} "
                f"allows ({limit:g} steps); {last_good()}. Lower the learning rate, or raise the limit."
            )

    def log(step: int, state, metrics) -> None:
        nonlocal tokens, t0
        metrics = jax.device_get(metrics)
        skipped = int(metrics.get("nonfinite_steps", 0))
        if skipped > 0 and config.nonfinite == "stop":
            first = int(jax.device_get(state.first_nonfinite_step))
            raise NonFiniteError(
                f"non-finite loss or gradient at step {first} (update not applied); {last_good()}. "
                "Set --config.train.nonfinite=skip to skip such steps instead."
            )
        check_skipped(skipped)
        elapsed = time.perf_counter() - t0
        record = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if tokens_in is not None:
            record["tokens_per_s"] = _global_count(tokens) / max(elapsed, 1e-9)
        writer.write(step, record)
        bar.set_postfix(
            loss=f"{record.get('loss', float('nan')):.4f}",
            tok_s=f"{record.get('tokens_per_s', 0):.0f}",
        )
        tokens, t0 = 0, time.perf_counter()

    preemption = _PreemptionWatch()
    try:
        for step in range(start + 1, config.steps + 1):
            batch = next(batches)
            if tokens_in is not None:
                tokens += tokens_in(batch)
            if place is not None:
                batch = place(batch)
            state, metrics = step_fn(state, batch, frozen)
            last = step == config.steps
            saving = checkpointer is not None and (last or checkpointer.should_save(step))
            logged = last or saving or step % config.log_every == 0
            if logged:
                log(step, state, metrics)
            if saving:
                checkpointer.save(step, state, data_iterator, force=True)
            if preemption.reached(step):
                if not logged:
                    log(step, state, metrics)
                if checkpointer is not None:
                    checkpointer.save(step, state, data_iterator, force=True)
                    checkpointer.wait()
                raise Preempted(
                    step=step,
                    stage=description,
                    checkpoint_dir=checkpointer.directory if checkpointer is not None else None,
                )
            if callback is not None:
                callback(step, state)
            bar.update(1)
    finally:
        preemption.close()
        bar.close()
    if checkpointer is not None:
        checkpointer.wait()
    if config.nonfinite == "skip":  # also when resumed at the last step, with no step run here
        check_skipped(int(jax.device_get(state.nonfinite_count)))
    logging.info("%s: finished at step %d", description, config.steps)
    return state
