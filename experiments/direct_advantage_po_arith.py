"""Direct Advantage Policy Optimization (step-level, arXiv 2412.18279) on the synthetic math task `arith`:
SFT → Monte-Carlo data → critic → step advantages → offline policy → held-out accuracy against SFT.

    python -m launch.train --experiment=direct_advantage_po_arith
    python -m launch.train --experiment=direct_advantage_po_arith:smoke             # seconds, tiny sizes
    python -m launch.train --experiment=direct_advantage_po_arith --config.direct_advantage_po.rounds=2

Not ByteDance's DAPO (arXiv 2503.14476, `dapo_arith`). Liu et al. 2024: a step is one line, a critic
V(s) is trained with a BCE on soft Monte-Carlo targets MC_N(s), Â(s, a_j) = V(s∘a_j) − mean_j V(s∘a_j)
over M steps from π_ref, and the policy minimises ½ (Â/β − log π(a|s)/π_ref(a|s))² (Eq. 12-13;
`pipelines.direct_advantage_po` has every stage). The SFT stage, model, data and evaluation are
`grpo_arith`'s (the SFT stage is shared by fingerprint). Default sizes (for 2 CPU cores): 64 training
problems per round × 2 rollouts from π_ref; N = 8 completions per state, M = 4 next steps per state,
β = 0.2; the critic (the SFT trunk and a scalar head) trains 150 steps of 32 states at 1e-4, the policy
150 steps of 32 (state, step) rows at 5e-5 (grpo_arith's policy learning rate). `rounds=2` runs a second
round from round 1's policy (π_ref ← π_1).
"""

import ml_collections

from experiments import _base, grpo_arith


def get_config(arg=None):
    smoke = arg == "smoke"
    c = grpo_arith.get_config(arg)  # SFT, model, data and evaluation sections: grpo_arith's
    c.pipeline = "direct_advantage_po"
    del c.grpo, c.rewards
    c.critic = _base.train_section(steps=150, batch_size=32, learning_rate=1e-4, warmup_steps=10)
    c.train = _base.train_section(steps=150, batch_size=32, learning_rate=5e-5, warmup_steps=10)
    c.direct_advantage_po = ml_collections.ConfigDict(
        dict(rounds=1, num_problems=64, rollouts=2, mc_samples=8, next_steps=4, beta=0.2, temperature=1.0,
             max_new_tokens=56, max_step_tokens=24, critic_holdout=0.125, problems_per_part=16,
             states_per_call=64, reward="gsm8k")
    )  # fmt: skip
    if smoke:
        c.critic.update(dict(steps=4, batch_size=8, warmup_steps=0))
        c.train.update(dict(steps=4, batch_size=8, warmup_steps=0))
        c.direct_advantage_po.update(
            dict(num_problems=8, rollouts=1, mc_samples=2, next_steps=2, max_new_tokens=16, max_step_tokens=8,
                 critic_holdout=0.25, problems_per_part=4, states_per_call=16)
        )  # fmt: skip
    return c
