"""Supervised fine-tuning on Anthropic HH (prompt + chosen response of each pair).

    python -m launch.train --experiment=sft_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz

As in the DPO paper (Rafailov et al. 2023, Sec. 6), the SFT policy is fine-tuned on the chosen
completions of HH. Needs your data: `--config.data.path` (preference pairs; or `--config.data.sft_path`).
"""

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="sft", task="hh", smoke=arg == "smoke")
    c.train = c.sft.copy_and_resolve_references()
    return c
