"""The synthetic TL;DR task: deterministic posts, the gold reward's ordering, label agreement, sizes."""

import re

import numpy as np
import pytest

from rlhf_jax import data
from rlhf_jax.data import synthetic_lexicon as lex
from rlhf_jax.data import synthetic_tldr as st

PROMPT = (
    "SUBREDDIT: r/jobs\nTITLE: Need advice: my boss cut my hours\nPOST: I have known my boss for two years. "
    "Some background first. Last week my boss cut my hours. Should I ask for a raise?\nTL;DR:"
)


@pytest.fixture(scope="module")
def splits():
    return st.generate_splits(seed=0, num_sft=400, num_pref=2000, num_eval=64)


def test_deterministic_and_sized(splits):
    small = st.generate_splits(seed=0, num_sft=400, num_pref=20, num_eval=8)
    assert small.sft == splits.sft  # The SFT stream does not depend on the other sizes.
    assert st.generate_splits(seed=0, num_sft=5, num_pref=5, num_eval=5) == st.generate_splits(
        seed=0, num_sft=5, num_pref=5, num_eval=5
    )
    assert st.generate_splits(seed=1, num_sft=5, num_pref=0, num_eval=0).sft != small.sft[:5]
    assert (len(splits.sft), len(splits.preference), len(splits.eval)) == (400, 2000, 64)
    train_prompts = {e.prompt for e in splits.sft} | {p.prompt for p in splits.preference}
    assert not train_prompts & {e.prompt for e in splits.eval}


def test_posts_are_canonical_varied_and_carry_their_facts():
    rng = np.random.default_rng(0)
    posts = [st.make_post(rng) for _ in range(500)]
    assert len({p.subreddit for p in posts}) >= 20
    assert len({p.body for p in posts}) == 500
    for post in posts:
        assert re.fullmatch(r"SUBREDDIT: r/\w+\nTITLE: [^\n]+\nPOST: [^\n]+\nTL;DR:", post.prompt)
        assert st.find_post_facts(post.prompt) == {st._normalize(v) for v in post.facts.values()}


def test_lexicon_entries_do_not_overlap_or_leak():
    entries = list(st.ENTRIES)
    for a in entries:
        for b in entries:
            assert a == b or f" {a} " not in f" {b} ", (a, b)
    free_text = lex.DISTRACTORS + lex.VAGUE_WHO + lex.VAGUE_EVENT + lex.NO_ASK + lex.FILLER
    templates = lex.INTRO + lex.EVENT + lex.ASK + lex.TITLE + lex.ASK_SUMMARY
    for text in free_text + tuple(re.sub(r"\{\w+\}", " ", t) for t in templates):
        assert not st.find_facts(text), text
    assert len({s for d in lex.DOMAINS.values() for s in d["subreddits"]} | set(lex.GENERAL_SUBREDDITS)) >= 20


def test_gold_reward_orders_summaries():
    reference = " my boss of two years cut my hours. should I ask for a raise?"
    dropped = " my boss cut my hours. should I ask for a raise?"
    hallucinated = (
        " my boss of two years cut my hours and my coworker took credit for my work. should I ask for a raise"
    )
    wrong_fact = " my boss of six months cut my hours. should I ask for a raise?"
    repeated = (
        " my boss of two years cut my hours. my boss of two years cut my hours. should I ask for a raise?"
    )
    rambling = (
        reference
        + " and honestly I keep thinking about it all day and everyone I ask says something different"
    )
    rewards = {
        name: st.gold_reward(PROMPT, text)
        for name, text in [
            ("reference", reference),
            ("dropped", dropped),
            ("hallucinated", hallucinated),
            ("wrong_fact", wrong_fact),
            ("repeated", repeated),
            ("rambling", rambling),
        ]
    }
    assert rewards["reference"] == 2.0
    assert rewards["dropped"] == 1.0  # One of four facts missing.
    assert rewards["hallucinated"] == pytest.approx(-0.2)  # Two invented facts, 22 words.
    assert rewards["wrong_fact"] == 0.0  # Missing the true duration and inventing another.
    assert rewards["repeated"] == pytest.approx(2.0 - 0.25 * 7 - 0.1 * 2)  # 7 repeated bigrams, 22 words.
    assert rewards["rambling"] == pytest.approx(2.0 - 0.25 - 0.1 * 10)  # "i ask" twice, 30 words.
    assert rewards["reference"] > max(v for k, v in rewards.items() if k != "reference")
    terms = st.gold_reward_terms(PROMPT, hallucinated)
    assert (terms.num_facts, terms.covered, terms.hallucinated, terms.words) == (4, 4, 2, 22)


def test_gold_reward_on_any_text():
    assert st.gold_reward(PROMPT, "") == -2.0
    assert st.gold_reward(PROMPT, " the the the the the the the the the the") == pytest.approx(-2.0 - 2.0)
    assert st.gold_reward("no facts here", " nor here") == 0.0
    assert st.gold_reward(PROMPT, " MY BOSS, of TWO years; cut my hours!! Should I ask for a raise") == 2.0


def test_references_are_good_but_improvable(splits):
    rewards = np.array([st.gold_reward(e.prompt, e.completion) for e in splits.sft])
    assert 0.8 < rewards.mean() < 1.4
    assert 0.3 < np.mean(rewards == 2.0) < 0.6  # Many at the maximum, many not.
    assert np.mean(rewards <= 0.0) > 0.1
    assert all(e.completion.startswith(" ") and e.prompt.endswith("TL;DR:") for e in splits.sft)


def test_labels_agree_with_gold_at_the_configured_rate(splits):
    rate = st.agreement_rate(splits.preference)
    expected = st.expected_agreement(splits.preference)
    assert 0.69 < expected < 0.76
    assert abs(rate - expected) < 0.035  # ~3.5 standard errors at 2000 pairs.
    for p in splits.preference[:200]:
        assert p.meta["gold_chosen"] == st.gold_reward(p.prompt, p.chosen) and not p.meta["flipped"]
    flipped = st.generate_splits(seed=0, num_sft=0, num_pref=1000, num_eval=0, flip_rate=0.25).preference
    a = st.expected_agreement(flipped)
    with_flips = st.expected_agreement(flipped, flip_rate=0.25)
    assert with_flips == pytest.approx(a * 0.75 + (1 - a) * 0.25)
    assert abs(st.agreement_rate(flipped) - with_flips) < 0.05  # ~3.5 standard errors at 1000 pairs.
    assert 0.2 < np.mean([p.meta["flipped"] for p in flipped]) < 0.3


def test_files_and_tokenizer_go_through_the_one_pipeline(splits, tmp_path):
    small = st.Splits(splits.sft[:50], splits.preference[:50], splits.eval[:10])
    paths = st.write_jsonl(small, str(tmp_path))
    pairs, _ = data.load_preference(paths["preference"])
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (p.prompt, p.chosen, p.rejected) for p in small.preference
    ]
    sft, _ = data.load_sft(paths["sft"])
    assert sft == small.sft
    tok = st.get_tokenizer(splits, str(tmp_path), vocab_size=1536)
    assert st.get_tokenizer(splits, str(tmp_path), vocab_size=1536).path == tok.path  # Cached.
    prompt_lens = [len(tok.encode(e.prompt)) for e in splits.sft]
    summary_lens = [len(tok.encode(e.completion)) for e in splits.sft]
    assert 50 <= np.median(prompt_lens) <= 90 and max(prompt_lens) < 128
    assert 8 <= np.median(summary_lens) <= 20
