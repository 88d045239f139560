"""Reward model on Anthropic HH pairs (pointwise Bradley-Terry, or `--config.rm.kind=pairwise`).

python -m launch.train --experiment=rm_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="reward", task="hh", smoke=arg == "smoke")
    c.rm = ml_collections.ConfigDict(dict(kind="pointwise"))  # the train settings are `train`'s
    return c
