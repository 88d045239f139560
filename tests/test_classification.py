"""Classification as generation: label sets, readers (bad records counted), the synthetic task, golden
prompts of every strategy, the label rewards (hand values), and `classify.score_labels` against a
brute-force loop over full-vocabulary log-softmaxes."""

import numpy as np
import pytest
from random_params import random_params

from rlhf_jax import classify, models, rewards
from rlhf_jax.data import classification as cls
from rlhf_jax.data import records as rec
from rlhf_jax.data import tokenizer as tokenizer_lib

LABELS = cls.LabelSet(("negative", "positive"), ("bad feeling", "good feeling"))
EX = cls.Example(text="a fine film", label=1)
DEMOS = (cls.Example(text="awful", label=0), cls.Example(text="great", label=1))


# ------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    "name, want",
    [
        ("plain", "Classify the text as one of: negative, positive.\nText: a fine film\nLabel:"),
        (
            "fewshot",
            "Classify the text as one of: negative, positive.\nText: awful\nLabel: negative\n\n"
            "Text: great\nLabel: positive\n\nText: a fine film\nLabel:",
        ),
        (
            "definitions",
            "Classify the text as one of: negative, positive.\n- negative: bad feeling\n"
            "- positive: good feeling\nText: a fine film\nLabel:",
        ),
        (
            "uncertain",
            "Classify the text as one of: negative, positive, uncertain.\nAnswer uncertain if unsure.\n"
            "Text: a fine film\nLabel:",
        ),
        ("numeric", "Classify the text as one of: 1, 2.\nText: a fine film\nLabel:"),
        (
            "reason",
            "Classify the text as one of: negative, positive.\nGive a short reason, then Answer: and the "
            "label.\nText: a fine film\nReason:",
        ),
    ],
)
def test_golden_prompts(name, want):
    assert cls.render(EX, LABELS, cls.Strategy(name, shots=2), demos=DEMOS) == want


def test_targets_and_pair_prompts():
    assert cls.target(EX, LABELS, cls.Strategy("plain")) == "positive"
    assert cls.target(EX, LABELS, cls.Strategy("numeric")) == "2"
    assert cls.target(EX, LABELS, cls.Strategy("reason")) == "Answer: positive"
    why = cls.Example(text="t", label=0, rationale="the text mentions awful")
    assert cls.target(why, LABELS, cls.Strategy("reason")) == "the text mentions awful. Answer: negative"
    pair = cls.Example(text="A man runs.", text_b="A person moves.", label=0)
    assert cls.render(pair, cls.RTE_LABELS, cls.Strategy("plain")) == (
        "Classify the text as one of: entailment, not_entailment.\nText A: A man runs.\n"
        "Text B: A person moves.\nLabel:"
    )
    with pytest.raises(ValueError, match="needs as many demos"):
        cls.render(EX, LABELS, cls.Strategy("fewshot", shots=3), demos=DEMOS)


def test_label_set_normalisation_and_aliases():
    assert LABELS.index("  Positive!") == 1 and LABELS.index("NEGATIVE.") == 0
    assert LABELS.index("2") == 1 and LABELS.index("3") is None and LABELS.index("pos") is None
    assert cls.LabelSet(("a", "b"), numeric=False).index("1") is None
    assert cls.parse_answer("blah. Answer: negative", LABELS) == 0
    assert cls.parse_answer("Uncertain", LABELS, extra=(cls.UNCERTAIN,)) == 2
    with pytest.raises(ValueError, match="distinct"):
        cls.LabelSet(("Yes", "yes!"))


# ------------------------------------------------------------------------------------------ data


