"""Robust DPO on TL;DR pairs whose labels are flipped at a known rate ε (here 0.1), told the true ε.

    python -m launch.train --experiment=rdpo_tldr
    python -m launch.train --experiment=rdpo_tldr:smoke
    python -m launch.train --experiment=rdpo_tldr --config.data.flip_rate=0.2 --config.loss.flip_rate=0.2

Runs an SFT stage first (WORKDIR/sft) unless `--config.init_from=DIR` is given. Hyperparameters:
β = 0.1 and ε = 0.1 as in Chowdhury et al. 2024 (Provably Robust DPO), Sec. 6; evaluation pairs are
never flipped.
"""

from experiments import _base


def get_config(arg=None):
    c = _base.preference(loss=dict(name="rdpo", beta=0.1, flip_rate=0.1), smoke=arg == "smoke")
    c.data.flip_rate = 0.1
    return c
