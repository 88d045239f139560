"""The pairwise ranking model's own layout: no input loses its tail, lengths add up, cuts are counted,
and training and scoring build the same ids from the layout saved with the model."""

import logging

import jax
import numpy as np
import pytest

from rlhf_jax import models, scoring
from rlhf_jax.data import pipeline, tokenizer
from rlhf_jax.data import records as rec
from rlhf_jax.pipelines import candidates, reward, tasks
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.config import DataConfig

WORDS = "my cat ate the food and slept on a warm mat while the dog barked at birds".split()


@pytest.fixture(scope="module")
def tok():
    texts = [
        " ".join(WORDS[i % 7 : i % 7 + 8]) + " Response A: B: Which response is better?" for i in range(60)
    ]
    return tokenizer.train_tokenizer(texts, vocab_size=300)


def text_of(n_words: int, start: int = 0) -> str:
    return " " + " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n_words))


def template_ids(tok) -> list[list[int]]:
    return [tok.encode(piece) for piece in pipeline.RANKING_TEMPLATE]


def varied_rows(seed: int, rows: int):
    """Prompts and responses from empty to far longer than the whole layout."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice([0, 1, 3, 8, 15, 40, 200], size=(rows, 3))
    prompts = [text_of(int(n), i).strip() for i, n in enumerate(lengths[:, 0])]
    a = [text_of(int(n), 2 * i) for i, n in enumerate(lengths[:, 1])]
    b = [text_of(int(n), 3 * i + 1) for i, n in enumerate(lengths[:, 2])]
    return prompts, a, b


def test_no_ranking_input_loses_its_tail(tok):
    """Every row ends with the question + EOS and fits the layout, whatever the prompt and response
    lengths (the old rows, tokenised at data.max_len, lost response B, the question and the EOS)."""
    layout = pipeline.RankingLayout.for_tokenizer(tok, max_prompt_len=12, max_response_len=10)
    prompts, a, b = varied_rows(0, 200)
    stats = rec.LoadStats()
    batch = scoring.ranking_batch(tok, prompts, a, b, layout, stats)
    assert stats.truncated["prompt"] > 0 and stats.truncated["ranking_response"] > 0  # overlong rows
    tail = [*template_ids(tok)[2], tok.eos_id]
    ends = batch["prompt_lengths"] + batch["lengths"]
    assert batch["tokens"].shape == (200, layout.max_len) and ends.max() <= layout.max_len
    for row, end in zip(batch["tokens"], ends, strict=True):
        assert row[end - len(tail) : end].tolist() == tail
        assert (row[end:] == tok.pad_id).all()
    assert batch["segment_ids"].sum(1).tolist() == ends.tolist()  # the head reads position end - 1: EOS


def test_tldr_ranking_inputs_keep_their_tail(tmp_path):
    """On the synthetic TL;DR task (prompt + both summaries + template: median ~141 tokens against
    data.max_len = 128), the reward stage's layout for 40-token samples keeps every row's question and
    EOS, and cuts a response in under 5% of the rows."""
    data = DataConfig(num_sft=256, num_pref=600)
    task = tasks.load_task(data, 0)
    tok = tasks.tokenizer_for(data, task, str(tmp_path), "")
    layout = reward.ranking_layout(data, tok, 40)
    stats = rec.LoadStats()
    rows, _ = reward.ranking_data(task.preference, tok, layout, seed=0, stats=stats)
    tail = [*template_ids(tok)[2], tok.eos_id]
    lengths = [rows.row_lengths(i) for i in range(len(rows))]
    assert np.median(lengths) > data.max_len and max(lengths) <= layout.max_len
    assert all(ids[-len(tail) :].tolist() == tail for ids in rows.completion_ids)
    share = pipeline.ranking_truncated_fraction(stats, len(rows), "TL;DR")
    assert share < 0.05


def test_row_is_the_parts_in_order_and_lengths_add_up(tok):
    """Hand-built ids: BOS + prompt (its last max_prompt_len - 1 tokens) + template pieces around A and
    B, each cut to (max_len - 1 - template - prompt) // 2, + EOS; max_len is the sum of the parts."""
    before, middle, question = template_ids(tok)
    layout = pipeline.RankingLayout.for_tokenizer(tok, max_prompt_len=12, max_response_len=10)
    assert layout.template_len == len(before) + len(middle) + len(question) > 0
    assert layout.max_len == 12 + 2 * 10 + layout.template_len + 1
    prompts = ["my cat", text_of(30).strip(), "the dog"]
    a = [text_of(2), text_of(4), text_of(60)]
    b = [text_of(3), text_of(50), text_of(1)]
    data = pipeline.tokenize_ranking(prompts, a, b, tok, layout)
    for i in range(3):
        p_ids = tok.encode(prompts[i])[-(12 - 1) :]
        budget = (layout.max_len - 1 - layout.template_len - (len(p_ids) + 1)) // 2
        assert budget >= 10
        want = [tok.bos_id, *p_ids, *before, *tok.encode(a[i])[:budget], *middle,
                *tok.encode(b[i])[:budget], *question, tok.eos_id]  # fmt: skip
        got = [*data.prompt_ids[i], *data.completion_ids[i]]
        assert got == want, i
        assert len(got) <= layout.max_len
    # Short prompt and responses: the row is the uncut text.
    assert tok.decode(np.concatenate([data.prompt_ids[0], data.completion_ids[0]])) == "my cat" + (
        reward.format_pair(a[0], b[0])
    )
    # A full prompt leaves each response exactly max_response_len: an overlong row fills max_len.
    long = pipeline.tokenize_ranking([text_of(30)], [text_of(50)], [text_of(60, 3)], tok, layout)
    assert len(long.prompt_ids[0]) == 12 and long.row_lengths(0) == layout.max_len