def test_synthetic_task_is_seeded_noisy_and_ambiguous():
    a = cls.synthetic_splits(seed=3, num_classes=4, num_train=400, num_eval=50, noise_rate=0.2)
    b = cls.synthetic_splits(seed=3, num_classes=4, num_train=400, num_eval=50, noise_rate=0.2)
    assert a == b and len(a.train) == 400 and len(a.eval) == 50
    assert a.labels.names == ("sports", "food", "weather", "music")
    cues = {w: k for k, (_, _, ws) in enumerate(cls.SYNTHETIC_CLASSES[:4]) for w in ws}

    def majority(e):
        votes = np.bincount([cues[w] for w in e.text.split() if w in cues], minlength=4)
        return int(np.argmax(votes)), int((votes > 0).sum())

    held = [majority(e) for e in a.eval]
    assert all(m == e.label for (m, _), e in zip(held, a.eval, strict=True))  # clean held-out labels
    assert 0.1 < np.mean([n == 2 for _, n in held]) < 0.6  # ambiguous items mix two classes
    noisy = np.mean([majority(e)[0] != e.label for e in a.train])
    assert 0.1 < noisy < 0.3  # label noise in training only
    assert cls.synthetic_splits(seed=4, num_train=10, num_eval=2) != cls.synthetic_splits(
        seed=3, num_train=10, num_eval=2
    )


def test_readers_detect_glue_formats_and_count_bad_records(tmp_path, caplog):
    sst = tmp_path / "sst2.tsv"
    sst.write_text("sentence\tlabel\na fine film\t1\nawful\t0\nbroken line without label\n\t1\nok\t7\n")
    examples, labels, stats = cls.load_classification(str(sst))
    assert labels == cls.SST2_LABELS
    assert examples == [cls.Example("a fine film", 1), cls.Example("awful", 0)]
    assert stats.records == 5 and stats.kept == 2
    assert dict(stats.skipped) == {cls.COLUMN_COUNT: 1, rec.EMPTY_PROMPT: 1, cls.UNKNOWN_LABEL: 1}
    assert f"{sst}:4" in caplog.text  # the malformed line is named
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man runs.\tA person moves.\tentailment\n"
                   "1\tIt rains.\tIt is dry.\tnot_entailment\n")  # fmt: skip
    examples, labels, _ = cls.load_classification(str(rte))
    assert labels == cls.RTE_LABELS and [e.label for e in examples] == [0, 1]
    assert examples[0].text_b == "A person moves."
    mnli = tmp_path / "mnli.tsv"
    mnli.write_text("sentence1\tsentence2\tgold_label\na\tb\tcontradiction\nc\td\tneutral\n")
    examples, labels, _ = cls.load_classification(str(mnli))
    assert labels == cls.MNLI_LABELS and [e.label for e in examples] == [2, 1]
    stsb = tmp_path / "stsb.tsv"
    stsb.write_text("sentence1\tsentence2\tscore\na\tb\t3.8\nc\td\tx\n")
    examples, _, stats = cls.load_classification(str(stsb))
    assert examples[0].target == pytest.approx(3.8) and examples[0].label == 4 and stats.kept == 1
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "x", "label": "spam"}\n{"text": "y", "label": "ham"}\nnot json\n{"text": "z"}\n')
    examples, labels, stats = cls.load_classification(str(jl))
    assert labels.names == ("spam", "ham") and [e.label for e in examples] == [0, 1]
    assert dict(stats.skipped) == {rec.MALFORMED: 1, rec.MISSING_FIELD: 1}
    with pytest.raises(rec.DataError, match=r"sst2.tsv:4"):
        cls.load_classification(str(sst), strict=True)
    bad = tmp_path / "bad.tsv"
    bad.write_text("foo\tbar\n1\t2\n")
    with pytest.raises(rec.DataError, match="cannot detect"):
        cls.load_classification(str(bad))


# ------------------------------------------------------------------------------------------ rewards


def test_label_match_hand_values():
    ppo_nlu = rewards.make("label_match", labels=("negative", "positive"), wrong=-1.0, unparseable=-3.0)
    got = ppo_nlu(
        prompts=["p"] * 6,
        completions=[" Positive!", "negative", "2", "maybe", "I think so. Answer: positive", "uncertain"],
        answer=["positive", "positive", "positive", "positive", "positive", 0],
    )
    np.testing.assert_array_equal(got, [1.0, -1.0, 1.0, -3.0, 1.0, -1.0])
    default = rewards.make("label_match", labels=("negative", "positive"), numeric=False)
    got = default(prompts=["p"] * 3, completions=["positive", "2", "negative"], answer=["positive"] * 3)
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0])  # "2" is no label without aliases
    with pytest.raises(ValueError, match="gold label"):
        default(prompts=["p"], completions=["x"], answer=["neutral"])
    with pytest.raises(ValueError, match="labels"):
        rewards.make("label_match")


