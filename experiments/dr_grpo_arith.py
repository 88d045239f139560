"""Dr. GRPO on the synthetic math task: GRPO without the per-group std and the per-sequence length
normalisation (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783).

    python -m launch.train --experiment=dr_grpo_arith
    python -m launch.train --experiment=dr_grpo_arith:smoke

Advantages r - mean_g (`estimator="dr_grpo"`, TRL `scale_rewards="none"`), and the loss's masked token
sum divided by the batch's rows times the completion budget (`aggregation="dr_grpo"`, TRL
`loss_type="dr_grpo"`). Everything else as `grpo_arith`.
"""

from experiments import grpo_arith


def get_config(arg=None):
    c = grpo_arith.get_config(arg)
    c.grpo.update(dict(estimator="dr_grpo", scale="none", aggregation="dr_grpo"))
    return c
