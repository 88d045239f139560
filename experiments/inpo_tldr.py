"""INPO on TL;DR: T online iterations of sample K from π_t → oracle pairs → INPO loss → evaluate.

    python -m launch.train --experiment=inpo_tldr
    python -m launch.train --experiment=inpo_tldr:smoke
    python -m launch.train --experiment=inpo_tldr --config.rm.kind=pairwise      # preference-model oracle
    python -m launch.train --experiment=inpo_tldr --config.loss.name=dpo --config.inpo.reference=previous
                                                                                     # iterative DPO baseline

Paper (Zhang et al. 2024, "Iterative Nash Policy Optimization", Sec. 5): T = 3 iterations, K = 8
samples per prompt, η = 0.005 and τ = η/3 (the `inpo` loss's defaults), a reward-model oracle (best vs
worst of K) or a preference-model oracle (tournament). The embedded default keeps T, K, η and τ and
scales the rest to 2 CPU cores: the same ~1.2M-parameter model, SFT stage and reward model as
`rso_tldr`, 256 prompts per iteration and short training budgets. Results: WORKDIR/results.json (the final iterate under the
common keys, and `iterations`, one entry per iteration).
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    c = _base.base(pipeline="inpo", smoke=False)
    c.model.update(dict(d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=352))
    c.loss = ml_collections.ConfigDict(dict(name="inpo", eta=0.005))
    c.sft = _base.sft_section(steps=250, batch_size=32, learning_rate=2e-3, warmup_steps=20)
    c.rm = _base.rm_section(steps=150, batch_size=32, learning_rate=1e-3, warmup_steps=10)
    c.train = _base.train_section(steps=40, batch_size=32, learning_rate=2e-4, warmup_steps=5)
    c.train.reference = "precomputed"
    c.inpo = ml_collections.ConfigDict(
        dict(iterations=3, num_samples=8, num_prompts=256, reference="sft",
             temperature=1.0, top_k=0, max_new_tokens=40)
    )  # fmt: skip
    c.eval.max_new_tokens = 40
    if arg == "smoke":
        _base.shrink(c)
        c.model.update(dict(d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=176))
        c.inpo.iterations = 2
        c.inpo.num_samples = 4
        c.inpo.num_prompts = 8
        c.inpo.max_new_tokens = 16
    return c
