"""The training loop: feed batches to a jitted step, log, checkpoint, stop on non-finite values.

The step never applies a non-finite update (`state.apply_gradients`), so the loop only looks at the
non-finite counter when it syncs with the device anyway (log and checkpoint steps): with
`nonfinite="stop"` it then waits for the last good checkpoint to be on disk and raises an error naming
the first bad step; with `nonfinite="skip"` it carries on and the count is in `metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import MetricsWriter


class NonFiniteError(FloatingPointError):
    """The loss or a gradient was NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Attributes:
    steps: total optimizer steps (the loop resumes from the state's step).
    log_every: write metrics every this many steps (and at the last step).
    nonfinite: "stop" (raise, after the last good checkpoint is safe) or "skip" (count and go on).
    progress: show a tqdm bar.
    """

    steps: int
    log_every: int = 10
    nonfinite: str = "stop"
    progress: bool = True

    def __post_init__(self):
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.steps < 0 or self.log_every < 1:
            raise ValueError(f"steps must be >= 0 and log_every >= 1, got {self.steps}, {self.log_every}")


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
    tokens_in: Callable[[dict], int] | None = None,
    description: str = "train",
    callback: Callable[[int, object], None] | None = None,
):
    """Runs `step_fn` from `state.step` to `config.steps`; returns the final state.

    Args:
      state: the (possibly restored) train state.
      step_fn: jitted `(state, batch, frozen) -> (state, metrics)`.
      frozen: the step's read-only input (reference params or None).
      batches: yields device-ready global batches.
      config: loop settings.
      checkpointer: saves state and `data_iterator` at its interval and at the end (None: no saves).
      writer: metrics sink.
      data_iterator: the grain iterator behind `batches`, checkpointed with the state.
      tokens_in: counts the real tokens of a (host) batch, for tokens/s.
      description: the progress bar's label.
      callback: called as callback(step, state) after each step (e.g. a periodic evaluation).
    """
    start = int(jax.device_get(state.step))
    is_main = jax.process_index() == 0
    bar = tqdm(total=config.steps, initial=start, desc=description, disable=not (config.progress and is_main))
    tokens = 0
    t0 = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
        batch = next(batches)
        if tokens_in is not None:
            tokens += tokens_in(batch)
        state, metrics = step_fn(state, batch, frozen)
        last = step == config.steps
        saving = checkpointer is not None and (last or checkpointer.should_save(step))
        if last or saving or step % config.log_every == 0:
            metrics = jax.device_get(metrics)
            if metrics.get("nonfinite_steps", 0) > 0 and config.nonfinite == "stop":
                first = int(jax.device_get(state.first_nonfinite_step))
                if checkpointer is not None:
                    checkpointer.wait()
                    good = checkpointer.latest_step()
                    where = f"last good checkpoint: step {good} in {checkpointer.directory}"
                else:
                    where = "no checkpointing configured"
                bar.close()
                raise NonFiniteError(
                    f"non-finite loss or gradient at step {first} (update not applied); {where}. "
                    "Set --config.train.nonfinite=skip to skip such steps instead."
                )
            elapsed = time.perf_counter() - t0
            record = {k: float(np.asarray(v)) for k, v in metrics.items()}
            if tokens_in is not None:
                record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
            writer.write(step, record)
            bar.set_postfix(
                loss=f"{record.get('loss', float('nan')):.4f}",
                tok_s=f"{record.get('tokens_per_s', 0):.0f}",
            )
            tokens, t0 = 0, time.perf_counter()
        if saving:
            checkpointer.save(step, state, data_iterator, force=True)
        if callback is not None:
            callback(step, state)
        bar.update(1)
    bar.close()
    if checkpointer is not None:
        checkpointer.wait()
    logging.info("%s: finished at step %d", description, config.steps)
    return state
