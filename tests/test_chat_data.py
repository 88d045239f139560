"""Conversational data through chat templates: the texts and ids equal `transformers`' `apply_chat_template`
on Llama 3, Qwen2.5 and Gemma style templates (byte-level BPE tokenizers built here), the loss covers the
assistant turns only, bad conversations are counted, plain-text formats are unchanged, and an SFT stage
runs on a `messages` file from a checkpoint with a template."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax import data
from rlhf_jax.data import chat_template, hf_tokenizer, loading, pipeline, tokenizer
from rlhf_jax.pipelines import config as config_lib
from rlhf_jax.pipelines import fingerprints, tasks
from tests.test_hf_tokenizer import GEMMA_TEMPLATE, LLAMA3_TEMPLATE, QWEN_TEMPLATE, build_tokenizer

transformers = pytest.importorskip("transformers")

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<|finetune_right_pad_id|>"],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gemma": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
}  # fmt: skip
CONFIGS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
    "qwen": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
             "chat_template": QWEN_TEMPLATE},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
              "chat_template": GEMMA_TEMPLATE},
}  # fmt: skip
GENERATION = {"llama3": [4, 1], "qwen": [2, 0], "gemma": [1, 4]}  # Gemma stops at <eos> and <end_of_turn>
MARKER = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>", "gemma": "<end_of_turn>"}
HEADER = {"llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n", "qwen": "<|im_start|>assistant\n",
          "gemma": "<start_of_turn>model\n"}  # fmt: skip

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 2 * 3?"},
    {"role": "assistant", "content": "6, of course."},
]
CORPUS = [
    "What is 2 + 3? It is 5. And 2 * 3? 6, of course. Be brief. Hello there, how are you? Fine.",
    "system user assistant model " + QWEN_SYSTEM,
    "Question: Tom has 5 apples and buys 7 more. How many apples? Tom has 5 + 7 = 12.\n#### 12",
] * 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory with tokenizer.json, tokenizer_config.json (with the chat template) and
    generation_config.json."""
    out = {}
    for name in SPECIALS:
        directory = tmp_path_factory.mktemp(name)
        build_tokenizer(directory, specials=SPECIALS[name], config=CONFIGS[name], corpus=CORPUS,
                        generation={"eos_token_id": GENERATION[name]}, qwen_style=name == "qwen")  # fmt: skip
        out[name] = directory
    return out


def _ours_theirs(checkpoints, name):
    ours = hf_tokenizer.HFTokenizer.from_dir(str(checkpoints[name]))
    return ours, transformers.AutoTokenizer.from_pretrained(str(checkpoints[name]))


def _ids(encoded) -> list[int]:
    """`apply_chat_template(..., tokenize=True)`'s ids (transformers 5 returns a BatchEncoding)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _write(path, rows):
    path = str(path)
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _row_and_loss_runs(data_, layout, i=0):
    """Example i's row tokens and the targets of each run of consecutive positions in the loss."""
    batch = data_.batch(np.array([i]), layout.max_len)
    n = int(batch["segment_ids"][0].sum())
    on = np.nonzero(batch["loss_mask"][0])[0]
    runs = np.split(on, np.nonzero(np.diff(on) > 1)[0] + 1) if len(on) else []
    return list(batch["tokens"][0, :n]), [batch["targets"][0][r] for r in runs]


LAYOUT = pipeline.SequenceLayout(max_len=256, max_prompt_len=192)


