"""IFT (Intuitive Fine-Tuning, Hua et al., arXiv 2405.11870) as the SFT objective on the synthetic TL;DR
task, judged by the task's gold reward of the SFT policy's samples on held-out prompts (`gold_reward_sft`).

    python -m launch.train --experiment=ift_tldr
    python -m launch.train --experiment=ift_tldr:smoke                           # seconds, tiny sizes
    python -m launch.train --experiment=ift_tldr --config.sft.objective=nll      # the SFT baseline
    python -m launch.study --study=ift_study --seeds=3                           # IFT vs SFT, paired

`grpo_tldr`'s SFT stage (same model, data, 250 steps, batch and learning rate) with `sft.objective="ift"`
(λ = 0.2, γ = 0.95: the official code's defaults, `rlhf_jax.train.ift`), then one GRPO iteration on the
gold reward alone (no reward-model stage), whose evaluation (`pipelines.evaluation`) samples the SFT
policy on the held-out prompts: `gold_reward_sft` (the mean gold reward r*(x, y) of its samples) and
`mean_response_length_sft` are the SFT policy's; the GRPO iteration and the policy's win rates are not
part of the comparison. With `--config.sft.objective=nll` it is the SFT baseline at equal steps.
"""

import ml_collections

from experiments import grpo_tldr


def get_config(arg=None):
    c = grpo_tldr.get_config(arg)
    c.sft.update(dict(objective="ift", ift_lambda=0.2, ift_gamma=0.95))
    del c["rm"]  # no reward model: the GRPO iteration reads the gold reward
    c.rewards = ml_collections.ConfigDict({"tldr_gold": {"weight": 1.0}})
    c.grpo.iterations = 1
    c.train.eval_every = 0
    if arg != "smoke":
        c.eval.num_prompts = 256  # the SFT policies' gold rewards differ by little; more prompts, less noise
    return c
