"""SLiC-HF on Anthropic HH pairs (needs your data paths).

    python -m launch.train --experiment=slic_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz --config.data.eval_path=hh-rlhf/helpful-base/test.jsonl.gz
    python -m launch.train --experiment=slic_hh:smoke --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz --config.data.eval_path=hh-rlhf/helpful-base/test.jsonl.gz

Runs an SFT stage first (WORKDIR/sft, settings under `config.sft`) unless `--config.init_from=DIR`
names a finished SFT workdir; the policy and the frozen reference both start from it. Hyperparameters: δ
= 1.0 (Zhao et al. 2023); λ = 0.1 is our choice.
"""

from experiments import _base


def get_config(arg=None):
    return _base.preference(
        loss=dict(name="slic", delta=1.0, reg_weight=0.1), task="hh", smoke=arg == "smoke"
    )
