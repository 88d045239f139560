"""Token-weighted SFT (TL-Training's PKT, arXiv 2412.15495) against plain SFT on the embedded tool task.

    python -m launch.train --experiment=tool_sft                                  # uniform weights
    python -m launch.train --experiment=tool_sft --config.data.tool_weights=pkt   # PKT key-token weights
    python -m launch.train --experiment=tool_sft:smoke                            # seconds, tiny sizes
    python -m launch.study --study=tool_sft_study --seeds=3                       # both, paired over seeds

Data: the embedded tool-calling task (`data.task=tools`, `rlhf_jax.data.synthetic_tools`): a prompt
offering 5 of 14 tools whose names share prefixes (get_weather / get_time / get_timezone / get_news,
set_alarm / set_timer / set_reminder, ...) and a request whose wording (3 paraphrases per tool) names
one; the completion is the JSON call `{"name": ..., "arguments": {...}}` with the argument copied from
the request. 256 training requests, 256 held-out ones (the same for every seed). `data.tool_weights`:
"uniform" (plain SFT) or "pkt" (TL-Training's key-token weights on the same examples).

Pipeline (`pipelines.tool_sft`): SFT (the `sft` section: a 4-layer width-128 model trained from scratch
for 80 steps of 16, 5 epochs, where plain SFT picks the right tool on about 3 requests in 4 — at 120 steps
it is above 0.9) → greedy calls on the held-out requests;
`results.json` holds tool_name_accuracy, call_exact_match and json_valid with 95% bootstrap intervals.
"""

import ml_collections

from experiments import _base


def get_config(arg=None):
    smoke = arg == "smoke"
    c = _base.base(pipeline="tool_sft", task="tools", smoke=smoke)
    del c.train  # the pipeline trains one stage, from the `sft` section
    c.model.update(dict(d_model=128, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=352))
    c.data.max_len = 96
    c.data.max_prompt_len = 64
    c.data.vocab_size = 512
    c.data.num_sft = 256
    c.data.num_eval = 256
    c.data.tool_weights = "uniform"
    c.data.tools_per_prompt = 5
    c.sft.steps = 80
    c.sft.batch_size = 16
    c.sft.learning_rate = 1e-3
    c.sft.warmup_steps = 10
    c.eval = ml_collections.ConfigDict(dict(num_prompts=0, max_new_tokens=40, bootstrap=1000))
    if smoke:
        _base.shrink(c)
        c.model.update(dict(d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=176))
        c.data.num_sft = 64
        c.data.num_eval = 16
        c.eval.num_prompts = 0
        c.eval.max_new_tokens = 24
        c.eval.bootstrap = 200
    return c
