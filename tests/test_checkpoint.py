"""Checkpoint recovery: corrupt steps moved aside; I/O errors and config mismatches raise, nothing lost."""

import errno
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils.epath import gpath

from rlhf_jax import models
from rlhf_jax.train import checkpoint
from rlhf_jax.train import state as state_lib

CFG = models.preset("tiny", vocab_size=64, max_len=32)


def _train_state(value: float, cfg=CFG):
    """A real TrainState (params, Adam state, counters) whose params are all `value`."""
    params = models.init_params(models.Transformer(cfg), jax.random.key(0))
    params = jax.tree.map(lambda p: jnp.full_like(p, value), params)
    state = state_lib.create(params, optax.adam(1e-3), jax.random.key(0))
    return state.replace(step=jnp.int32(value))


def _save(directory, steps, keep=3):
    ck = checkpoint.Checkpointer(str(directory), every_steps=1, keep=keep)
    for s in steps:
        assert ck.save(s, _train_state(float(s)), force=True)
    ck.close()


def _garble(step_dir):
    """Overwrites every file of the saved state (tensorstore data and metadata) with junk."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"corrupt")


def _files(directory):
    return sorted(
        os.path.relpath(os.path.join(r, f), directory) for r, _, fs in os.walk(directory) for f in fs
    )


def test_corrupt_newest_is_moved_aside_so_the_step_can_be_saved_again(tmp_path, caplog):
    _save(tmp_path, [1, 2], keep=2)
    _garble(tmp_path / "2")
    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2)
    step, state = ck.restore(None, _train_state(0.0))
    assert step == 1 and int(state.step) == 1
    assert any(str(tmp_path / "2") in r.message and "older" in r.message for r in caplog.records)
    # Kept for inspection, but no longer a step: it neither counts towards `keep` nor blocks a save.
    assert (tmp_path / "2.corrupt").is_dir() and ck.all_steps() == [1]
    assert ck.save(2, _train_state(2.5), force=True)
    ck.close()
    caplog.clear()
    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2)
    step, state = ck.restore(None, _train_state(0.0))
    assert step == 2 and float(state.params["lm_head"][0, 0]) == 2.5
    assert not any("unreadable" in r.message for r in caplog.records)  # no fallback any more
    ck.save(3, _train_state(3.0), force=True)
    ck.wait()
    assert ck.all_steps() == [2, 3]  # keep=2 counts good checkpoints only
    ck.close()


def test_shape_mismatch_names_the_difference_and_moves_nothing(tmp_path):
    _save(tmp_path, [1, 2])
    before = _files(tmp_path)
    wider = models.preset("tiny", vocab_size=64, max_len=32, d_model=32)
    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="another config") as info:
        ck.restore(None, _train_state(0.0, wider))
    assert "params/decoder/embedding: shape (64, 64) in the checkpoint, (64, 32) now" in str(info.value)
    assert ck.all_steps() == [1, 2] and _files(tmp_path) == before
    ck.close()


def test_transient_read_error_raises_and_moves_nothing(tmp_path, monkeypatch):
    _save(tmp_path, [1, 2])
    before = _files(tmp_path)
    real_open = gpath.PosixGPath.open

    def failing_open(self, *args, **kwargs):  # the storage fails while reading step 2
        if f"{os.sep}2{os.sep}" in str(self):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(gpath.PosixGPath, "open", failing_open)
    ck = checkpoint.Checkpointer(str(tmp_path), every_steps=1)
    with pytest.raises(checkpoint.CheckpointError, match="I/O error.*nothing was moved"):
        ck.restore(None, _train_state(0.0))
    monkeypatch.undo()
    assert ck.all_steps() == [1, 2] and _files(tmp_path) == before
    step, state = ck.restore(None, _train_state(0.0))  # readable again: the newest one restores
    assert step == 2 and int(state.step) == 2
    ck.close()


def test_tensorstore_status_decides_transient():
    assert checkpoint.is_transient(ValueError("UNAVAILABLE: Error reading local file: Input/output error"))
    assert checkpoint.is_transient(PermissionError(errno.EACCES, "denied"))
    assert not checkpoint.is_transient(ValueError("DATA_LOSS: Error decoding b-tree node"))
    assert not checkpoint.is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not checkpoint.is_transient(np.linalg.LinAlgError("unrelated"))
