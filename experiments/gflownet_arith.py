"""GFlowNet trajectory balance on the synthetic math task `arith`: SFT → online trajectory balance with
a learnable log Z and a replay buffer of correct solutions → held-out accuracy and distinct correct
solutions per problem, against the SFT policy.

    python -m launch.train --experiment=gflownet_arith
    python -m launch.train --experiment=gflownet_arith:smoke                 # seconds, tiny sizes

The loss (`losses.trajectory_balance`; Malkin et al. 2022, arXiv 2201.13259; GFlowVLM, arXiv 2503.06514)
is (log Z + Σ_t log π(a_t|s_t) − log R(x))², whose optimum samples solutions in proportion to R rather
than collapsing on one. R = exp(reward / 0.1) from the 0/1 exact-answer reward (positive, as log R needs;
correct solutions get e^10 times the weight of wrong ones). log Z has its own Adam at 1e-2 (the policy's
learning rate is grpo_arith's). Replay (`pipelines.gflownet`): a FIFO buffer of up to 256 distinct correct
trajectories; each iteration adds 64 rows drawn from it to the 16 × 8 on-policy samples. Everything else
(SFT, sampling, the budget of 30 iterations) is `grpo_arith`'s, so `gflownet_study` compares the two.
The evaluation draws k = 8 samples per held-out problem for `distinct_correct`.
"""

import ml_collections

from experiments import grpo_arith


def get_config(arg=None):
    smoke = arg == "smoke"
    c = grpo_arith.get_config(arg)
    c.gflownet = ml_collections.ConfigDict(
        dict(log_z_init=0.0, log_z_learning_rate=1e-2, reward_temperature=0.1, reward_floor=0.0,
             replay_size=256, replay_rows=16 if smoke else 64, replay_min_reward=1.0)
    )  # fmt: skip
    if not smoke:
        c.eval.k = 8
    return c
