"""Orbax checkpoints of the train state and the data iterator, saved asynchronously, restored exactly.

A checkpoint holds one pytree (`state`: params, optimizer state, step, RNG key data) and, when given,
the grain iterator's state (`data`). Orbax writes each step into a temporary directory and renames it
when complete, so a checkpoint interrupted while being written (kill -9, preemption) is never the one
restored: `latest_step` only sees finished ones, and temporaries are cleaned up at start.

Restoring takes an abstract target (shapes, dtypes and shardings), so a checkpoint saved on one mesh
restores onto another.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

try:  # grain is a runtime dependency; imported lazily-safe for users restoring params only.
    import grain
except ImportError:  # pragma: no cover
    grain = None


class CheckpointError(RuntimeError):
    """A checkpoint directory could not be read."""


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) describing a pytree of arrays: a restore target."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves every `every_steps` steps (and when forced), keeps the last `keep`.

    Args:
      directory: where step directories live (created if missing).
      every_steps: save when step % every_steps == 0 (0 disables periodic saves; forced saves still work).
      keep: how many finished checkpoints to keep.
      async_save: write in a background thread while training goes on.
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every finished checkpoint's step, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator state) at `step`; returns whether it saved."""
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return True

    def restore(self, step: int | None, target, data_iterator=None):
        """Restores the state at `step` (default: latest) onto `target`'s shapes and shardings.

        If the newest checkpoint cannot be read (corrupt files), logs which and falls back to the
        next older one; raises CheckpointError naming every directory tried if none can be read.

        Args:
          step: a step, or None for the latest.
          target: a pytree of arrays or ShapeDtypeStructs (with shardings) to restore into.
          data_iterator: a grain iterator whose state is set from the checkpoint, if given.

        Returns:
          (step, state).
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = abstract_like(target)
        errors = []
        for s in steps:
            items = {"state": ocp.args.StandardRestore(abstract)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self._manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any read failure means try the previous one
                path = os.path.join(self.directory, str(s))
                logging.warning("checkpoint %s could not be restored (%s); trying an older one", path, e)
                errors.append(f"{path}: {type(e).__name__}: {e}")
                continue
            return s, restored["state"]
        raise CheckpointError("no readable checkpoint; tried:\n  " + "\n  ".join(errors))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
