"""IFT (Intuitive Fine-Tuning, Hua et al., arXiv 2405.11870) as the SFT objective on the synthetic math
task `arith`, judged by the SFT policy's held-out greedy accuracy (`accuracy_sft`).

    python -m launch.train --experiment=ift_arith
    python -m launch.train --experiment=ift_arith:smoke                          # seconds, tiny sizes
    python -m launch.train --experiment=ift_arith --config.sft.objective=nll     # the SFT baseline
    python -m launch.study --study=ift_study --seeds=3                           # IFT vs SFT, paired

`grpo_arith` with `sft.objective="ift"` (λ = 0.2, γ = 0.95: the official code's defaults,
`rlhf_jax.train.ift`) and a single GRPO iteration: the pipeline's math evaluation reports the SFT policy's
held-out accuracy as `accuracy_sft` (the metric this experiment is about, as in `rft_study`); the GRPO
iteration and its `accuracy` are not part of the comparison. Same data, steps, batch and learning rate
as the NLL baseline (`--config.sft.objective=nll`).
"""

from experiments import grpo_arith


def get_config(arg=None):
    c = grpo_arith.get_config(arg)
    c.sft.update(dict(objective="ift", ift_lambda=0.2, ift_gamma=0.95))
    c.grpo.iterations = 1
    return c
