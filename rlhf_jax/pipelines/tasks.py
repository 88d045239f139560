"""The task a run trains on: its examples (the user's files or the synthetic TL;DR task), tokenizer,
sequence layout, and the training prompts the online stages sample for.

    task = tasks.load_task(data_config, seed, init_from=init_from, init_from_hf=init_from_hf)
    tokenizer = tasks.tokenizer_for(data_config, task, workdir, init_from, init_from_hf)

Conversational records are rendered with the chat template of the tokenizer the run uses
(`data.chat_template`, `chat_template`), so `load_task` is told where that tokenizer comes from.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from rlhf_jax.data import (
    loading,
    pipeline,
    synthetic_arith,
    synthetic_dialogue,
    synthetic_tldr,
    synthetic_tools,
)
from rlhf_jax.data import records as rec
from rlhf_jax.data.chat_template import ChatTemplate
from rlhf_jax.data.hf_tokenizer import TOKENIZER_JSON
from rlhf_jax.data.tokenizer import SPM_FILE, get_or_train_tokenizer, load_tokenizer
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import DataConfig


@dataclasses.dataclass
class TaskData:
    """The examples of a run. `eval_prompts` are held-out prompts with a reference completion."""

    sft: list[rec.SFTExample]
    preference: list[rec.PreferenceExample]
    eval_preference: list[rec.PreferenceExample]
    eval_prompts: list[rec.SFTExample]
    synthetic: bool
    stats: dict
    problems: list[rec.MathExample] = dataclasses.field(default_factory=list)  # math tasks: RL prompts
    eval_problems: list[rec.MathExample] = dataclasses.field(default_factory=list)  # and held-out ones
    # The dialogue task: training dialogues with per-turn rewards, and held-out (slip-free) ones.
    dialogues: list[synthetic_dialogue.DialogueExample] = dataclasses.field(default_factory=list)
    eval_dialogues: list[synthetic_dialogue.DialogueExample] = dataclasses.field(default_factory=list)


def _flip(pairs: list[rec.PreferenceExample], rate: float, seed: int) -> list[rec.PreferenceExample]:
    if rate <= 0:
        return pairs
    flip = np.random.default_rng([seed, 7]).random(len(pairs)) < rate
    return [
        dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen) if f else p
        for p, f in zip(pairs, flip, strict=True)
    ]


def load_task(
    data: DataConfig, seed: int, *, tokenizer=None, init_from: str = "", init_from_hf: str = ""
) -> TaskData:
    """Loads the run's examples: the user's files, or the synthetic TL;DR task when none are given.

    Conversational records of the user's files are rendered with `chat_template(data, tokenizer)`:
    `tokenizer` is the run's, or else the one `tokenizer_for` loads from (data.tokenizer, `init_from`,
    `init_from_hf`).

    With files: SFT examples come from `sft_path`, or else from the prompt and chosen response of the
    preference pairs; evaluation pairs from `eval_path`, or else a seeded `eval_fraction` of the
    preference pairs held out. Label flips (`flip_rate`) hit only the training pairs. With
    `vary_with_seed` the synthetic task is generated from (synthetic_seed, seed), and the pairs of an
    `eval_path` (hence the evaluation prompts, of which evaluation takes the first eval.num_prompts)
    come in a seeded order.

    Raises:
      ValueError: for an HH experiment without a data path (naming the key to set).
    """
    if data.task == "arith":
        return _load_math_task(data, seed, None)
    if data.task == "dialogue":
        return _load_dialogue_task(data, seed)
    if data.task == "tools":
        return _load_tool_task(data, seed)
    files = bool(data.sft_path or data.preference_path or data.eval_path)
    if files and tokenizer is None and data.chat_template != "none":
        source = tokenizer_source(data, init_from, init_from_hf)
        tokenizer = _load_tokenizer(source, data) if source else None
    template = chat_template(data, tokenizer) if files else None
    if data.task == "math":
        return _load_math_task(data, seed, template)
    fmt = data.format or None
    if not (data.sft_path or data.preference_path):
        if data.task == "hh":
            raise ValueError(
                "this is an Anthropic HH experiment and needs your data: give "
                "--config.data.path=PATH (the preference file: e.g. hh-rlhf/helpful-base/train.jsonl.gz; a "
                "file, glob or comma-separated list; same as data.preference_path), optionally "
                "--config.data.eval_path=PATH (the test split)"
            )
        task_seed = data.synthetic_seed
        if data.vary_with_seed:  # hashed, so (synthetic_seed, seed) = (0, 1) and (1, 0) differ
            task_seed = int(np.random.SeedSequence([data.synthetic_seed, seed]).generate_state(1)[0])
        splits = synthetic_tldr.generate_splits(
            seed=task_seed,
            num_sft=data.num_sft,
            num_pref=data.num_pref,
            num_eval=data.num_eval,
            flip_rate=data.flip_rate,
        )
        held = max(1, int(len(splits.preference) * data.eval_fraction))
        clean = synthetic_tldr.generate_splits(
            seed=task_seed, num_sft=0, num_pref=data.num_pref, num_eval=0
        ).preference
        # Held-out pairs are ordered by the gold reward (never flipped), so evaluation accuracy is
        # agreement with the gold reward.
        eval_preference = [
            p if p.meta["gold_chosen"] > p.meta["gold_rejected"]
            else dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen)
            for p in clean[:held]
        ]  # fmt: skip
        return TaskData(
            sft=splits.sft,
            preference=splits.preference[held:],
            eval_preference=eval_preference,
            eval_prompts=splits.eval,
            synthetic=True,
            stats={"source": "synthetic_tldr", "sft": len(splits.sft), "preference": len(splits.preference)},
        )
    stats = {}
    preference, eval_preference = [], []
    if data.preference_path:
        preference, s = loading.load_preference(
            data.preference_path, format=fmt, strict=data.strict, template=template
        )
        stats["preference"] = s.summary()
    if data.eval_path:
        eval_preference, s = loading.load_preference(
            data.eval_path, format=fmt, strict=data.strict, template=template
        )
        stats["eval"] = s.summary()
        if data.vary_with_seed:
            order = np.random.default_rng([seed, 13]).permutation(len(eval_preference))
            eval_preference = [eval_preference[i] for i in order]
    elif preference:
        order = np.random.default_rng([seed, 3]).permutation(len(preference))
        held = max(1, int(len(preference) * data.eval_fraction))
        eval_preference = [preference[i] for i in order[:held]]
        preference = [preference[i] for i in order[held:]]
    if data.sft_path:
        sft, s = loading.load_sft(data.sft_path, format=fmt, strict=data.strict, template=template)
        stats["sft"] = s.summary()
    else:
        sft = [rec.SFTExample(p.prompt, p.chosen) for p in preference]
    eval_prompts = [rec.SFTExample(p.prompt, p.chosen) for p in eval_preference]
    if not sft and not preference:
        raise ValueError("no usable examples in the given data paths; see the skipped counts above")
    return TaskData(
        sft=sft,
        preference=_flip(preference, data.flip_rate, seed),
        eval_preference=eval_preference,
        eval_prompts=eval_prompts,
        synthetic=False,
        stats=stats,
    )


def _load_dialogue_task(data: DataConfig, seed: int) -> TaskData:
    """The embedded dialogue task (`synthetic_dialogue`): `num_sft` training dialogues (with slips; SFT
    trains on all their replies) and `num_eval` held-out slip-free ones, from independent streams."""
    task_seed = data.synthetic_seed
    if data.vary_with_seed:
        task_seed = int(np.random.SeedSequence([data.synthetic_seed, seed]).generate_state(1)[0])
    config = synthetic_dialogue.DialogueConfig(max_turns=data.dialogue_max_turns,
                                               error_rate=data.dialogue_error_rate)  # fmt: skip
    train = synthetic_dialogue.generate(data.num_sft, seed=task_seed, config=config)
    held = synthetic_dialogue.generate(data.num_eval, seed=task_seed + 1_000_003, config=config, slips=False)
    return TaskData(
        sft=[d.to_sft() for d in train],
        preference=[],
        eval_preference=[],
        eval_prompts=[d.to_sft() for d in held],
        synthetic=True,
        stats={"source": "synthetic_dialogue", "dialogues": len(train), "eval_dialogues": len(held)},
        dialogues=train,
        eval_dialogues=held,
    )


def _load_tool_task(data: DataConfig, seed: int) -> TaskData:
    """The embedded tool-calling task (`synthetic_tools`): `num_sft` training and `num_eval` held-out
    requests, every prompt distinct; the weights of `data.tool_weights` are attached by `sft_examples`."""
    task_seed = data.synthetic_seed
    if data.vary_with_seed:
        task_seed = int(np.random.SeedSequence([data.synthetic_seed, seed]).generate_state(1)[0])
    splits = synthetic_tools.generate_splits(
        seed=task_seed, num_sft=data.num_sft, num_eval=data.num_eval, tools_per_prompt=data.tools_per_prompt
    )
    return TaskData(
        sft=splits.sft,
        preference=[],
        eval_preference=[],
        eval_prompts=splits.eval,
        synthetic=True,
        stats={
            "source": "synthetic_tools",
            "sft": len(splits.sft),
            "eval": len(splits.eval),
            "tool_weights": data.tool_weights,
        },
    )


def sft_examples(task: TaskData, tokenizer, data: DataConfig) -> list[rec.SFTExample]:
    """The SFT stage's training examples: the task's demonstrations, with TL-Training's key-token weights
    (`synthetic_tools.with_pkt_weights`) when `data.tool_weights` is "pkt" (they need the tokenizer)."""
    if data.tool_weights == "pkt":
        return synthetic_tools.with_pkt_weights(task.sft, tokenizer)
    return task.sft


def _load_math_task(data: DataConfig, seed: int, template: ChatTemplate | None) -> TaskData:
    """A math task: the synthetic `arith` problems, or GSM8K / MATH-style files (`data.path`, with
    `eval_path` or a seeded `eval_fraction` held out); SFT demonstrations are the training problems'
    solutions unless `sft_path` (problem files too) is given."""
    if data.task == "arith":
        task_seed = data.synthetic_seed
        if data.vary_with_seed:
            task_seed = int(np.random.SeedSequence([data.synthetic_seed, seed]).generate_state(1)[0])
        splits = synthetic_arith.generate_splits(
            seed=task_seed, num_sft=data.num_sft, num_train=data.num_train, num_eval=data.num_eval,
            error_rate=data.arith_error_rate, misread_rate=data.arith_misread_rate,
            config=synthetic_arith.ArithConfig(max_steps=data.arith_max_steps),
        )  # fmt: skip
        sft, problems, eval_problems = splits.sft, splits.train, splits.eval
        stats = {
            "source": "synthetic_arith",
            "sft": len(sft),
            "train": len(problems),
            "eval": len(eval_problems),
        }
    else:
        fmt = data.format or None
        problems, s = loading.load_math(
            data.preference_path, format=fmt, strict=data.strict, template=template
        )
        stats = {"problems": s.summary()}
        if data.eval_path:
            eval_problems, s = loading.load_math(
                data.eval_path, format=fmt, strict=data.strict, template=template
            )
            stats["eval"] = s.summary()
        else:
            order = np.random.default_rng([seed, 3]).permutation(len(problems))
            held = max(1, int(len(problems) * data.eval_fraction))
            eval_problems = [problems[i] for i in order[:held]]
            problems = [problems[i] for i in order[held:]]
        sft = problems
        if data.sft_path:
            sft, s = loading.load_math(data.sft_path, format=fmt, strict=data.strict, template=template)
            stats["sft"] = s.summary()
        if not problems:
            raise ValueError(f"no usable problems in {data.preference_path!r}; see the skipped counts above")
    return TaskData(
        sft=[p.to_sft() for p in sft],
        preference=[],
        eval_preference=[],
        eval_prompts=[p.to_sft() for p in eval_problems],
        synthetic=data.task == "arith",
        stats=stats,
        problems=problems,
        eval_problems=eval_problems,
    )


def corpus(task: TaskData) -> list[str]:
    """Training texts for a tokenizer trained from scratch (evaluation texts excluded)."""
    texts = [t for ex in task.sft for t in (ex.prompt, ex.completion)]
    texts += [ex.prompt for ex in task.problems]
    return texts + [t for ex in task.preference for t in (ex.prompt, ex.chosen, ex.rejected)]


def tokenizer_source(data: DataConfig, init_from: str = "", init_from_hf: str = "") -> str:
    """Where the run's tokenizer is loaded from (`tokenizer_for`), or "" when it is trained."""
    source = data.tokenizer
    if not source and init_from and os.path.isdir(init_from):
        has = lambda d: any(os.path.exists(os.path.join(d, f)) for f in (SPM_FILE, TOKENIZER_JSON))  # noqa: E731
        source = init_from if has(init_from) else ""
    if not source and init_from_hf:
        source = init_from_hf
    return source


