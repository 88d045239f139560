"""Data layer: record formats and loaders, the sentencepiece tokenizer, grain pipelines, synthetic tasks.

Modules: `formats` (record formats and their canonical text), `math_formats` (GSM8K and MATH-style
problems), `chat_template` and `conversations` (message lists through a checkpoint's chat template),
`readers` (JSONL, JSONL.gz, JSON arrays, Parquet, globs), `loading` (`load_preference`, `load_sft`,
`load_math`), `tokenizer` (`Tokenizer`), `pipeline` (tokenisation to fixed shapes, grain
batches, resumable iterators), `synthetic_tldr` (the embedded default task and its gold reward),
`synthetic_arith` (the embedded math task), `synthetic_dialogue` (the embedded multi-turn dialogue task
with per-turn rewards) and `turns` (its turn layout for EPO), `token_weights` (per-token SFT loss weights
from `weight_spans`) and `tool_weights` (TL-Training's key-token rule).
Command lines: `python -m rlhf_jax.data.inspect FILE...`,
`python -m rlhf_jax.data.tokenizer train ...`, `python -m rlhf_jax.data.synthetic_tldr --out DIR`,
`python -m rlhf_jax.data.synthetic_arith --out DIR`.
"""

from rlhf_jax.data.loading import load_math, load_preference, load_sft
from rlhf_jax.data.records import DataError, LoadStats, MathExample, PreferenceExample, SFTExample

__all__ = [
    "DataError",
    "LoadStats",
    "MathExample",
    "PreferenceExample",
    "SFTExample",
    "load_math",
    "load_preference",
    "load_sft",
]