@pytest.mark.parametrize("container", ["jsonl", "parquet"])
@pytest.mark.parametrize("name", ["llama3", "qwen", "gemma"])
def test_sft_messages_match_transformers_and_train_on_assistant_turns_only(checkpoints, name, container,
                                                                           tmp_path):  # fmt: skip
    ours, theirs = _ours_theirs(checkpoints, name)
    template = chat_template.ChatTemplate.of(ours)
    chats = [TURNS, TURNS[:2]] if name == "gemma" else [[SYSTEM, *TURNS], TURNS, TURNS[:2]]
    path = _write(tmp_path / f"m.{container}", [{"messages": chat} for chat in chats])
    examples, stats = data.load_sft(path, template=template)
    assert stats.kept == len(chats) and not stats.skipped
    tokenized = pipeline.tokenize_sft(examples, ours, LAYOUT)
    for i, (chat, example) in enumerate(zip(chats, examples, strict=True)):
        text = theirs.apply_chat_template(chat, tokenize=False)
        assert example.prompt + example.completion == text
        first_reply = next(j for j, m in enumerate(chat) if m["role"] == "assistant")
        prompt = theirs.apply_chat_template(chat[:first_reply], tokenize=False, add_generation_prompt=True)
        assert example.prompt == prompt
        tokens, runs = _row_and_loss_runs(tokenized, LAYOUT, i)
        assert tokens == _ids(theirs.apply_chat_template(chat, tokenize=True))
        # The loss: each assistant turn's content and end-of-turn marker, nothing else.
        contents = [m["content"] for m in chat if m["role"] == "assistant"]
        assert [theirs.decode(r) for r in runs] == [c + MARKER[name] for c in contents]
    if name == "qwen":  # the template's default system prompt when the chat has none
        assert examples[1].prompt.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>")
        assert examples[0].prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    if name == "llama3":  # one BOS: the template's
        assert tokenized.prompt_ids[0][0] == ours.bos_id and tokenized.prompt_ids[0][1] != ours.bos_id


@pytest.mark.parametrize("name", ["llama3", "qwen", "gemma"])
def test_preference_pairs_split_at_the_generation_prompt(checkpoints, name, tmp_path):
    ours, theirs = _ours_theirs(checkpoints, name)
    template = chat_template.ChatTemplate.of(ours)
    prompt = TURNS[:3]
    chosen, rejected = [{"role": "assistant", "content": "6."}], [{"role": "assistant", "content": "Five."}]
    rows = [
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        {"prompt": prompt, "chosen": "6.", "rejected": "Five."},  # string responses: assistant turns
        {"chosen": prompt + chosen, "rejected": prompt + rejected},  # TRL's implicit prompt
    ]
    examples, stats = data.load_preference(_write(tmp_path / "p.jsonl", rows[:2]), template=template)
    assert stats.kept == 2 and examples[0] == examples[1]
    implicit, _ = data.load_preference(_write(tmp_path / "i.jsonl", rows[2:]), template=template)
    assert implicit[0] == examples[0]
    ex = examples[0]
    assert ex.prompt == theirs.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert ex.prompt.endswith(HEADER[name])
    assert (ex.chosen, ex.rejected) == ("6." + MARKER[name], "Five." + MARKER[name])
    full = theirs.apply_chat_template(prompt + chosen, tokenize=False)
    assert full.startswith(ex.prompt + ex.chosen) and not full[len(ex.prompt + ex.chosen) :].strip()
    pairs = pipeline.tokenize_preference([ex], ours, LAYOUT)
    batch = pairs.batch(np.array([0]), LAYOUT.max_len)
    n = int(batch["chosen_segment_ids"][0].sum())
    tokens = list(batch["chosen_tokens"][0, :n])
    assert tokens == theirs(ex.prompt + ex.chosen, add_special_tokens=False)["input_ids"]
    # The loss: the final assistant turn and its marker, which is an EOS id (no second EOS appended).
    mask = batch["chosen_loss_mask"][0] > 0
    assert theirs.decode(batch["chosen_targets"][0][mask]) == "6." + MARKER[name]
    assert batch["chosen_targets"][0][mask][-1] in ours.eos_ids
    assert tokens.count(ours.bos_id) == (0 if ours.bos_id is None else 1)


