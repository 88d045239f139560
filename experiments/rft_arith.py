"""Rejection-sampling fine-tuning on the synthetic math task `arith`: SFT → K rounds of (sample N
solutions per training problem from the current policy, keep the verified and distinct ones, SFT on
them) → per-round held-out accuracy against the SFT policy.

    python -m launch.train --experiment=rft_arith
    python -m launch.train --experiment=rft_arith:smoke                       # seconds, tiny sizes
    python -m launch.train --experiment=rft_arith --config.rft.init=sft       # ReST-EM: each round from SFT

RFT (Yuan et al. 2023, arXiv 2308.01825); the recipe of OpenMathInstruct-2 (arXiv 2410.01560) and
Light-R1 (arXiv 2503.10460); the loop is `rlhf_jax.pipelines.rft`. The SFT stage, data, model and
evaluation are `grpo_arith`'s (so the SFT policy is shared with it by fingerprint, and `rft_study` pairs
the rounds with its rows). Each round samples N = 4 solutions of 512 training problems at temperature 1
(2048 samples, about half of one GRPO run's 3840), verifies them with the exact-answer check `gsm8k` and
trains 3 epochs over the kept pairs (Yuan et al.'s 3 epochs) at a constant 3e-4 (a continued
fine-tune of the SFT policy: below SFT's 2e-3 peak) in batches of 32, from the previous round's policy
(`rft.init="previous"`, Light-R1's staged SFT). K = 2 rounds.
"""

import ml_collections

from experiments import _base, grpo_arith


def get_config(arg=None):
    smoke = arg == "smoke"
    c = grpo_arith.get_config(arg)  # data, model, sft and eval sections: grpo_arith's
    c.pipeline = "rft"
    del c.grpo, c.rewards  # the online loop's sections; the checker is `rft.reward`
    c.train = _base.train_section(
        steps=0, batch_size=32, learning_rate=3e-4, warmup_steps=0, schedule="constant"
    )  # steps: per round, ceil(epochs · kept / batch_size)
    c.rft = ml_collections.ConfigDict(
        dict(rounds=2, num_samples=4, num_problems=512, temperature=1.0, top_k=0, max_new_tokens=56,
             epochs=3.0, init="previous", reward="gsm8k")
    )  # fmt: skip
    if smoke:
        c.train.update(dict(batch_size=8, log_every=2, eval_batch_size=16))
        c.rft.update(dict(num_samples=4, num_problems=8, max_new_tokens=16, epochs=1.0))
    return c
