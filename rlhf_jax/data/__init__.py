"""Data layer: record formats and loaders, the sentencepiece tokenizer, grain pipelines, synthetic TL;DR.

Modules: `formats` (record formats and their canonical text), `readers` (JSONL, JSONL.gz, JSON arrays,
Parquet, globs), `loading` (`load_preference`, `load_sft`), `tokenizer` (`Tokenizer`), `pipeline`
(tokenisation to fixed shapes, grain batches, resumable iterators), `synthetic_tldr` (the embedded
default task and its gold reward). Command lines: `python -m rlhf_jax.data.inspect FILE...`,
`python -m rlhf_jax.data.tokenizer train ...`, `python -m rlhf_jax.data.synthetic_tldr --out DIR`.
"""

from rlhf_jax.data.loading import load_preference, load_sft
from rlhf_jax.data.records import DataError, LoadStats, PreferenceExample, SFTExample

__all__ = ["DataError", "LoadStats", "PreferenceExample", "SFTExample", "load_preference", "load_sft"]