def _load_tokenizer(source: str, data: DataConfig):
    try:
        return load_tokenizer(source)
    except FileNotFoundError as e:
        key = "data.tokenizer" if data.tokenizer else "model.init_from_hf"
        raise FileNotFoundError(f"{key}: {e}") from e


def chat_template(data: DataConfig, tokenizer) -> ChatTemplate | None:
    """The template conversational records are rendered with (`data.chat_template`): None for "none";
    the Jinja file's for a path; for "auto" the tokenizer's own (None when it has none, or when there is
    no tokenizer yet, i.e. one will be trained). `data.chat_template_kwargs` are bound to it."""
    if data.chat_template == "none":
        return None
    source = None
    if data.chat_template != "auto":
        with open(data.chat_template, encoding="utf-8") as f:
            source = f.read()
    return ChatTemplate.of(tokenizer, source=source, kwargs=dict(data.chat_template_kwargs))


def tokenizer_for(data: DataConfig, task: TaskData, workdir: str, init_from: str, init_from_hf: str = ""):
    """The tokenizer: data.tokenizer (a sentencepiece `.model`, a `tokenizer.json`, or a directory with
    either), else init_from's, else the HF checkpoint's (its `tokenizer.model`, else its
    `tokenizer.json`), else one trained on the task's text; a copy is kept in the workdir
    (`load_tokenizer(workdir)` loads it)."""
    source = tokenizer_source(data, init_from, init_from_hf)
    if source:
        tokenizer = _load_tokenizer(source, data)
    else:
        tokenizer = get_or_train_tokenizer("", corpus(task), data.vocab_size, workdir)
    if workdir_io.is_main():  # every stage keeps the tokenizer it used, for init_from and for users
        tokenizer.save(workdir)
    return tokenizer


def layout(data: DataConfig) -> pipeline.SequenceLayout:
    return pipeline.SequenceLayout(max_len=data.max_len, max_prompt_len=data.max_prompt_len)


def training_prompts(task: TaskData, tokenizer, *, num_prompts: int, max_prompt_len: int, seed: int,
                     salt: int = 5):  # fmt: skip
    """Distinct prompts of the preference split in a seeded order (the first `num_prompts`; 0 = all).

    Returns:
      (prompts, prompt batch with `prompt_tokens` [P, Tp] and `prompt_lengths` [P]).
    """
    prompts = list(dict.fromkeys(p.prompt for p in task.preference))
    order = np.random.default_rng([seed, salt]).permutation(len(prompts))
    if num_prompts:
        order = order[:num_prompts]
    prompts = [prompts[i] for i in order]
    tokenized = pipeline.tokenize_prompts(prompts, tokenizer, max_prompt_len)
    return prompts, tokenized.batch(np.arange(len(prompts)), max_prompt_len)
