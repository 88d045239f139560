"""The embedded default task: synthetic Reddit TL;DR posts with a programmatic gold reward.

Posts. A seeded generator writes Reddit-style posts in the canonical TL;DR prompt format
(`formats.tldr_prompt`) over 9 topic domains and 32 subreddits. Each post carries four key facts drawn
from the lexicon (`synthetic_lexicon.py`): who (a person, pet or company), what they did, how long, and
what is asked; they are spread over an intro, an event and a question sentence from varied templates,
among one or two distractor sentences that carry no fact, under a title that restates some of them.

Gold reward. `gold_reward(prompt, summary)` plays the human rater; it is deterministic, reads only the two
texts, and works on any text. Both are lower-cased and split into words ([a-z0-9]+); facts are lexicon
entries found as whole-word phrases (the post's facts are those in its title and body). With n facts in
the post, c of them in the summary, h entries in the summary that are not in the post (hallucinations),
k repeated word bigrams (each extra occurrence of a bigram counts one) and w words:

  r* = 2 (c - (n - c)) / n  -  1.0 h  -  min(2, 0.25 k)  -  min(2, 0.1 max(0, w - 20))

so each covered fact of four is worth +1, each hallucinated fact -1, each repeated bigram -0.25 and each
word past the budget of 20 words -0.1; the last two are capped at -2 each, so that degenerate samples stay
on the scale of the rest, and the coverage term is 0 for a prompt without facts. A summary naming all four
facts in at most 20 words, with nothing invented or repeated, scores the maximum, 2; an empty one scores
-2. It does not judge fluency: a bare list of the four facts also scores 2, so a policy optimised hard
against r* (or a reward model of it) can drift towards such lists; report the KL to the SFT policy with it.

Splits. `generate_splits` returns SFT pairs (post, human-like reference), preference pairs and held-out
evaluation prompts with references. References come from a noisy writer that, per summary, drops each
fact (who 8%, event 8%, duration 25%, ask 12%), swaps a fact for a wrong one or adds an invented clause
(10%), repeats a sentence (6%) or rambles past the budget (12%), so references average about 1.06 of the
maximum 2 (41% of them at the maximum) and an SFT policy is good but clearly improvable. A preference
pair has two candidates from writers of different quality (error rates x0.5, x1 or x2, redrawn until
their gold rewards differ), labelled by Bradley-Terry sampling, P(a preferred to b) =
sigmoid(beta (r*(a) - r*(b))) with beta = 0.65, so labels agree with the gold reward about 72% of the
time, like human TL;DR labels. With a flip rate eps each label is then flipped with probability eps, and
the agreement a becomes a (1 - eps) + (1 - a) eps. Evaluation prompts never occur in the training splits.

Command line (writes sft/preference/eval JSONL and a tokenizer, prints sizes and statistics):
  python -m rlhf_jax.data.synthetic_tldr --out /tmp/synthetic_tldr
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import formats, tokenizer
from rlhf_jax.data import records as rec
from rlhf_jax.data import synthetic_lexicon as lex

BT_BETA = 0.65
LENGTH_BUDGET = 20  # words
_QUALITIES = (0.5, 1.0, 2.0)  # error-rate multipliers of the preference candidates' writers


@dataclasses.dataclass(frozen=True)
class WriterConfig:
    """Error rates of the human-like reference writer (per summary)."""

    drop_who: float = 0.08
    drop_event: float = 0.08
    drop_duration: float = 0.25
    drop_ask: float = 0.12
    hallucinate: float = 0.10
    repeat: float = 0.06
    ramble: float = 0.12


@dataclasses.dataclass(frozen=True)
class Post:
    """One generated post and its key facts (slot -> lexicon entry)."""

    domain: str
    subreddit: str
    title: str
    body: str
    facts: dict[str, str]

    @property
    def prompt(self) -> str:
        return formats.tldr_prompt(self.subreddit, self.title, self.body)


@dataclasses.dataclass(frozen=True)
class GoldTerms:
    """The parts of the gold reward (module docstring) and their total."""

    num_facts: int
    covered: int
    hallucinated: int
    repeats: int
    words: int
    reward: float


@dataclasses.dataclass(frozen=True)
class Splits:
    """The generated task: SFT examples, preference pairs, evaluation prompts with references."""

    sft: list[rec.SFTExample]
    preference: list[rec.PreferenceExample]
    eval: list[rec.SFTExample]


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _all_entries() -> dict[str, str]:
    entries = {_normalize(d): "duration" for d in lex.DURATIONS}
    for domain in lex.DOMAINS.values():
        for slot, key in (("who", "who"), ("event", "events"), ("ask", "asks")):
            entries.update({_normalize(v): slot for v in domain[key]})
    return entries


ENTRIES = _all_entries()
_ENTRY_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, ENTRIES), key=len, reverse=True)) + r")\b")


def find_facts(text: str) -> set[str]:
    """Returns the lexicon entries (normalised) that occur in `text` as whole-word phrases."""
    return set(_ENTRY_RE.findall(_normalize(text)))


@functools.lru_cache(maxsize=1 << 16)  # Prompts recur: each pair, and 64 samples per eval prompt.
def find_post_facts(prompt: str) -> frozenset[str]:
    """Returns the facts of a prompt: the entries in its title and post (from "TITLE:" on, if present)."""
    start = prompt.find("TITLE:")
    return frozenset(find_facts(prompt[start:] if start >= 0 else prompt))


def gold_reward_terms(prompt: str, summary: str) -> GoldTerms:
    """Returns the gold reward of `summary` for `prompt`, with its parts (module docstring)."""
    post_facts = find_post_facts(prompt)
    summary_facts = find_facts(summary)
    words = _normalize(summary).split()
    bigrams = Counter(zip(words, words[1:], strict=False))
    n, c = len(post_facts), len(post_facts & summary_facts)
    h = len(summary_facts - post_facts)
    k = sum(count - 1 for count in bigrams.values())
    coverage = 2.0 * (c - (n - c)) / n if n else 0.0
    repetition = min(2.0, 0.25 * k)
    length = min(2.0, 0.1 * max(0, len(words) - LENGTH_BUDGET))
    reward = coverage - 1.0 * h - repetition - length
    return GoldTerms(n, c, h, k, len(words), reward)


def gold_reward(prompt: str, summary: str) -> float:
    """Returns the gold reward r*(prompt, summary); deterministic, for any two texts (module docstring)."""
    return gold_reward_terms(prompt, summary).reward


def make_post(rng: np.random.Generator) -> Post:
    """Generates one post (module docstring)."""
    domain = _pick(rng, sorted(lex.DOMAINS))
    d = lex.DOMAINS[domain]
    facts = {
        "who": _pick(rng, d["who"]),
        "event": _pick(rng, d["events"]),
        "duration": _pick(rng, lex.DURATIONS),
        "ask": _pick(rng, d["asks"]),
    }
    subreddit = _pick(rng, d["subreddits"]) if rng.random() < 0.8 else _pick(rng, lex.GENERAL_SUBREDDITS)
    title = _pick(rng, lex.TITLE).format(**facts, age=int(rng.integers(18, 46)), sex=_pick(rng, "MF"))
    intro, event = _pick(rng, lex.INTRO).format(**facts), _pick(rng, lex.EVENT).format(**facts)
    sentences = [intro, event] if rng.random() < 0.7 else [event, intro]
    for i in rng.choice(len(lex.DISTRACTORS), size=int(rng.integers(1, 3)), replace=False):
        sentences.insert(int(rng.integers(0, len(sentences) + 1)), lex.DISTRACTORS[i])
    sentences.append(_pick(rng, lex.ASK).format(**facts))
    return Post(domain, subreddit, title, " ".join(sentences), facts)


def write_summary(
    post: Post, rng: np.random.Generator, quality: float = 1.0, config: WriterConfig = WriterConfig()
) -> str:
    """Writes a human-like summary whose error rates are `config`'s times `quality` (leading space)."""
    d, facts = lex.DOMAINS[post.domain], dict(post.facts)
    keep = {
        slot: rng.random() >= min(1.0, rate * quality)
        for slot, rate in (
            ("who", config.drop_who),
            ("event", config.drop_event),
            ("duration", config.drop_duration),
            ("ask", config.drop_ask),
        )
    }
    extra = ""
    if rng.random() < min(1.0, config.hallucinate * quality):
        if rng.random() < 0.5:  # A wrong fact in place of a true one.
            slot = _pick(rng, ("who", "event", "duration", "ask"))
            pool = (
                lex.DURATIONS
                if slot == "duration"
                else d[{"who": "who", "event": "events", "ask": "asks"}[slot]]
            )
            facts[slot] = _pick(rng, [v for v in pool if v != facts[slot]])
            keep[slot] = True
        else:  # An invented extra clause.
            other = [w for w in d["who"] if w != facts["who"]]
            extra = (
                f" and my {_pick(rng, other)} {_pick(rng, [e for e in d['events'] if e != facts['event']])}"
            )
    subject = f"my {facts['who']}" if keep["who"] else _pick(rng, lex.VAGUE_WHO)
    action = facts["event"] if keep["event"] else _pick(rng, lex.VAGUE_EVENT)
    if keep["duration"] and keep["who"] and rng.random() < 0.5:
        clause = f"{subject} of {facts['duration']} {action}{extra}"
    elif keep["duration"]:
        clause = f"{subject} {action} after {facts['duration']}{extra}"
    else:
        clause = f"{subject} {action}{extra}"
    if rng.random() < min(1.0, config.ramble * quality):
        clause += " " + " ".join(rng.permutation(lex.FILLER)[: int(rng.integers(1, 3))])
    ask = _pick(rng, lex.ASK_SUMMARY).format(ask=facts["ask"]) if keep["ask"] else _pick(rng, lex.NO_ASK)
    parts = [clause + ".", ask]
    if rng.random() < min(1.0, config.repeat * quality):
        parts.insert(int(rng.integers(0, 3)), _pick(rng, parts))
    text = " ".join(parts)
    return " " + (text[0].upper() + text[1:] if rng.random() < 0.5 else text)