@pytest.mark.parametrize("name", ["llama3", "qwen", "gemma"])
def test_rl_prompts_end_with_the_generation_header(checkpoints, name, tmp_path):
    ours, theirs = _ours_theirs(checkpoints, name)
    template = chat_template.ChatTemplate.of(ours)
    question = "Tom has 5 apples and buys 7 more. How many apples?"
    user = [{"role": "user", "content": question}]
    rows = [
        {"prompt": user, "answer": "#### 12"},
        {"prompt": user, "answer": 12, "solution": "5 + 7 = 12.\n#### 12"},
    ]
    problems, stats = data.load_math(_write(tmp_path / "rl.jsonl", rows), template=template)
    g_path = _write(tmp_path / "g.jsonl", [{"question": question, "answer": "5+7=12\n#### 12"}])
    gsm8k, _ = data.load_math(g_path, template=template)
    assert stats.kept == 2 and [p.answer for p in problems + gsm8k] == ["12", "12", "12"]
    expected = theirs.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert [p.prompt for p in problems + gsm8k] == [expected] * 3 and expected.endswith(HEADER[name])
    assert problems[1].solution == "5 + 7 = 12.\n#### 12" + MARKER[name]
    assert problems[0].meta["question"] == question
    prompts = pipeline.tokenize_prompts([expected], ours, 128).batch(np.arange(1), 128)
    n = int(prompts["prompt_lengths"][0])
    assert list(prompts["prompt_tokens"][0, :n]) == _ids(
        theirs.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
    )
    # SFT on the problems: the demonstration is the assistant turn, with the template's marker as EOS.
    sft = pipeline.tokenize_sft([problems[1].to_sft()], ours, LAYOUT)
    _, runs = _row_and_loss_runs(sft, LAYOUT)
    assert [theirs.decode(r) for r in runs] == ["5 + 7 = 12.\n#### 12" + MARKER[name]]
    # Without a template the text formats are unchanged; a message prompt is HH-style.
    plain, _ = data.load_math(str(tmp_path / "rl.jsonl"))
    assert plain[0].prompt == f"\n\nHuman: {question}\n\nAssistant:" and plain[0].solution == " #### 12"
    (g,), _ = data.load_math(str(tmp_path / "g.jsonl"))
    assert g.prompt == f"Question: {question}\nAnswer:"


def test_bad_conversations_are_counted_and_strict_names_them(checkpoints, tmp_path):
    ours, _ = _ours_theirs(checkpoints, "gemma")
    gemma = chat_template.ChatTemplate.of(ours)
    rows = [
        {"messages": TURNS},
        {"messages": [SYSTEM, *TURNS]},  # Gemma's template raises on a system turn
        {"messages": [TURNS[0], TURNS[0], TURNS[1]]},  # and on turns that do not alternate
        {"messages": [{"role": "robot", "content": "beep"}, TURNS[1]]},
        {"messages": [TURNS[0], {"role": "assistant", "content": ["not", "text"]}]},
        {"messages": [TURNS[0]]},  # nothing to train on
        {"messages": [TURNS[0], {"role": "assistant", "content": "  "}]},
        {"messages": "not a list"},
    ]
    path = _write(tmp_path / "bad.jsonl", rows)
    examples, stats = data.load_sft(path, template=gemma)
    assert len(examples) == 1
    assert stats.skipped == {"template_error": 2, "wrong_type": 3, "empty_response": 2}
    assert "template_error=2" in stats.summary()
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: field 'messages': template_error: .*System role"):
        data.load_sft(path, template=gemma, strict=True)
    # A template that is not prefix-consistent (it blanks earlier assistant turns, as Qwen3 drops their
    # reasoning): multi-turn conversations are bad records, single-turn ones are fine.
    blanking = chat_template.ChatTemplate(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}...{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    q_path = _write(tmp_path / "q.jsonl", [{"messages": TURNS}, {"messages": TURNS[:2]}])
    examples, stats = data.load_sft(q_path, template=blanking)
    assert len(examples) == 1 and stats.skipped == {"template_error": 1}
    pairs = [{"prompt": [SYSTEM, TURNS[0]], "chosen": "a", "rejected": "b"},
             {"prompt": [TURNS[0]], "chosen": "a", "rejected": "a"}]  # fmt: skip
    _, stats = data.load_preference(_write(tmp_path / "pp.jsonl", pairs), template=gemma)
    assert stats.skipped == {"template_error": 1, "identical_responses": 1}


def test_plain_text_formats_and_hh_style_without_a_template(checkpoints, tmp_path):
    ours, _ = _ours_theirs(checkpoints, "qwen")
    template = chat_template.ChatTemplate.of(ours)
    rows = [{"prompt": "TL;DR of the post:", "chosen": " short", "rejected": " long"},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}]  # fmt: skip
    path = _write(tmp_path / "plain.jsonl", rows[:1])
    hh = _write(tmp_path / "hh.jsonl", rows[1:])
    for p in (path, hh):
        assert data.load_preference(p, template=template)[0] == data.load_preference(p)[0]
    sft_rows = [{"prompt": "Q:", "completion": " A"}]
    sp = _write(tmp_path / "sft.jsonl", sft_rows)
    assert data.load_sft(sp, template=template)[0] == data.load_sft(sp)[0]
    # `messages` without a template: HH-style text, the last assistant turn as the completion.
    (ex,), _ = data.load_sft(_write(tmp_path / "m.jsonl", [{"messages": [SYSTEM, *TURNS]}]))
    assert ex.prompt == ("\n\nSystem: Be brief.\n\nHuman: What is 2 + 3?\n\nAssistant: It is 5.\n\nHuman: "
                         "And 2 * 3?\n\nAssistant:")  # fmt: skip
    assert (ex.completion, ex.segments) == (" 6, of course.", ())
    _, stats = data.load_sft(_write(tmp_path / "m2.jsonl", [{"messages": TURNS[:1]}]))
    assert stats.skipped == {"wrong_type": 1}


