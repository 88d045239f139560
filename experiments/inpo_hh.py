"""INPO on Anthropic HH (needs your data): T online iterations from the SFT policy.

    python -m launch.train --experiment=inpo_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz --config.data.eval_path=hh-rlhf/helpful-base/test.jsonl.gz
    python -m launch.train --experiment=inpo_hh:smoke --config.data.path=hh.jsonl.gz

Paper defaults (Zhang et al. 2024): T = 3, K = 8, η = 0.005, τ = η/3; the oracle is a reward model
trained on the HH pairs (best vs worst of K). Without a gold reward the win rates are by the proxy only.
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="inpo", task="hh", smoke=False)
    c.loss = ml_collections.ConfigDict(dict(name="inpo", eta=0.005))
    c.rm = _base.rm_section(steps=400, batch_size=32, learning_rate=3e-4, warmup_steps=20)
    c.train = _base.train_section(steps=100, batch_size=32, learning_rate=1e-4, warmup_steps=10)
    c.train.reference = "precomputed"
    c.inpo = ml_collections.ConfigDict(
        dict(iterations=3, num_samples=8, num_prompts=512, reference="sft",
             temperature=1.0, top_k=0, max_new_tokens=128)
    )  # fmt: skip
    c.eval.max_new_tokens = 128
    if arg == "smoke":
        _base.shrink(c)
        c.inpo.iterations = 2
        c.inpo.num_samples = 4
        c.inpo.num_prompts = 8
        c.inpo.max_new_tokens = 16
        c.eval.max_new_tokens = 16
    return c
