"""PPO with a critic on the synthetic math task `arith`: SFT on demonstrations → PPO (GAE, a value
model initialised from the SFT policy, the KL penalty in the reward) with the exact-answer reward →
held-out greedy accuracy against the SFT policy. The same task, budget and evaluation as `grpo_arith`.

    python -m launch.train --experiment=ppo_arith
    python -m launch.train --experiment=ppo_arith:smoke                          # seconds, tiny sizes
    python -m launch.train --experiment=ppo_arith --config.ppo.adaptive_kl=true  # Ziegler et al.'s β

PPO as RLHF uses it (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022; PPO for NLU,
arXiv 2410.11020): one completion per prompt (`grpo.group_size=1`: the critic, not the group, is the
baseline), per-token rewards −β·(log π − log π_ref) with the task reward on the last token, GAE with
γ = 1 and λ = 0.95, whitened advantages, the clipped surrogate (ε = 0.2) and the clipped value loss
(0.2), μ = 2 passes over each rollout in mini-batches. The 128 samples per iteration equal
`grpo_arith`'s 16 prompts × 8.
"""

import ml_collections

from experiments import _base, grpo_arith


def get_config(arg=None):
    smoke = arg == "smoke"
    c = grpo_arith.get_config(arg)
    c.grpo.update(dict(estimator="gae", num_prompts=128, group_size=1, num_iterations=2))
    c.ppo = ml_collections.ConfigDict(
        _base.ppo_section(kl_coef=0.02, critic_init="sft", critic_learning_rate=2e-4)
    )
    if smoke:
        c.grpo.update(dict(num_prompts=16, group_size=1, num_iterations=2))
    return c
