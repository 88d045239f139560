"""Supervised fine-tuning on TL;DR (the synthetic task unless data paths are given).

    python -m launch.train --experiment=sft_tldr
    python -m launch.train --experiment=sft_tldr:smoke          # seconds on CPU
    python -m launch.train --experiment=sft_tldr --config.data.sft_path=tldr_sft/train.jsonl

Hyperparameters: AdamW with warmup and cosine decay; the RSO/DPO papers fine-tune T5/Pythia SFT
policies on the TL;DR SFT split first (Stiennon et al. 2020's filtered Reddit TL;DR), as here.
"""

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="sft", smoke=arg == "smoke")
    c.train = c.sft.copy_and_resolve_references()
    return c
