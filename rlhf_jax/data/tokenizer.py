"""A thin wrapper over sentencepiece: load a `.model` file, or train one on a corpus, with cached training.

Models trained here use ids pad=0, unk=1, bos=2, eos=3; identity normalisation (no NFKC, no whitespace
collapsing, no dummy prefix space) so that `decode(encode(text)) == text` for any text; "\\n" as a
piece of its own; and byte fallback, so characters outside the training corpus still round-trip. The
default is BPE, which trains much faster than sentencepiece's unigram trainer (bench/README.md,
"Measured timings"); training uses one thread, so the same corpus gives the same model.

A prompt and its response are encoded separately and their ids concatenated (`pipeline.py`), so a
response's first piece never merges with the prompt's last one.

Command line:
  python -m rlhf_jax.data.tokenizer train --input 'data/*.jsonl' --vocab_size 8000 --output tok.model
  python -m rlhf_jax.data.tokenizer encode --model tok.model "SUBREDDIT: r/cats"
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Sentencepiece skips training sentences longer than this many bytes; HH dialogues can be long.
_MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer:
    """Encodes text to ids and back; ids of the special tokens as attributes."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.model_proto = model_proto
        self.path = path
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {path} lacks a BOS or EOS id (bos={self.bos_id}, eos={self.eos_id})")
        # Released models without a pad id (pad_id=-1, e.g. Llama 2) pad with unk; padding is masked anyway.
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        if self.pad_id == self.eos_id:
            raise ValueError(f"tokenizer {path}: pad id {self.pad_id} equals the EOS id")
        self.vocab_size = self._sp.get_piece_size()
        self.eos_ids = (self.eos_id,)  # the interface of `hf_tokenizer.HFTokenizer` (several stop ids)
        self.chat_template = None

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Loads a sentencepiece `.model` file."""
        with open(path, "rb") as f:
            return cls(f.read(), path=path)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Returns the ids of `text`, optionally with BOS first and EOS last."""
        ids = self._sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Returns the ids of each text (no specials); faster than a loop of `encode`."""
        return self._sp.encode(list(texts)) if texts else []

    def char_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` (as `encode`) and each one's [start, end) character span in `text`.

        Sentencepiece reports UTF-8 byte offsets; a byte-fallback piece that begins a multi-byte
        character has none of its own and gets that character's span. (Not named `encode_offsets`: that
        method's presence makes `pipeline.segment_ids` encode chat segments as one text.)
        """
        pieces = self._sp.encode(text, out_type="proto").pieces
        # Byte offset at which each character starts: a byte offset b lies in character
        # searchsorted(starts, b, "right") - 1, and ends are rounded up to a whole character.
        starts = np.cumsum([0] + [len(c.encode("utf-8")) for c in text[:-1]]) if text else np.zeros(0)
        ends = [p.end for p in pieces]
        for k in range(len(pieces) - 2, -1, -1):  # an empty piece ends where the next one at its start ends
            if pieces[k].end <= pieces[k].begin and pieces[k + 1].begin == pieces[k].begin:
                ends[k] = ends[k + 1]
        spans = []
        for piece, end in zip(pieces, ends, strict=True):
            start = int(np.searchsorted(starts, piece.begin, "right")) - 1
            stop = int(np.searchsorted(starts, end, "left"))
            spans.append((max(start, 0), max(stop, start, 0)))
        return [p.id for p in pieces], spans

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of `ids`; pad, BOS and EOS ids decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def pieces(self, text: str) -> list[str]:
        """Returns the pieces of `text` (for inspection)."""
        return self._sp.encode(text, out_type=str)

    def save(self, directory: str) -> None:
        """Writes `directory/tokenizer.model` (atomically), for `load_tokenizer(directory)`."""
        os.makedirs(directory, exist_ok=True)
        _atomic_write(os.path.join(directory, SPM_FILE), self.model_proto)


SPM_FILE = "tokenizer.model"


