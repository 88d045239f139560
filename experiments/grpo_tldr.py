"""GRPO against a learned reward model on the synthetic TL;DR task, judged by the task's gold reward:
the reward over-optimisation curve. SFT → pointwise reward model (Bradley-Terry, trained from the SFT
policy on the task's preference pairs) → GRPO with the reward model as the only reward → held-out win
rates against the SFT policy by the gold reward and by the reward model, every `train.eval_every` steps.

    python -m launch.train --experiment=grpo_tldr
    python -m launch.train --experiment=grpo_tldr:smoke                          # seconds, tiny sizes
    python -m launch.train --experiment=grpo_tldr --config.grpo.beta=0.05        # a KL penalty (k3)
    python -m launch.train --experiment=grpo_tldr --config.rewards.reward_model.relative=true

The reward being maximised is r_φ(x, y), the reward model (`rewards.reward_model`); the gold reward
r*(x, y) (`rewards.tldr_gold`) has weight 0, so it is only logged (`reward/tldr_gold` in
metrics.jsonl, beside `reward/reward_model`). Gao, Schulman and Hilton (2023, "Scaling Laws for Reward
Model Overoptimization", arXiv 2210.10760) show the gold reward of a policy optimised against a proxy
rising and then falling as its KL to the initial policy grows, while the proxy keeps rising; with no
KL penalty (β = 0) and a small reward model trained on a few thousand pairs, the embedded run shows
that curve in minutes: `eval_curve.jsonl` holds, per evaluation, the step, the KL to the SFT policy,
the proxy and gold rewards of the policy's samples and its gold win rate against the SFT policy.
`relative=true` scores a completion against the prompt's reference summary, r_φ(x, y) - r_φ(x, y_ref)
(VLAA-Thinker's form). Every estimator here subtracts the group's mean, in which the per-prompt shift
cancels, so the update changes only where rewards are scaled across prompts (`grpo.scale=batch`, the
batch's reward std).
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    smoke = arg == "smoke"
    c = _base.base(pipeline="grpo", task="tldr", smoke=False)
    c.model.update(dict(d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=352))
    c.sft = _base.sft_section(steps=250, batch_size=32, learning_rate=2e-3, warmup_steps=20)
    c.rm = _base.rm_section(steps=150, batch_size=32, learning_rate=1e-3, warmup_steps=10)
    c.train = _base.train_section(
        steps=0, batch_size=64, learning_rate=1e-4, warmup_steps=0, schedule="constant"
    )
    c.train.eval_every = 10  # optimizer steps (2 per iteration): a curve point every 5 iterations
    c.grpo = ml_collections.ConfigDict(
        dict(
            iterations=60, num_prompts=16, group_size=8, num_iterations=1, estimator="grpo", scale="group",
            aggregation="dapo", epsilon_low=0.2, epsilon_high=0.0, delta=0.0, beta=0.0, importance_level="token",
            temperature=1.0, top_k=0, max_new_tokens=40, mask_truncated=False, dynamic_sampling=False,
            max_draws=4, max_prompts=0,
        )
    )  # fmt: skip
    c.rewards = ml_collections.ConfigDict(
        {"reward_model": {"weight": 1.0, "batch_size": 64, "relative": False}, "tldr_gold": {"weight": 0.0}}
    )
    c.eval.update(dict(num_prompts=64, samples_per_prompt=2, max_new_tokens=40))
    if smoke:
        _base.shrink(c)
        c.model.update(dict(d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=176))
        c.train.steps = 0
        c.train.batch_size = 16
        c.train.eval_every = 1
        c.grpo.update(dict(iterations=2, num_prompts=4, group_size=4, max_new_tokens=16))
    return c
