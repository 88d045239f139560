"""Every train, optimizer and checkpoint key is validated when the config loads, before any stage runs."""

import glob
import math
import os

import pytest

from launch import train
from rlhf_jax.pipelines import config as config_lib
from rlhf_jax.train import optim


@pytest.mark.parametrize(
    "experiment, override, message",
    [
        # The SFT stage that dpo_tldr runs first: its section used to be checked only when its loop began.
        ("dpo_tldr:smoke", "--config.sft.log_every=0", "config.sft.log_every must be >= 1, got 0"),
        # The reward model of RSO, its second stage.
        ("rso_tldr:smoke", "--config.rm.learning_rate=nan", "config.rm.learning_rate must be finite and > 0"),
        ("dpo_tldr:smoke", "--config.checkpoint.keep=0", "config.checkpoint.keep must be >= 1, got 0"),
        (
            "sft_tldr:smoke",
            "--config.train.nonfinite=ignore",
            "config.train.nonfinite must be 'stop' or 'skip'",
        ),
        (
            "sft_tldr:smoke",
            "--config.train.max_nonfinite_fraction=1.5",
            "config.train.max_nonfinite_fraction",
        ),
        ("dpo_tldr:smoke", "--config.train.eval_every=-1", "config.train.eval_every must be >= 0"),
        (
            "dpo_tldr:smoke",
            "--config.checkpoint.every_steps=-5",
            "config.checkpoint.every_steps must be >= 0",
        ),
    ],
)
def test_bad_key_stops_the_launch_before_any_stage(tmp_path, capsys, experiment, override, message):
    workdir = tmp_path / "run"
    assert train.main([f"--experiment={experiment}", f"--workdir={workdir}", override]) == 2
    assert message in capsys.readouterr().err
    assert not glob.glob(str(workdir / "**" / "metrics.jsonl"), recursive=True)
    assert not os.path.exists(workdir)  # nothing ran: not even the workdir was made


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", math.nan), ("learning_rate", math.inf), ("learning_rate", 0.0), ("warmup_steps", -1),
     ("final_lr_fraction", 1.5), ("weight_decay", -0.1), ("b1", 1.0), ("b2", math.nan), ("eps", 0.0),
     ("grad_clip_norm", math.inf)],
)  # fmt: skip
def test_optimizer_ranges(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        optim.OptimConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [("log_every", 0), ("eval_batch_size", 0), ("eval_every", -1), ("nonfinite", "warn"),
     ("max_nonfinite_fraction", -0.1), ("steps", -1), ("reference", "cached")],
)  # fmt: skip
def test_train_ranges(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        config_lib.TrainConfig(**{field: value})
