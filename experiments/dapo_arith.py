"""DAPO on the synthetic math task (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
System at Scale", arXiv 2503.14476): clip-higher, token-level loss, dynamic sampling, overlong reward
shaping, no KL.

    python -m launch.train --experiment=dapo_arith
    python -m launch.train --experiment=dapo_arith:smoke

ε_low = 0.2 and ε_high = 0.28 (Sec. 3.1), the token-mean loss (`aggregation="dapo"`, Eq. 12), dynamic
sampling (groups whose rewards are all equal are dropped and more prompts drawn, Sec. 3.2), the soft
overlong punishment (Eq. 13, on token lengths: 0 up to L_max - cache, then linear to -1 at L_max) added
to the answer reward, β = 0. L_max is the sampling budget and the cache a quarter of it.
"""

import ml_collections

from experiments import grpo_arith


def get_config(arg=None):
    c = grpo_arith.get_config(arg)
    c.grpo.update(
        dict(epsilon_low=0.2, epsilon_high=0.28, aggregation="dapo", dynamic_sampling=True, beta=0.0)
    )
    budget = c.grpo.max_new_tokens
    c.rewards.soft_overlong = ml_collections.ConfigDict(
        dict(weight=1.0, max_length=budget, cache=budget // 4)
    )
    return c