def generate_splits(
    seed: int = 0,
    num_sft: int = 4096,
    num_pref: int = 4096,
    num_eval: int = 128,
    flip_rate: float = 0.0,
    config: WriterConfig = WriterConfig(),
) -> Splits:
    """Generates the task's splits (module docstring); the same arguments give the same splits.

    Args:
      seed: the generator seed.
      num_sft: SFT examples (post, reference summary).
      num_pref: preference pairs.
      num_eval: held-out evaluation prompts (with reference summaries).
      flip_rate: probability eps of flipping each preference label after Bradley-Terry sampling.
      config: the reference writer's error rates.

    Returns:
      The splits. Pairs carry `meta` with "gold_chosen", "gold_rejected" and "flipped".
    """
    rng_sft, rng_pref, rng_eval = (np.random.default_rng([seed, i]) for i in range(3))
    sft = []
    for _ in range(num_sft):
        post = make_post(rng_sft)
        sft.append(rec.SFTExample(post.prompt, write_summary(post, rng_sft, 1.0, config)))
    preference = [_pair(make_post(rng_pref), rng_pref, config, flip_rate) for _ in range(num_pref)]
    seen = {ex.prompt for ex in sft} | {ex.prompt for ex in preference}
    evaluation = []
    while len(evaluation) < num_eval:
        post = make_post(rng_eval)
        if post.prompt not in seen:
            seen.add(post.prompt)
            evaluation.append(rec.SFTExample(post.prompt, write_summary(post, rng_eval, 1.0, config)))
    return Splits(sft, preference, evaluation)


