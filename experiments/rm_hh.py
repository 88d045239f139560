"""Reward model on Anthropic HH pairs (pointwise Bradley-Terry, or `--config.reward_kind=pairwise`).

python -m launch.train --experiment=rm_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz
"""

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="reward", task="hh", smoke=arg == "smoke")
    c.reward_kind = "pointwise"
    return c
