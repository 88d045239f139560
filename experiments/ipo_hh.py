"""IPO on Anthropic HH pairs (needs your data paths).

    python -m launch.train --experiment=ipo_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz --config.data.eval_path=hh-rlhf/helpful-base/test.jsonl.gz
    python -m launch.train --experiment=ipo_hh:smoke --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz --config.data.eval_path=hh-rlhf/helpful-base/test.jsonl.gz

Runs an SFT stage first (WORKDIR/sft, settings under `config.sft`) unless `--config.init_from=DIR`
names a finished SFT workdir; the policy and the frozen reference both start from it. Hyperparameters: β
= 0.1 (Azar et al. 2023).
"""

from experiments import _base


def get_config(arg=None):
    return _base.preference(loss=dict(name="ipo", beta=0.1), task="hh", smoke=arg == "smoke")
