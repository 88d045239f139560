"""GRPO on the synthetic math task `arith`: SFT on demonstrations (a share with arithmetic slips) →
online RL with the exact-answer reward → held-out greedy accuracy against the SFT policy.

    python -m launch.train --experiment=grpo_arith
    python -m launch.train --experiment=grpo_arith:smoke                        # seconds, tiny sizes
    python -m launch.train --experiment=grpo_arith --config.grpo.estimator=rloo   # RLOO's baseline

GRPO as in DeepSeekMath (Shao et al. 2024, arXiv 2402.03300): G samples per prompt, advantages
normalised within the group, the clipped ratio objective with ε = 0.2, no KL (β = 0, as DAPO and
Dr. GRPO argue and TRL defaults to). The embedded default is sized for 2 CPU cores: the `small`
architecture at width 128, 16 prompts × 8 samples per iteration, one update per iteration (μ = 1, so
the ratio stays 1 and the clipping is inactive), token-mean aggregation (DAPO's, TRL's default
`loss_type="dapo"`).
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    smoke = arg == "smoke"
    c = _base.base(pipeline="grpo", task="arith", smoke=False)
    c.model.update(dict(d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=352))
    c.data.update(dict(max_len=112, max_prompt_len=48, num_sft=4096, num_train=2048, num_eval=256,
                       arith_max_steps=3, arith_error_rate=0.0, arith_misread_rate=0.7))  # fmt: skip
    c.sft = _base.sft_section(steps=400, batch_size=32, learning_rate=2e-3, warmup_steps=20)
    c.train = _base.train_section(
        steps=0, batch_size=64, learning_rate=5e-5, warmup_steps=0, schedule="constant"
    )
    c.train.grad_clip_norm = 1.0
    c.grpo = ml_collections.ConfigDict(
        dict(
            iterations=30, num_prompts=16, group_size=8, num_iterations=1, estimator="grpo", scale="group",
            aggregation="dapo", epsilon_low=0.2, epsilon_high=0.0, delta=0.0, beta=0.0, importance_level="token",
            temperature=1.0, top_k=0, max_new_tokens=56, mask_truncated=False, dynamic_sampling=False,
            max_draws=4, max_prompts=0, eval_reward="gsm8k",
        )
    )  # fmt: skip
    c.rewards = ml_collections.ConfigDict({"gsm8k": {"weight": 1.0}})
    if smoke:
        _base.shrink(c)
        c.model.update(dict(d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=176))
        c.data.update(dict(max_len=112, max_prompt_len=48, num_sft=64, num_train=32, num_eval=8))
        c.train.steps = 0
        c.train.batch_size = 16
        c.grpo.update(dict(iterations=2, num_prompts=4, group_size=4, max_new_tokens=16))
    # The math evaluation (`pipelines.math_eval.MathEvalConfig`), set after `shrink` (which sizes the
    # preference experiments' evaluation section).
    c.eval = ml_collections.ConfigDict(
        dict(num_problems=8, k=2, temperature=1.0, max_new_tokens=16, bootstrap=200, prompts_per_batch=0)
        if smoke
        else dict(num_problems=256, k=4, temperature=1.0, max_new_tokens=56, bootstrap=1000, prompts_per_batch=0)
    )  # fmt: skip
    return c
