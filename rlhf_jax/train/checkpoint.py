"""Orbax checkpoints of the train state and the data iterator, saved asynchronously, restored exactly.

A checkpoint holds one pytree (`state`: params, optimizer state, step, RNG key data) and, when given,
the grain iterator's state (`data`). Orbax writes each step into a temporary directory and renames it
when complete, so a checkpoint interrupted while being written (kill -9, preemption) is never the one
restored: `latest_step` only sees finished ones, and temporaries are cleaned up at start.

Restoring takes an abstract target (shapes, dtypes and shardings), so a checkpoint saved on one mesh
restores onto another. A failed restore is one of three things, handled differently:

* **corruption** (missing or garbled files, undecodable tensorstore data, bad metadata): the restore
  falls back to the next older checkpoint with a warning, and once one is restored the unreadable newer
  step directories are moved aside to `<step>.corrupt` (kept for inspection, no longer counted towards
  `keep`, and no longer in the way of a new save at that step). With several processes, each reads
  its own shards: they agree on the newest step every process could read (one collective), restore
  that one, and move aside the same newer steps;
* **a transient I/O error** (an `OSError` such as EIO, EACCES or ENOSPC, or a tensorstore UNAVAILABLE,
  PERMISSION_DENIED, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED): `CheckpointError` is raised and nothing
  is moved, since a retry may well read the same checkpoint;
* **a config mismatch** (the checkpoint's tree or shapes differ from this run's state: the model or
  optimizer changed): `CheckpointMismatchError` is raised, listing what differs, and nothing is moved.
"""

from __future__ import annotations

import errno
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

try:  # grain is a runtime dependency; imported lazily-safe for users restoring params only.
    import grain
except ImportError:  # pragma: no cover
    grain = None


class CheckpointError(RuntimeError):
    """A checkpoint directory could not be read."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint holds a differently shaped state: it belongs to another model or optimizer config."""


