"""Classification as generation on your GLUE-style files (GenCLS++, arXiv 2504.19898; PPO for NLU, arXiv
2410.11020): SFT on label tokens → GRPO with the exact-label reward → held-out accuracy of the RL and the
SFT policy by greedy generation and by perplexity decoding.

    python -m launch.train --experiment=gencls_glue --config.data.path=SST-2/train.tsv \
        --config.data.eval_path=SST-2/dev.tsv
    python -m launch.train --experiment=gencls_glue --config.data.path=RTE/train.tsv \
        --config.data.eval_path=RTE/dev.tsv --config.rewards.label_match.wrong=-1.0 \
        --config.rewards.label_match.unparseable=-3.0                   # PPO for NLU's +1 / -1 / -3
    python -m launch.train --experiment=gencls_glue:smoke --config.data.path=... --config.data.eval_path=...

Files: GLUE TSV with a header (SST-2 `sentence`/`label`; MNLI `sentence1`/`sentence2`/`gold_label`; RTE
`sentence1`/`sentence2`/`label`), or JSONL `text` (`text_b`) / `label`; bad rows are skipped and counted
(file and line in the log). Without `data.eval_path`, `data.eval_fraction` of the training file is held
out. A model from scratch is the default; `--config.model.init_from_hf=DIR` starts from a checkpoint.
"""

from experiments import gencls_synthetic


def get_config(arg=None):
    c = gencls_synthetic.get_config(arg)
    c.cls.source = "files"
    c.data.update(dict(max_len=160, max_prompt_len=144, vocab_size=2000, eval_fraction=0.1))
    if arg == "smoke":
        c.data.update(dict(max_len=96, max_prompt_len=80, vocab_size=400))
        c.cls.num_eval_examples = 32
    return c