def agreement_rate(pairs: Sequence[rec.PreferenceExample]) -> float:
    """Returns the share of pairs (gold ties left out) whose label agrees with the gold reward."""
    margins = [gold_reward(p.prompt, p.chosen) - gold_reward(p.prompt, p.rejected) for p in pairs]
    decided = [m for m in margins if m != 0]
    return sum(m > 0 for m in decided) / max(1, len(decided))


def expected_agreement(pairs: Sequence[rec.PreferenceExample], flip_rate: float = 0.0) -> float:
    """Returns the mean agreement of Bradley-Terry labels (then flipped at `flip_rate`) on these pairs."""
    total, count = 0.0, 0
    for p in pairs:
        margin = abs(gold_reward(p.prompt, p.chosen) - gold_reward(p.prompt, p.rejected))
        if margin:
            a = 1.0 / (1.0 + math.exp(-BT_BETA * margin))
            total, count = total + a * (1 - flip_rate) + (1 - a) * flip_rate, count + 1
    return total / max(1, count)


def corpus(splits: Splits) -> list[str]:
    """Returns the texts a tokenizer for the task is trained on: every prompt and response."""
    texts = [t for ex in splits.sft for t in (ex.prompt, ex.completion)]
    texts += [t for ex in splits.preference for t in (ex.prompt, ex.chosen, ex.rejected)]
    return texts + [t for ex in splits.eval for t in (ex.prompt, ex.completion)]


