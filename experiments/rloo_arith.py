"""RLOO on the synthetic math task: REINFORCE with the leave-one-out baseline (Ahmadian et al. 2024,
"Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
arXiv 2402.14740; Kool et al. 2019).

    python -m launch.train --experiment=rloo_arith
    python -m launch.train --experiment=rloo_arith:smoke

Advantage of sample g: r_g minus the mean of the other G - 1 rewards of its prompt (`estimator="rloo"`),
not divided by a std; one update per batch (μ = 1, so the ratio is 1 and the clipping inactive: the
REINFORCE gradient), the per-sequence mean of the token losses as in TRL's `RLOOTrainer`.
"""

from experiments import grpo_arith


def get_config(arg=None):
    c = grpo_arith.get_config(arg)
    c.grpo.update(dict(estimator="rloo", scale="none", aggregation="grpo", num_iterations=1))
    return c