def load_tokenizer(path: str):
    """The tokenizer at `path`: a sentencepiece `.model` file, a HuggingFace `tokenizer.json` (with the
    configs beside it), or a directory holding either (`tokenizer.model` first, as a run's stage
    directories and sentencepiece checkpoints do; else `tokenizer.json`, as Llama 3 and Qwen ship).

    Returns:
      A `Tokenizer` or a `hf_tokenizer.HFTokenizer` (the same interface: encode, encode_batch, decode,
      bos_id (None for a tokenizer without BOS), eos_id, eos_ids, pad_id, vocab_size, chat_template,
      save).

    Raises:
      FileNotFoundError: naming the path, when it holds no tokenizer.
    """
    from rlhf_jax.data import hf_tokenizer

    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, SPM_FILE)):
            return Tokenizer.load(os.path.join(path, SPM_FILE))
        if os.path.exists(os.path.join(path, hf_tokenizer.TOKENIZER_JSON)):
            return hf_tokenizer.HFTokenizer.from_dir(path)
        raise FileNotFoundError(f"{path!r} holds no {SPM_FILE} nor {hf_tokenizer.TOKENIZER_JSON}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer file {path!r}")
    if os.path.basename(path) == hf_tokenizer.TOKENIZER_JSON:
        return hf_tokenizer.HFTokenizer.from_dir(os.path.dirname(path) or ".")
    return Tokenizer.load(path)


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    model_path: str | None = None,
    *,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 200_000,
) -> Tokenizer:
    """Trains a sentencepiece model on `texts` (settings in the module docstring).

    Args:
      texts: the training corpus, one document per string (newlines allowed).
      vocab_size: the requested vocabulary size, including 4 specials and 256 byte pieces; a corpus too
        small to fill it gives a smaller one (read `Tokenizer.vocab_size`).
      model_path: where to write the `.model` file (atomically), or None to keep it in memory.
      model_type: "bpe" or "unigram".
      character_coverage: the share of characters covered by pieces; rarer ones fall back to bytes.
      max_sentences: train on at most this many texts, an evenly spaced subset.

    Returns:
      The trained tokenizer.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    if len(texts) > max_sentences:
        texts = texts[:: -(-len(texts) // max_sentences)]
    proto = _train_proto(texts, vocab_size, model_type, character_coverage)
    if model_path is not None:
        _atomic_write(model_path, proto)
    return Tokenizer(proto, path=model_path)


def get_or_train_tokenizer(path: str, texts: Sequence[str], vocab_size: int, cache_dir: str) -> Tokenizer:
    """Loads the tokenizer at `path`, or, when `path` is empty, trains one on `texts` and caches it.

    The cached file is `cache_dir/spm_v{vocab_size}_{digest}.model`, where the digest covers the texts and
    the settings, so a changed corpus trains a new model and an unchanged one is loaded. On a multi-host
    run give every process the same `path`, or a shared `cache_dir` (writes are atomic).

    Args:
      path: a `.model` file (e.g. a released model's tokenizer), or "" to train.
      texts: the training corpus used when `path` is empty.
      vocab_size: the vocabulary size used when training.
      cache_dir: where trained models are cached (e.g. the experiment's workdir).

    Returns:
      The tokenizer.
    """
    if path:
        return Tokenizer.load(path)
    digest = hashlib.sha256(f"bpe|{vocab_size}|{len(texts)}".encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    cached = os.path.join(cache_dir, f"spm_v{vocab_size}_{digest.hexdigest()[:16]}.model")
    if os.path.exists(cached):
        return Tokenizer.load(cached)
    return train_tokenizer(texts, vocab_size, cached)


def _train_proto(texts: list[str], vocab_size: int, model_type: str, character_coverage: float) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=["\n"],
        character_coverage=character_coverage,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _corpus_from_files(paths: str, format: str | None) -> list[str]:
    """Texts for training: lines of `.txt` files; prompts and responses of record files."""
    from rlhf_jax.data import loading, readers  # Deferred: only the CLI needs the loaders.

    texts: list[str] = []
    for path in readers.expand_paths(paths):
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                texts.extend(line.rstrip("\n") for line in f)
            continue
        examples, stats = loading.load_file(path, format=format)
        for ex in examples:
            if stats.kind == "preference":
                texts.extend((ex.prompt, ex.chosen, ex.rejected))
            else:
                texts.extend((ex.prompt, ex.completion))
    return texts


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `train` a model from files, or `encode` text with one."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.data.tokenizer", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a sentencepiece model on record files or .txt files")
    train.add_argument("--input", required=True, help="files, globs or a comma-separated list")
    train.add_argument("--output", required=True, help="the .model file to write")
    train.add_argument("--vocab_size", type=int, default=8000)
    train.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
    train.add_argument("--format", default=None, help="force a record format (default: detect)")
    encode = sub.add_parser("encode", help="print the pieces and ids of a text")
    encode.add_argument("--model", required=True)
    encode.add_argument("text")
    args = parser.parse_args(argv)
    if args.command == "train":
        texts = _corpus_from_files(args.input, args.format)
        tok = train_tokenizer(texts, args.vocab_size, args.output, model_type=args.model_type)
        print(f"trained {args.output}: vocab_size={tok.vocab_size} on {len(texts)} texts")
    else:
        tok = Tokenizer.load(args.model)
        print(tok.pieces(args.text))
        print(tok.encode(args.text))


if __name__ == "__main__":
    main()
