"""RSO on Anthropic HH (needs your data): SFT on the chosen responses → reward model on the pairs →
sample N → rejection sampling of M → sigmoid-norm training → win rates vs SFT by the reward model.

    python -m launch.train --experiment=rso_hh --config.data.path=hh-rlhf/helpful-base/train.jsonl.gz --config.data.eval_path=hh-rlhf/helpful-base/test.jsonl.gz
    python -m launch.train --experiment=rso_hh:smoke --config.data.path=hh.jsonl.gz

Paper settings (Liu et al. 2024, Sec. 5, also run on HH): N = 64, M = 8, β = 0.5, γ = 0.05, temperature
0.7, top-k 40. HH has no gold reward, so only the proxy (reward-model) win rates are reported.
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="rso", task="hh", smoke=False)
    c.loss = ml_collections.ConfigDict(dict(name="sigmoid_norm", gamma=0.05))
    c.rm = _base.rm_section(steps=400, batch_size=32, learning_rate=3e-4, warmup_steps=20)
    c.train = _base.train_section(steps=200, batch_size=32, learning_rate=1e-4, warmup_steps=10)
    c.train.reference = "precomputed"
    c.rso = ml_collections.ConfigDict(
        dict(pairs="rso", ranking="first_round", num_prompts=1024,
             num_candidates=64, num_accepted=8, beta=0.5, temperature=0.7, top_k=40, max_new_tokens=128,
             proposal_correction=False)
    )  # fmt: skip
    c.eval.max_new_tokens = 128
    if arg == "smoke":
        _base.shrink(c)
        c.rso.num_prompts = 8
        c.rso.num_candidates = 4
        c.rso.num_accepted = 2
        c.rso.max_new_tokens = 16
        c.eval.max_new_tokens = 16
    return c
