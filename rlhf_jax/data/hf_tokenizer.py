"""HuggingFace tokenizers (`tokenizer.json`): the checkpoints that ship no sentencepiece model (Llama 3.x,
Qwen2.5, Qwen3), behind the same interface as `tokenizer.Tokenizer`.

    tok = HFTokenizer.from_dir("Qwen2.5-0.5B-Instruct")      # tokenizer.json + tokenizer_config.json
    ids = tok.encode("Question: 2 + 3?", add_bos=True)      # BOS only if the checkpoint has one
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

A directory holds `tokenizer.json` (the `tokenizers` model: byte-level BPE for Llama 3 and Qwen), and
optionally `tokenizer_config.json` (the special tokens by name: `bos_token`, `eos_token`, `pad_token`,
`unk_token`; `chat_template`), `chat_template.jinja` (a newer place for the template) and
`generation_config.json` (`eos_token_id`: one id or a list; every one of them ends a generation, e.g.
Llama 3 Instruct's `<|end_of_text|>` and `<|eot_id|>`).

The `tokenizers` pipeline is used exactly as `tokenizer.json` writes it (normalizer, pre-tokenizer,
BPE, decoder). `transformers` 5 loads some families through a class that rebuilds the pipeline from the
vocabulary and merges with the family's own normalizer and split regex (`Qwen2Tokenizer` for
`model_type` qwen2): for a checkpoint's own `tokenizer.json` the two agree (tested on a Qwen2-style one).

Encoding never applies the tokenizer's post-processor (`add_special_tokens=False`): a text's ids are its
pieces alone, and BOS / EOS are added by the caller (`encode(add_bos=, add_eos=)`), as for the
sentencepiece tokenizer, so a prompt and a response encode separately and concatenate (`data/pipeline.py`).
Llama 3 has a BOS (`<|begin_of_text|>`); Qwen has none (`bos_token` null), so `bos_id` is None and
`add_bos` adds nothing, as `transformers` does. The pad id is `pad_token`'s when that is not an EOS id
(Qwen pads with `<|endoftext|>`, which is also its base models' EOS: then it is not used). Padding is
masked everywhere, but a pad equal to EOS would hide where a sample stopped, so a checkpoint without a
usable pad token (Llama 3) pads with a token that is neither EOS nor BOS (`<|finetune_right_pad_id|>` /
`<|reserved_special_token_0|>` when present, else the last id).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence

from rlhf_jax.data import chat_template as templates

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "[PAD]")


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e


def _token_name(value) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer:
    """Encodes text to ids and back with a `tokenizers.Tokenizer`; special ids as attributes.

    Attributes:
      bos_id: the BOS id, or None when the checkpoint has none (Qwen).
      eos_id: the tokenizer's `eos_token` (what `add_eos` appends; Llama 3 Instruct's `<|eot_id|>`), else
        generation_config's first; `eos_ids` all of them, `eos_id` first (generation stops at any).
      pad_id: the padding id (never an EOS id).
      vocab_size: the number of ids (added tokens included).
      chat_template: the Jinja chat template, or None.
      path: the directory it was loaded from.
    """

    def __init__(self, directory: str):
        import tokenizers

        path = os.path.join(directory, TOKENIZER_JSON)
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception type for missing or bad files
            raise ValueError(f"{path}: not a readable HuggingFace tokenizer ({e})") from e
        self.path = directory
        config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
        generation = _read_json(os.path.join(directory, GENERATION_CONFIG))
        self.special_tokens = {
            key: _token_name(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        self.bos_id = self._id_of("bos_token")
        eos = generation.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if (named := self._id_of("eos_token")) is not None:  # the tokenizer's EOS first: `add_eos` appends it
            eos_ids = [named] + [i for i in eos_ids if i != named]
        if not eos_ids:
            raise ValueError(
                f"{directory}: no end-of-sequence token (tokenizer_config.json `eos_token` or "
                "generation_config.json `eos_token_id`)"
            )
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.eos_id = self.eos_ids[0]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._pad_id(directory)
        template_file = os.path.join(directory, CHAT_TEMPLATE_FILE)
        template = config.get("chat_template")
        if os.path.exists(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        self.chat_template = template or None

    def _id_of(self, key: str) -> int | None:
        name = self.special_tokens.get(key)
        return None if name is None else self._tok.token_to_id(name)

    def _pad_id(self, directory: str) -> int:
        pad = self._id_of("pad_token")
        if pad is not None and pad not in self.eos_ids:
            return pad
        for name in _PAD_CANDIDATES:
            i = self._tok.token_to_id(name)
            if i is not None and i not in self.eos_ids and i != self.bos_id:
                return i
        last = self.vocab_size - 1
        if last in self.eos_ids or last == self.bos_id:
            raise ValueError(f"{directory}: no pad token that is not BOS or EOS; set `pad_token`")
        return last

    @classmethod
    def from_dir(cls, directory: str) -> HFTokenizer:
        """Loads `directory/tokenizer.json` and its configs (module docstring)."""
        return cls(directory)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """The ids of `text` (no post-processor), with BOS first (if the tokenizer has one) and EOS last."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return bos + ids + ([self.eos_id] if add_eos else [])

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` (as `encode`) and each one's (start, end) character span in `text`."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def char_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode_offsets` under the name the sentencepiece `Tokenizer` shares (`token_weights.py`)."""
        return self.encode_offsets(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def pieces(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = False, **extra
    ) -> str:
        """The checkpoint's chat template rendered on `messages` (`chat_template.render`), as
        `transformers`' `apply_chat_template(..., tokenize=False)`."""
        if self.chat_template is None:
            raise ValueError(f"{self.path}: the tokenizer has no chat template (tokenizer_config.json "
                             f"`chat_template` or {CHAT_TEMPLATE_FILE})")  # fmt: skip
        return templates.render(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **extra,
        )  # fmt: skip

    def save(self, directory: str) -> None:
        """Copies the tokenizer's files into `directory` (a stage's workdir), so that
        `tokenizer.load_tokenizer(directory)` loads the same tokenizer."""
        os.makedirs(directory, exist_ok=True)
        for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, GENERATION_CONFIG, CHAT_TEMPLATE_FILE):
            src = os.path.join(self.path, name)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(directory, name)):
                shutil.copyfile(src, os.path.join(directory, name))
