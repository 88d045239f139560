"""PPO with a critic against a learned reward model on the synthetic TL;DR task, judged by the task's
gold reward: InstructGPT's recipe in miniature. SFT → pointwise reward model → PPO (the value model
initialised from the reward model, the KL penalty to the SFT policy in the reward, GAE) → held-out win
rates against the SFT policy by the gold reward and by the reward model, every `train.eval_every` steps.

    python -m launch.train --experiment=ppo_tldr
    python -m launch.train --experiment=ppo_tldr:smoke                          # seconds, tiny sizes
    python -m launch.train --experiment=ppo_tldr --config.ppo.kl_coef=0.2       # a stronger KL penalty
    python -m launch.train --experiment=ppo_tldr --config.ppo.adaptive_kl=true --config.ppo.kl_target=2

Stiennon et al. (2020) and Ouyang et al. (2022) optimise r_φ(x, y) − β·log(π(y|x) / π_SFT(y|x)) with
PPO, the value function initialised from the reward model; the KL term is what holds the gold reward
up while the proxy rises (compare `grpo_tldr`, β = 0, whose curve over-optimises). Per-token rewards
carry −β·(log π − log π_ref) on every token and r_φ on the last (`losses.kl_penalized_rewards`), GAE
with γ = 1, λ = 0.95 (`losses.gae`), one completion per prompt; 128 samples per iteration, as
`grpo_tldr`'s 16 prompts × 8.
"""

import ml_collections

from experiments import _base, grpo_tldr


def get_config(arg=None):
    smoke = arg == "smoke"
    c = grpo_tldr.get_config(arg)
    c.grpo.update(dict(estimator="gae", num_prompts=128, group_size=1, num_iterations=2))
    c.train.eval_every = 20  # optimizer steps (4 per iteration): a curve point every 5 iterations
    c.ppo = ml_collections.ConfigDict(
        _base.ppo_section(kl_coef=0.05, critic_init="reward_model", critic_learning_rate=1e-4)
    )
    if smoke:
        c.grpo.update(dict(num_prompts=16, group_size=1, num_iterations=2))
        c.train.eval_every = 2
    return c
