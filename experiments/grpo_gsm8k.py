"""GRPO on GSM8K from a pretrained HuggingFace checkpoint: SFT on the training problems' worked solutions
→ online RL with the GSM8K answer reward → held-out greedy accuracy against the SFT policy.

    python -m launch.train --experiment=grpo_gsm8k --config.model.init_from_hf=TinyLlama_v1.1 \\
        --config.data.path=gsm8k/main/train.jsonl --config.data.eval_path=gsm8k/main/test.jsonl
    python -m launch.train --experiment=grpo_gsm8k:smoke --config.data.path=gsm8k/main/train.jsonl \\
        [--config.model.init_from_hf=DIR]                   # under a minute on 2 CPU cores, tiny sizes
    ... --config.grpo.beta=0.04                             # DeepSeekMath's KL to the SFT policy
    ... --config.rewards.format.weight=0.1                  # also reward a final `#### N` line

Data (`data.task="math"`, read by `rlhf_jax.data.loading.load_math`): GSM8K records {"question",
"answer"} (openai/gsm8k's JSONL or Parquet files; a file, glob or comma-separated list), rendered as
`Question: ...\\nAnswer:` with the annotation-free worked solution ending in `#### N` as the SFT
demonstration. `data.path` is required; `data.eval_path` (the test split) holds the evaluation problems,
else a seeded `data.eval_fraction` of the training file is held out.

Model: `model.init_from_hf=DIR`, a Llama, Qwen2 or Gemma (1) checkpoint directory (`rlhf_jax.interop`),
fixes the architecture and the first SFT params; its `tokenizer.model` (sentencepiece: Llama 2,
TinyLlama, Gemma), else its `tokenizer.json` (Qwen2.5, Llama 3), is the tokenizer unless `data.tokenizer`
is given. Prompts are plain text (`Question: ...\nAnswer:`); chat templates are not applied yet. Without `init_from_hf` the `small`
preset is trained from scratch with a tokenizer trained on the problems (a pipeline check, not a result).

Defaults for a 0.5-1B model on one accelerator (TRL's GRPOTrainer where it has one): prompts up to 256
tokens and 384 new tokens (GSM8K solutions are ~100-250 tokens), SFT for ~1 epoch of the 7.5k problems
at 1e-5, then GRPO (Shao et al. 2024, arXiv 2402.03300) with G = 8 samples of 16 prompts per iteration
at temperature 1, group-normalised advantages, the clipped ratio objective with ε = 0.2, token-mean
(DAPO) aggregation, lr 1e-6 constant, β = 0 (TRL's current default; DeepSeekMath used 0.04), one
update per iteration in 8 accumulated micro-batches (μ = 1, so the ratio stays 1). The reward is the
`gsm8k` answer check (the number after the last `####` equals the gold); `format` (the last line is
`#### N`) is logged at weight 0. Evaluation: greedy pass@1 on every held-out problem, pass@4.
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    smoke = arg == "smoke"
    c = _base.base(pipeline="grpo", task="math", smoke=False)
    # The architecture is the checkpoint's (`init_from_hf`); only runtime fields may be set with it.
    c.model.update(dict(dtype="bfloat16", param_dtype="float32", remat="full"))
    c.data.update(dict(max_len=640, max_prompt_len=256, eval_fraction=0.05))
    c.sft = _base.sft_section(steps=240, batch_size=32, learning_rate=1e-5, warmup_steps=20)
    c.sft.grad_accum_steps = 4
    c.train = _base.train_section(
        steps=0, batch_size=128, learning_rate=1e-6, warmup_steps=0, schedule="constant"
    )
    c.train.grad_accum_steps = 8
    c.train.eval_batch_size = 32
    c.checkpoint.every_steps = 20
    c.grpo = ml_collections.ConfigDict(
        dict(
            iterations=200, num_prompts=16, group_size=8, num_iterations=1, estimator="grpo", scale="group",
            aggregation="dapo", epsilon_low=0.2, epsilon_high=0.0, delta=0.0, beta=0.0, importance_level="token",
            temperature=1.0, top_k=0, max_new_tokens=384, mask_truncated=False, dynamic_sampling=False,
            max_draws=4, max_prompts=0, eval_reward="gsm8k",
        )
    )  # fmt: skip
    c.rewards = ml_collections.ConfigDict(
        {"gsm8k": {"weight": 1.0}, "format": {"weight": 0.0, "pattern": "gsm8k"}}
    )
    if smoke:
        _base.shrink(c)
        c.model.update(dict(dtype="float32", remat="none"))
        c.data.update(dict(max_len=160, max_prompt_len=96, eval_fraction=0.25))
        c.sft.update(dict(grad_accum_steps=1, learning_rate=1e-3))
        c.train.update(dict(batch_size=16, grad_accum_steps=1, learning_rate=1e-4))
        c.grpo.update(dict(iterations=2, num_prompts=4, group_size=4, max_new_tokens=32))
    # The math evaluation (`pipelines.math_eval.MathEvalConfig`), set after `shrink` (which sizes the
    # preference experiments' evaluation section).
    c.eval = ml_collections.ConfigDict(
        dict(num_problems=8, k=2, temperature=1.0, max_new_tokens=32, bootstrap=200, prompts_per_batch=4)
        if smoke
        else dict(num_problems=0, k=4, temperature=1.0, max_new_tokens=384, bootstrap=1000, prompts_per_batch=32)
    )  # fmt: skip
    return c