def test_a_response_cut_is_counted_and_warned(tok, caplog):
    layout = pipeline.RankingLayout.for_tokenizer(tok, max_prompt_len=12, max_response_len=10)
    prompts, a, b = varied_rows(1, 300)
    stats = rec.LoadStats()
    data = pipeline.tokenize_ranking(prompts, a, b, tok, layout, stats)
    budgets = [layout.response_budget(len(p)) for p in data.prompt_ids]
    want = sum(
        len(tok.encode(x)) > n or len(tok.encode(y)) > n for x, y, n in zip(a, b, budgets, strict=True)
    )
    assert 0 < want < 300 and stats.truncated["ranking_response"] == want
    with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
        share = pipeline.ranking_truncated_fraction(stats, 300, "test rows")
    assert share == want / 300 > 0.05 and "test rows" in caplog.text
    caplog.clear()
    few = rec.LoadStats()
    few.truncated["ranking_response"] = 5
    with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
        assert pipeline.ranking_truncated_fraction(few, 100, "few rows") == 0.05
    assert "few rows" not in caplog.text  # 5% is the limit, not above it
    # Nothing cut: nothing counted.
    clean = rec.LoadStats()
    pipeline.tokenize_ranking(["my cat"], [text_of(3)], [text_of(2)], tok, layout, clean)
    assert "ranking_response" not in clean.truncated


def test_the_stage_layout_has_room_for_human_and_sampled_responses(tok):
    data = DataConfig(max_len=128, max_prompt_len=100)
    human = reward.ranking_layout(data, tok)
    assert (human.max_prompt_len, human.max_response_len) == (100, 28)
    sampled = reward.ranking_layout(data, tok, 40)
    assert sampled.max_response_len == 40 and sampled.max_len == 100 + 80 + human.template_len + 1


@pytest.fixture(scope="module")
def saved_proxy(tok, tmp_path_factory):
    """A ranking model and its layout saved as the reward stage saves them, loaded as scoring loads them."""
    workdir = tmp_path_factory.mktemp("rm")
    layout = pipeline.RankingLayout.for_tokenizer(tok, max_prompt_len=12, max_response_len=6)
    rm = models.RewardModel(models.preset("tiny", vocab_size=tok.vocab_size))
    workdir_io.save_params(workdir, models.init_params(rm, jax.random.key(0)), rm.config, "pairwise")
    reward.save_ranking_layout(workdir, layout)
    # The policy's layout given here is what scoring used before; a ranking model ignores it.
    return layout, reward.load_proxy(workdir, None, pipeline.SequenceLayout(max_len=16, max_prompt_len=8))


def test_training_and_scoring_build_the_same_ids(tok, saved_proxy):
    """The reward stage's rows (`reward.ranking_data`) equal the scorer's (`scoring.ranking_batch`) for
    the same pairs, with the layout read back from the model's workdir by `reward.load_proxy`."""
    layout, proxy = saved_proxy
    assert proxy.kind == "pairwise" and proxy.layout == layout
    prompts, a, b = varied_rows(2, 40)
    pairs = [rec.PreferenceExample(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
    train, labels = reward.ranking_data(pairs, tok, layout, seed=3)
    assert 0 < labels.sum() < len(labels)  # both A/B orders occur
    first = [x if f else y for x, y, f in zip(a, b, labels, strict=True)]
    second = [y if f else x for x, y, f in zip(a, b, labels, strict=True)]
    scored = scoring.ranking_batch(tok, prompts, first, second, proxy.layout)
    trained = train.batch(np.arange(len(train)), layout.max_len)
    for key in ("tokens", "segment_ids"):
        np.testing.assert_array_equal(scored[key], trained[key], err_msg=key)


def test_layout_from_another_tokenizer_is_refused(tok, tmp_path):
    other = pipeline.RankingLayout(max_prompt_len=12, max_response_len=10, template_len=3)
    with pytest.raises(ValueError, match="another tokenizer"):
        pipeline.tokenize_ranking(["x"], ["a"], ["b"], tok, other)
    with pytest.raises(ValueError, match="max_response_len"):
        pipeline.RankingLayout(max_prompt_len=12, max_response_len=0, template_len=3)
    with pytest.raises(FileNotFoundError, match="ranking_layout.json"):
        reward.load_ranking_layout(str(tmp_path))


def test_swapping_a_and_b_flips_the_averaged_logit(tok, saved_proxy):
    """`pairwise_logits` averages both orders: logit(a ≻ b) = -logit(b ≻ a), the mean of the model's two
    one-order scores (not either alone)."""
    layout, proxy = saved_proxy
    prompts, a, b = varied_rows(4, 6)
    ab = candidates.pairwise_logits(proxy, tok, prompts, a, b, batch_size=8)
    ba = candidates.pairwise_logits(proxy, tok, prompts, b, a, batch_size=8)
    np.testing.assert_allclose(ab, -ba, atol=1e-6)
    kw = dict(layout=layout, batch_size=8)
    one_order = scoring.score_pairwise(proxy.model, proxy.params, tok, prompts, a, b, **kw)
    other = scoring.score_pairwise(proxy.model, proxy.params, tok, prompts, b, a, **kw)
    np.testing.assert_allclose(ab, 0.5 * (one_order - other), atol=1e-6)
    assert not np.allclose(ab, one_order, atol=1e-4)
