"""HuggingFace tokenizers and chat templates against `transformers` on tokenizers built here (byte-level
BPE as Llama 3 and Qwen2.5 ship, trained with `tokenizers`; no download)."""

import json

import numpy as np
import pytest

from rlhf_jax.data import chat_template, hf_tokenizer, pipeline, tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# The real templates of Llama 3 8B Instruct, Qwen2.5 Instruct (its no-tools branch) and Gemma 1 it.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    "(message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

CORPUS = [
    "Question: Tom has 5 boxes of 7 apples. How many apples does Tom have?",
    "Answer: Tom has 5 * 7 = 35 apples.\n#### 35",
    "SUBREDDIT: r/cats TITLE: My cat ignores me POST: Ünïcode, emoji 🐈 and tabs\tare fine.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ?",
] * 20


def build_tokenizer(
    directory, *, specials, config, generation=None, corpus=CORPUS, vocab_size=400, qwen_style=False
):
    """A byte-level BPE tokenizer.json trained on `corpus` with `specials`, plus its configs (also used by
    tests/test_grpo_gsm8k.py)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    if qwen_style:  # Qwen2's pipeline, as transformers' Qwen2Tokenizer rebuilds it: NFC, its regex split
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config})
    )
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama3")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|finetune_right_pad_id|>"]  # fmt: skip
    build_tokenizer(d, specials=specials,
           config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "chat_template": LLAMA3_TEMPLATE},
           generation={"eos_token_id": [1, 4]})  # fmt: skip
    return d


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen")
    build_tokenizer(d, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], qwen_style=True,
           config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})  # fmt: skip
    (d / "chat_template.jinja").write_text(QWEN_TEMPLATE)  # the newer place for the template
    return d


TEXTS = ["Question: Tom has 5 boxes?", " Answer: 35\n#### 35", "Ünïcode 🐈 and\ttabs", "", "  two  spaces "]
CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2 and 3."}],
]  # fmt: skip


@pytest.mark.parametrize("name", ["llama3", "qwen"])
def test_ids_and_text_equal_transformers(name, request):
    directory = request.getfixturevalue(name)
    ours = hf_tokenizer.HFTokenizer.from_dir(str(directory))
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS]
    assert ours.vocab_size == len(theirs)


@pytest.mark.parametrize("name", ["llama3", "qwen"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_templates_render_as_transformers(name, generation_prompt, request):
    directory = request.getfixturevalue(name)
    ours = hf_tokenizer.HFTokenizer.from_dir(str(directory))
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    for chat in CHATS:
        text = ours.apply_chat_template(chat, add_generation_prompt=generation_prompt)
        assert text == theirs.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=generation_prompt
        )
    if name == "qwen":  # the default system prompt when the chat has none
        assert ours.apply_chat_template(CHATS[0]).startswith("<|im_start|>system\nYou are Qwen")
    else:  # Llama 3: BOS first, each turn closed by <|eot_id|>
        assert ours.apply_chat_template(CHATS[0]).startswith("<|begin_of_text|><|start_header_id|>user")


def test_special_ids_from_the_configs(llama3, qwen):
    l3 = hf_tokenizer.HFTokenizer.from_dir(str(llama3))
    # eos_token (<|eot_id|>, id 4) first, then generation_config's other stop id (<|end_of_text|>, 1).
    assert (l3.bos_id, l3.eos_id, l3.eos_ids) == (0, 4, (4, 1))
    assert l3.pad_id == 5  # no pad_token: <|finetune_right_pad_id|>, never an EOS id
    assert l3.encode("Hi", add_bos=True, add_eos=True) == [0, *l3.encode("Hi"), 4]
    q = hf_tokenizer.HFTokenizer.from_dir(str(qwen))
    assert q.bos_id is None and q.encode("Hi", add_bos=True) == q.encode("Hi")  # no BOS, as transformers
    assert (q.eos_id, q.pad_id) == (2, 0)


def test_gemma_style_template_errors_name_the_template_message():
    with pytest.raises(ValueError, match="System role not supported"):
        chat_template.render(GEMMA_TEMPLATE, CHATS[1], special_tokens={"bos_token": "<bos>"})
    text = chat_template.render(GEMMA_TEMPLATE, CHATS[0], add_generation_prompt=True,
                                special_tokens={"bos_token": "<bos>"})  # fmt: skip
    assert text == "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ValueError, match="chat message 0"):
        chat_template.render(GEMMA_TEMPLATE, [{"content": "no role"}])


def test_load_tokenizer_dispatches_and_save_round_trips(llama3, tmp_path):
    tok = tokenizer.load_tokenizer(str(llama3))
    assert isinstance(tok, hf_tokenizer.HFTokenizer)
    assert isinstance(tokenizer.load_tokenizer(str(llama3 / "tokenizer.json")), hf_tokenizer.HFTokenizer)
    tok.save(str(tmp_path / "stage"))
    again = tokenizer.load_tokenizer(str(tmp_path / "stage"))
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0]) and again.eos_ids == tok.eos_ids
    assert again.chat_template == LLAMA3_TEMPLATE
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.model nor tokenizer.json"):
        tokenizer.load_tokenizer(str(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad/tokenizer.json: not a readable HuggingFace tokenizer"):
        tokenizer.load_tokenizer(str(tmp_path / "bad"))
    # A sentencepiece model in the same directory wins (a run's stage directories hold tokenizer.model).
    spm = tokenizer.train_tokenizer(CORPUS, 400)
    spm.save(str(tmp_path / "stage"))
    assert isinstance(tokenizer.load_tokenizer(str(tmp_path / "stage")), tokenizer.Tokenizer)


def test_prompts_without_a_bos_token_start_with_their_own_pieces(qwen):
    tok = hf_tokenizer.HFTokenizer.from_dir(str(qwen))
    data = pipeline.tokenize_prompts(["Question: Tom has 5 boxes?"], tok, 64)
    batch = data.batch(np.arange(1), 64)
    n = int(batch["prompt_lengths"][0])
    assert list(batch["prompt_tokens"][0, :n]) == tok.encode("Question: Tom has 5 boxes?")
    with pytest.raises(ValueError, match="empty prompt"):
        pipeline.tokenize_prompts([""], tok, 64)
