"""Reward model on TL;DR preference pairs: pointwise Bradley-Terry (default) or RSO's pairwise ranker.

    python -m launch.train --experiment=rm_tldr
    python -m launch.train --experiment=rm_tldr:smoke
    python -m launch.train --experiment=rm_tldr --config.rm.kind=pairwise   # RSO's ranking model

With `init_from` empty the trunk starts from an SFT stage run first in WORKDIR/sft. Bradley-Terry as
in Stiennon et al. 2020 / Ouyang et al. 2022; the pairwise ranking model as in RSO (Liu et al. 2024).
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="reward", smoke=arg == "smoke")
    c.rm = ml_collections.ConfigDict(dict(kind="pointwise"))  # the train settings are `train`'s
    c.train.learning_rate = 3e-4
    c.train.steps = 400 if arg != "smoke" else 6
    return c
