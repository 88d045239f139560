"""EPO (turn-level REINFORCE, Liu et al. 2025, arXiv 2502.12486) on multi-turn HH-style dialogues.

    python -m launch.train --experiment=epo_hh
    python -m launch.train --experiment=epo_hh:smoke                 # seconds, tiny sizes

Data: the embedded dialogue task (`data.task=dialogue`, `rlhf_jax.data.synthetic_dialogue`), generated in
code in Anthropic HH's text format ("\\n\\nHuman: ...\\n\\nAssistant: ..."): the human sets and then
changes a running total over 2 to 4 turns and the assistant states it after each turn. Each assistant
turn has a programmatic reward: +1 when its first integer is the true total, −1 otherwise. The 4,096
training dialogues are demonstrations where each turn slips with probability 0.3 (the assistant then
keeps counting from its wrong total), so the per-turn rewards are mixed.

Pipeline (`pipelines.epo`): SFT on every reply of the training dialogues (WORKDIR/sft) → EPO from it on the
same dialogues with their per-turn rewards (`losses.epo`: γ = 0.99 and the per-dialogue max-|G|
normalisation, as released) → on 128 held-out slip-free dialogues, 2 replies per assistant turn sampled
from the SFT and from the EPO policy with the same keys, scored by the per-turn rule; results.json holds
the mean per-turn reward of both, their paired difference with a 95% bootstrap interval over dialogues,
and the accuracy by turn position.
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    smoke = arg == "smoke"
    c = _base.base(pipeline="epo", task="dialogue", smoke=smoke)
    c.data.max_len = 128
    c.data.max_prompt_len = 112
    c.data.vocab_size = 512
    c.data.dialogue_max_turns = 4
    c.data.dialogue_error_rate = 0.3
    c.epo = ml_collections.ConfigDict(dict(gamma=0.99, normalize=True, reward_shift=0.0))
    c.eval.max_new_tokens = 12
    if smoke:
        c.data.num_sft = 64
        c.data.num_eval = 8
        c.eval.num_prompts = 8
    else:
        # The model and SFT budget of `grpo_arith` (981k parameters; ~3 min of SFT on 2 CPU cores): the
        # `small` preset's 3.4M took ~30 min of SFT per seed here, too long for a 3-seed study.
        c.model.update(dict(d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=352))
        c.sft = _base.sft_section(steps=400, batch_size=32, learning_rate=2e-3, warmup_steps=20)
        c.train.steps = 300
        c.train.learning_rate = 1e-4
        c.train.warmup_steps = 10
    return c
