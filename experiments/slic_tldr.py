"""SLiC-HF on TL;DR pairs: rank calibration plus regularisation towards the chosen response.

    python -m launch.train --experiment=slic_tldr
    python -m launch.train --experiment=slic_tldr:smoke

Runs an SFT stage first (WORKDIR/sft, settings under `config.sft`) unless `--config.init_from=DIR`
names a finished SFT workdir; the policy and the frozen reference both start from it. Hyperparameters:
calibration margin δ = 1.0 (Zhao et al. 2023, SLiC-HF); regularisation weight λ = 0.1 is our choice for
this scale (the paper tunes it).
"""

from experiments import _base


def get_config(arg=None):
    return _base.preference(
        loss=dict(name="slic", delta=1.0, reg_weight=0.1), task="tldr", smoke=arg == "smoke"
    )