def test_sentencepiece_with_a_template_file_masks_segment_by_segment(tmp_path):
    spm = tokenizer.train_tokenizer(CORPUS + ["<|im_start|><|im_end|>"] * 5, vocab_size=400)
    template = chat_template.ChatTemplate.of(spm, source=QWEN_TEMPLATE)
    (ex,), _ = data.load_sft(_write(tmp_path / "m.jsonl", [{"messages": TURNS}]), template=template)
    tokenized = pipeline.tokenize_sft([ex], spm, LAYOUT)
    tokens, runs = _row_and_loss_runs(tokenized, LAYOUT)
    assert tokens == [spm.bos_id] + [i for text, _ in ex.segments for i in spm.encode(text)]
    assert [spm.decode(r) for r in runs] == ["It is 5.<|im_end|>", "6, of course.<|im_end|>"]


def test_truncation_and_packing_keep_the_mask(checkpoints, tmp_path):
    from rlhf_jax.data import packing

    ours, theirs = _ours_theirs(checkpoints, "qwen")
    (ex,), _ = data.load_sft(_write(tmp_path / "m.jsonl", [{"messages": TURNS}]),
                             template=chat_template.ChatTemplate.of(ours))  # fmt: skip
    ids, mask = pipeline.segment_ids(ours, ex.segments)
    first = int(np.argmax(mask))
    layout = pipeline.SequenceLayout(max_len=first + 6, max_prompt_len=first - 2)
    stats = data.LoadStats()
    cut = pipeline.tokenize_sft([ex], ours, layout, stats)
    assert stats.truncated == {"prompt": 1, "completion": 1}
    assert len(cut.prompt_ids[0]) == first - 2 and list(cut.prompt_ids[0]) == ids[2:first]  # from the left
    np.testing.assert_array_equal(cut.completion_masks[0], mask[first : first + 8])
    full = pipeline.tokenize_sft([ex, ex], ours, LAYOUT)
    packed = packing.pack_sft(full).batch(np.array([0]), 2 * len(ids))
    single = full.batch(np.array([0]), len(ids))
    np.testing.assert_array_equal(packed["loss_mask"][0, : len(ids)], single["loss_mask"][0])
    np.testing.assert_array_equal(packed["loss_mask"][0, len(ids) :], single["loss_mask"][0])