def test_sts_regression_hand_values():
    r = rewards.make("sts_regression", unparseable=-3.0)
    got = r(prompts=["p"] * 4, completions=["3.5", "none", "Answer: 1", "0"], answer=[4.0, 2.0, 5.0, 0.0])
    np.testing.assert_allclose(got, [2.0, -3.0, -1.5, 2.5])


# ------------------------------------------------------------------------------------------ score_labels


@pytest.fixture(scope="module")
def tiny():
    corpus = ["Classify the text as one of: yes, no, maybe so, absolutely not.", "Label: yes no"] * 20
    tok = tokenizer_lib.train_tokenizer(corpus + ["the cat sat on a mat quickly today"] * 20, vocab_size=300)
    cfg = models.preset("tiny", vocab_size=tok.vocab_size, max_len=128)
    model = models.Transformer(cfg)
    return tok, model, random_params(model, 0)


def brute_force(model, params, tok, prompt, label):
    """Σ log softmax(logits)[label token] over the label positions of one (prompt, label) row."""
    p_ids = [tok.bos_id, *tok.encode(prompt)]
    l_ids = tok.encode(label)
    tokens = np.array([p_ids + l_ids], np.int32)
    logits = np.asarray(model.apply({"params": params}, tokens), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    return sum(logp[len(p_ids) - 1 + i, t] for i, t in enumerate(l_ids)), len(l_ids)


def test_score_labels_equals_a_brute_force_loop(tiny):
    tok, model, params = tiny
    prompts = ["Classify the text as one of: yes, no. Label:", "the cat sat Label:", "a mat"]
    labels = ("yes", "maybe so", "absolutely not")
    lengths = [len(tok.encode(x)) for x in labels]
    assert max(len(tok.encode(p)) for p in prompts) < 79  # no prompt is truncated
    assert len(set(lengths)) > 1  # labels of different token lengths
    out = classify.score_labels(params, prompts, labels, model=model, tokenizer=tok, max_prompt_len=80)
    assert out.sum_NK.shape == out.mean_NK.shape == (3, 3)
    for n, p in enumerate(prompts):
        for k, lab in enumerate(labels):
            want, length = brute_force(model, params, tok, p, lab)
            np.testing.assert_allclose(out.sum_NK[n, k], want, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(out.mean_NK[n, k], want / length, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out.prediction_N, out.mean_NK.argmax(1))
    by_sum = classify.score_labels(params, prompts, labels, model=model, tokenizer=tok, max_prompt_len=80,
                                   by="sum", batch_size=4)  # fmt: skip
    np.testing.assert_allclose(by_sum.sum_NK, out.sum_NK, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(by_sum.prediction_N, out.sum_NK.argmax(1))


def test_sum_and_mean_disagree_when_a_long_label_has_likely_tokens(tiny):
    """A 1-token label against a 4-token one on a random model: the sum favours the short label (fewer
    negative terms), the mean does not, so they pick differently on some prompts; the default
    prediction is the mean's. The rows' loss masks cover exactly each label's tokens."""
    tok, model, params = tiny
    labels = ("yes", "absolutely not")
    prompts = [f"the cat sat {i} Label:" for i in range(12)]
    out = classify.score_labels(params, prompts, labels, model=model, tokenizer=tok, max_prompt_len=80)
    by_sum = out.sum_NK.argmax(1)
    by_mean = out.mean_NK.argmax(1)
    assert (by_sum != by_mean).any(), (out.sum_NK, out.mean_NK)
    np.testing.assert_array_equal(out.prediction_N, by_mean)
    rows = classify.label_rows(
        {"prompt_tokens": np.array([[1, 5, 0]]), "prompt_lengths": np.array([2])}, [[7], [8, 9, 10]], pad_id=0
    )
    assert rows["loss_mask"].sum(1).tolist() == [1.0, 3.0]