def get_tokenizer(splits: Splits, cache_dir: str, vocab_size: int = 1536) -> tokenizer.Tokenizer:
    """Returns the task's sentencepiece tokenizer, trained on `corpus(splits)` and cached in `cache_dir`."""
    return tokenizer.get_or_train_tokenizer("", corpus(splits), vocab_size, cache_dir)


def write_jsonl(splits: Splits, out_dir: str) -> dict[str, str]:
    """Writes `sft.jsonl`, `preference.jsonl` (generic formats) and `eval.jsonl`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = {
        "sft": [{"prompt": ex.prompt, "completion": ex.completion} for ex in splits.sft],
        "preference": [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in splits.preference
        ],
        "eval": [{"prompt": ex.prompt, "completion": ex.completion} for ex in splits.eval],
    }
    paths = {}
    for name, items in rows.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
    return paths


def _pair(
    post: Post, rng: np.random.Generator, config: WriterConfig, flip_rate: float
) -> rec.PreferenceExample:
    prompt = post.prompt
    for _ in range(20):  # Two candidates of different quality: redraw until their gold rewards differ.
        a = write_summary(post, rng, _pick(rng, _QUALITIES), config)
        b = write_summary(post, rng, _pick(rng, _QUALITIES), config)
        ra, rb = gold_reward(prompt, a), gold_reward(prompt, b)
        if ra != rb and a != b:
            break
    a_wins = rng.random() < 1.0 / (1.0 + math.exp(-BT_BETA * (ra - rb)))  # The Bradley-Terry rater.
    flipped = bool(rng.random() < flip_rate)
    chosen, rejected, r_c, r_r = (a, b, ra, rb) if a_wins != flipped else (b, a, rb, ra)
    meta = {"gold_chosen": r_c, "gold_rejected": r_r, "flipped": flipped}
    return rec.PreferenceExample(prompt, chosen=chosen, rejected=rejected, meta=meta)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def main(argv: Sequence[str] | None = None) -> None:
    """Writes the splits and a tokenizer to `--out` and prints sizes, timings and statistics."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.data.synthetic_tldr", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_sft", type=int, default=4096)
    parser.add_argument("--num_pref", type=int, default=4096)
    parser.add_argument("--num_eval", type=int, default=128)
    parser.add_argument("--flip_rate", type=float, default=0.0)
    parser.add_argument("--vocab_size", type=int, default=1536)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    splits = generate_splits(args.seed, args.num_sft, args.num_pref, args.num_eval, args.flip_rate)
    generated = time.perf_counter()
    paths = write_jsonl(splits, args.out)
    tok = get_tokenizer(splits, args.out, args.vocab_size)
    trained = time.perf_counter()
    refs = np.array([gold_reward(ex.prompt, ex.completion) for ex in splits.sft])
    prompt_lens = np.array([len(tok.encode(ex.prompt)) + 1 for ex in splits.sft])
    summary_lens = np.array([len(tok.encode(ex.completion)) + 1 for ex in splits.sft])
    print(
        f"generated in {generated - start:.2f}s; tokenizer ({tok.vocab_size} pieces, {tok.path}) in "
        f"{trained - generated:.2f}s"
    )
    for name, path in paths.items():
        print(f"{name}: {len(getattr(splits, name))} examples -> {path}")
    print(
        f"SFT reference gold reward: mean {refs.mean():.2f}, share at the maximum {np.mean(refs == 2.0):.2f}"
    )
    print(f"preference label agreement with gold: {agreement_rate(splits.preference):.3f}")
    for name, lens in (("prompt+BOS", prompt_lens), ("summary+EOS", summary_lens)):
        p = np.percentile(lens, [5, 50, 95, 100]).astype(int)
        print(f"{name} tokens: p5 {p[0]}, p50 {p[1]}, p95 {p[2]}, max {p[3]}")


if __name__ == "__main__":
    main()
