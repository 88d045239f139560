"""IPO on TL;DR pairs.

    python -m launch.train --experiment=ipo_tldr
    python -m launch.train --experiment=ipo_tldr:smoke

Runs an SFT stage first (WORKDIR/sft, settings under `config.sft`) unless `--config.init_from=DIR`
names a finished SFT workdir; the policy and the frozen reference both start from it. Hyperparameters: β
(the paper's τ) = 0.1, Azar et al. 2023 Eq. 17, on summed log-probs (target margin 1/(2β) = 5 nats).
"""

from experiments import _base


def get_config(arg=None):
    return _base.preference(loss=dict(name="ipo", beta=0.1), task="tldr", smoke=arg == "smoke")