def test_config_key_resolution_and_fingerprint(checkpoints, tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text(QWEN_TEMPLATE)
    with pytest.raises(
        ValueError, match="data.chat_template must be 'auto', 'none' or a Jinja template file"
    ):
        config_lib.DataConfig(chat_template="missing.jinja")
    kw = config_lib.DataConfig(chat_template_kwargs="enable_thinking=false, depth=2").chat_template_kwargs
    assert kw == (("depth", 2), ("enable_thinking", False))
    assert config_lib.DataConfig(chat_template_kwargs={"enable_thinking": False}).chat_template_kwargs == (
        ("enable_thinking", False),
    )
    llama = tokenizer.load_tokenizer(str(checkpoints["llama3"]))
    auto = config_lib.DataConfig()
    assert tasks.chat_template(auto, llama).source == LLAMA3_TEMPLATE
    assert tasks.chat_template(auto, None) is None  # a tokenizer trained from scratch has none
    assert tasks.chat_template(config_lib.DataConfig(chat_template="none"), llama) is None
    override = tasks.chat_template(config_lib.DataConfig(chat_template=str(jinja)), llama)
    assert (
        override.source == QWEN_TEMPLATE and dict(override.special_tokens)["bos_token"] == "<|begin_of_text|>"
    )
    thinking = chat_template.ChatTemplate.of(
        llama, source="{% if not enable_thinking %}/no_think{% endif %}", kwargs={"enable_thinking": False}
    )
    assert thinking.render(TURNS) == "/no_think"
    # The fingerprint: "auto" leaves the data spec as before the key existed; a file enters by content.
    spec = lambda **kw: fingerprints.fingerprint(fingerprints.data_spec(config_lib.DataConfig(**kw)))
    assert "chat_template" not in fingerprints.data_spec(auto)
    assert len({spec(), spec(chat_template="none"), spec(chat_template=str(jinja)),
                spec(chat_template_kwargs="enable_thinking=false")}) == 4  # fmt: skip
    before = spec(chat_template=str(jinja))
    jinja.write_text(LLAMA3_TEMPLATE)
    assert spec(chat_template=str(jinja)) != before


def test_load_task_uses_the_tokenizer_source_template(checkpoints, tmp_path):
    sft_path = _write(tmp_path / "m.jsonl", [{"messages": TURNS}])
    pref = _write(tmp_path / "p.jsonl", [{"prompt": TURNS[:1], "chosen": "5.", "rejected": "6."}] * 4)
    cfg = config_lib.DataConfig(sft_path=sft_path, preference_path=pref, eval_fraction=0.25)
    task = tasks.load_task(cfg, 0, init_from_hf=str(checkpoints["qwen"]))
    assert task.sft[0].segments and task.preference[0].prompt.endswith(HEADER["qwen"])
    assert task.eval_prompts[0].completion == "5.<|im_end|>"
    none = config_lib.DataConfig(sft_path=sft_path, preference_path=pref, chat_template="none")
    plain = tasks.load_task(none, 0, init_from_hf=str(checkpoints["qwen"]))
    assert (
        not plain.sft[0].segments and plain.preference[0].prompt == "\n\nHuman: What is 2 + 3?\n\nAssistant:"
    )
    no_template = tasks.load_task(cfg, 0)  # a tokenizer trained from scratch: HH-style
    assert no_template.preference[0].prompt == plain.preference[0].prompt
    assert loading.load_sft(sft_path)[0][0].segments == ()


@pytest.mark.slow
def test_sft_stage_on_a_messages_file_from_a_checkpoint_with_a_template(checkpoints, tmp_path):
    """`sft_tldr:smoke` from a tiny random Llama with the Llama 3 template on a `messages` file: the stage
    trains on the templated conversations and keeps the tokenizer (and its template) beside its params."""
    torch = pytest.importorskip("torch")
    from launch import train
    from tests.workdirs import stage_dir

    hf_dir = tmp_path / "hf"
    build_tokenizer(hf_dir, specials=SPECIALS["llama3"], config=CONFIGS["llama3"], corpus=CORPUS,
                    generation={"eos_token_id": GENERATION["llama3"]})  # fmt: skip
    tok = tokenizer.load_tokenizer(str(hf_dir))
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(hf_dir), safe_serialization=True)
    rng = np.random.default_rng(0)
    chats = []
    for _ in range(24):
        a, b = (int(x) for x in rng.integers(1, 9, size=2))
        chats.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                   {"role": "assistant", "content": f"It is {a + b}."}]})  # fmt: skip
    sft_path = _write(tmp_path / "sft.jsonl", chats)
    pairs = [
        {"prompt": c["messages"][:1], "chosen": c["messages"][1:], "rejected": "No idea."} for c in chats
    ]
    pref_path = _write(tmp_path / "pref.jsonl", pairs)
    run = tmp_path / "run"
    code = train.main([
        "--experiment=sft_tldr:smoke", f"--workdir={run}", f"--config.data.sft_path={sft_path}",
        f"--config.data.path={pref_path}", f"--config.model.init_from_hf={hf_dir}",
        "--config.data.max_len=96", "--config.data.max_prompt_len=64", "--config.progress=false",
    ])  # fmt: skip
    assert code == 0
    results = json.load(open(run / "results.json"))
    assert np.isfinite(results["eval_nll_per_token"]) and results["truncated"] == {}
    kept = tokenizer.load_tokenizer(stage_dir(run, "sft"))
    assert kept.chat_template == LLAMA3_TEMPLATE
    spec = json.load(open(f"{stage_dir(run, 'sft')}/fingerprint.json"))["spec"]
    # "auto" (the template itself enters through the checkpoint's digest) is in the spec of a run on the
    # user's files, so stages fingerprinted before templates were applied are not reused.
    assert spec["data"]["chat_template"] == "auto"