# Errors of a missing file, which inside a finished checkpoint mean corruption; any other OSError is
# an I/O failure that a retry may not see.
_MISSING_FILE_ERRNOS = (errno.ENOENT, errno.EISDIR, errno.ENOTDIR)
# tensorstore raises ValueError("<STATUS>: ..."); these statuses are what absl maps EIO, EAGAIN,
# EACCES/EPERM, ENOSPC and ETIMEDOUT to.
_TRANSIENT_STATUSES = ("UNAVAILABLE", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")


def is_transient(error: BaseException) -> bool:
    """Whether a restore failure is an I/O error a retry may not see (not proof of a bad checkpoint)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno not in _MISSING_FILE_ERRNOS:
            return True
        if isinstance(error, ValueError) and str(error).startswith(_TRANSIENT_STATUSES):
            return True
        error = error.__cause__ or error.__context__
    return False


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) describing a pytree of arrays: a restore target."""

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """{"params/decoder/embedding": shape, ...}: dict keys, attributes and indices alike."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def tree_differences(saved, target, limit: int = 8) -> list[str]:
    """How the saved tree (from checkpoint metadata) differs from `target` in paths and shapes."""
    a, b = _shapes_by_path(saved), _shapes_by_path(target)
    diffs = []  # in the target's order (params before optimizer state), then what only the checkpoint has
    for p, shape in b.items():
        if p not in a:
            diffs.append(f"{p}: not in the checkpoint")
        elif a[p] != shape:
            diffs.append(f"{p}: shape {a[p]} in the checkpoint, {shape} now")
    diffs += [f"{p}: only in the checkpoint" for p in a if p not in b]
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


class _UnreadableError(Exception):
    """A checkpoint step that cannot be read (corrupt or incomplete): the caller tries an older one."""


class Checkpointer:
    """Saves every `every_steps` steps (and when forced), keeps the last `keep`.

    Args:
      directory: where step directories live (created if missing).
      every_steps: save when step % every_steps == 0 (0 disables periodic saves; forced saves still work).
      keep: how many finished checkpoints to keep.
      async_save: write in a background thread while training goes on.
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int = 2, async_save: bool = True):
        if keep < 1 or every_steps < 0:
            raise ValueError(f"checkpoint keep={keep} must be >= 1 and every_steps={every_steps} >= 0")
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

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator state) at `step`; returns whether it saved.

        A step that already has a checkpoint is not written again (that checkpoint holds the same
        state: it was saved at this step by an earlier run or call).
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return True

    def _check_tree(self, step: int, abstract) -> None:
        """Raises CheckpointMismatchError if `step`'s saved tree differs from `abstract`.

        Unreadable metadata is left to the restore itself to judge (Orbax can restore without it).
        """
        try:
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self.step_dir(step)) / "state").tree
        except Exception as e:  # noqa: BLE001 - classified here; corruption is judged by the restore
            if is_transient(e):
                raise CheckpointError(
                    f"I/O error reading checkpoint {self.step_dir(step)}: {type(e).__name__}: {e}. "
                    "Not treated as corruption: nothing was moved; retry when the storage is readable."
                ) from e
            return
        diffs = tree_differences(saved, abstract)
        if diffs:
            raise CheckpointMismatchError(
                f"checkpoint {self.step_dir(step)} holds a differently shaped train state than this run "
                "builds; it belongs to another config (model or optimizer settings changed). Differences:\n  "
                + "\n  ".join(diffs)
                + "\nUse the original config, or a new workdir (or move "
                + f"{self.directory} away) to start over."
            )

    def _move_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to `<step>.corrupt` (process 0) and forgets them."""
        if jax.process_index() == 0:
            for s in steps:
                dest = self.step_dir(s) + ".corrupt"
                n = 1
                while os.path.exists(dest):
                    dest, n = f"{self.step_dir(s)}.corrupt.{n}", n + 1
                os.rename(self.step_dir(s), dest)
                logging.warning("moved unreadable checkpoint %s aside to %s", self.step_dir(s), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("rlhf_jax checkpoint: corrupt steps moved aside")
        self._manager.reload()

    def restore(self, step: int | None, target, data_iterator=None):
        """Restores the state at `step` (default: latest) onto `target`'s shapes and shardings.

        With `step=None`, a newest checkpoint that is corrupt is skipped with a warning for the next
        older one; once one is restored, the corrupt newer ones are moved aside (module docstring).

        Args:
          step: a step, or None for the latest.
          target: a pytree of arrays or ShapeDtypeStructs (with shardings) to restore into.
          data_iterator: a grain iterator whose state is set from the checkpoint, if given.

        Returns:
          (step, state).

        Raises:
          CheckpointMismatchError: the checkpoint's tree or shapes differ from `target`'s.
          CheckpointError: a transient I/O error (nothing moved), or no checkpoint could be read (the
            message names every directory tried).
        """
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = abstract_like(target)
        corrupt, errors = [], []
        restored_step, state = -1, None
        for s in steps:
            try:
                state = self._restore_one(s, abstract, data_iterator)
            except _UnreadableError as e:
                corrupt.append(s)
                errors.append(str(e))
                continue
            restored_step = s
            break
        if jax.process_count() > 1:
            # Every process must restore the same step and agree on what is moved aside: a step one
            # process could not read counts as unreadable for all (each process reads its own shards).
            from jax.experimental import multihost_utils

            agreed = int(np.min(multihost_utils.process_allgather(np.asarray(restored_step, np.int64))))
            if agreed != restored_step and agreed >= 0:
                state = self._restore_one(agreed, abstract, data_iterator)  # raises if unreadable here
            corrupt = [s for s in steps if s > agreed] if agreed >= 0 else corrupt
            restored_step = agreed
        if restored_step < 0:
            raise CheckpointError("no readable checkpoint; tried:\n  " + "\n  ".join(errors))
        if corrupt:
            self._move_aside(corrupt)
        return restored_step, state

    def _restore_one(self, s: int, abstract, data_iterator):
        """The state at step `s`; raises `_UnreadableError` if the step is corrupt, else CheckpointError."""
        self._check_tree(s, abstract)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(s, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - classified: transient I/O raises, the rest is corruption
            if is_transient(e):
                raise CheckpointError(
                    f"I/O error reading checkpoint {self.step_dir(s)}: {type(e).__name__}: {e}. Not "
                    "treated as corruption: nothing was moved; retry when the storage is readable."
                ) from e
            logging.warning(
                "checkpoint %s is unreadable (%s: %s); trying an older one",
                self.step_dir(s),
                type(e).__name__,
                e,
            )
            raise _UnreadableError(f"{self.step_dir(s)}: {type(e).__name__}: {e}") from e
        return restored["state"]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
