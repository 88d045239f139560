"""Robust DPO on Anthropic HH pairs with labels flipped at ε = 0.1 (needs your data paths).

    python -m launch.train --experiment=rdpo_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz

Hyperparameters: β = 0.1, ε = 0.1 (Chowdhury et al. 2024).
"""

from experiments import _base


def get_config(arg=None):
    c = _base.preference(loss=dict(name="rdpo", beta=0.1, flip_rate=0.1), task="hh", smoke=arg == "smoke")
    c.data.flip_rate = 0.1
    return c
