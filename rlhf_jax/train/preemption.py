"""Stopping a training loop cleanly: SIGTERM (preemption) and non-finite steps, as exceptions.

Preemption. TPU VMs and batch schedulers announce a preemption with SIGTERM. While `trainer.fit` runs,
a SIGTERM does not kill the process: the loop finishes the step in flight, logs it, saves a checkpoint
at it (waiting for the write) and raises `Preempted`; the launcher then exits with status 143 (128 +
SIGTERM, what a shell reports for a process that SIGTERM killed), and rerunning the same command
resumes from that checkpoint. A hook (e.g. a periodic evaluation) due at that step is skipped. With
several processes the stop step must be the same everywhere, so the signal is left to JAX's preemption
sync manager (started by `jax.distributed.initialize`) and `multihost_utils.reached_preemption_sync_point`
names the step. A SIGTERM outside the loop (data loading, evaluation) keeps its default effect, and a
rerun resumes from the latest periodic checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

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


class PreemptionWatch:
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
