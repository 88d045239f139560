"""The sentencepiece wrapper: special ids, exact round trips, deterministic cached training, the CLI."""

import json
import os

import pytest

from rlhf_jax.data import tokenizer

CORPUS = [
    f"SUBREDDIT: r/{s}\nTITLE: My {w} {e}\nPOST: I have known my {w} for {n} years. Should I go?\nTL;DR:"
    for s in ("cats", "jobs", "relationships")
    for w in ("boss", "cat", "girlfriend", "roommate")
    for e in ("ate my food", "read my texts", "ignored me")
    for n in ("two", "three")
] + [" my boss ate my food. should I quit?", "\n\nHuman: hi there\n\nAssistant: hello, how can I help?"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "t.model")
    return tokenizer.train_tokenizer(CORPUS, vocab_size=400, model_path=path)


def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 300 < tok.vocab_size <= 400
    assert tok.encode("my boss", add_bos=True, add_eos=True)[0] == tok.bos_id
    assert tok.encode("my boss", add_bos=True, add_eos=True)[-1] == tok.eos_id
    assert tok.decode([tok.bos_id, *tok.encode("my boss"), tok.eos_id, tok.pad_id, tok.pad_id]) == "my boss"


@pytest.mark.parametrize(
    "text",
    [
        CORPUS[0],
        " my boss ate my food.",
        "two  spaces,\ttab and\n\nnewlines \n",
        "unseen: Zürich, 東京, emoji 😀, <|endoftext|>",
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_separate_encoding_keeps_the_boundary(tok):
    prompt, response = "TITLE: x\nTL;DR:", " my boss ate my food."
    ids = tok.encode(prompt) + tok.encode(response)
    assert tok.decode(ids) == prompt + response
    assert tok.pieces(response)[0].startswith("\u2581")  # The response's space opens its first piece.
    assert tok.encode_batch([prompt, response]) == [tok.encode(prompt), tok.encode(response)]


def test_load_matches_trained(tok):
    loaded = tokenizer.Tokenizer.load(tok.path)
    assert loaded.encode(CORPUS[5]) == tok.encode(CORPUS[5])
    assert loaded.vocab_size == tok.vocab_size


def test_training_is_deterministic_and_cached(tmp_path):
    a = tokenizer.train_tokenizer(CORPUS, vocab_size=350)
    b = tokenizer.train_tokenizer(CORPUS, vocab_size=350)
    assert a.model_proto == b.model_proto
    first = tokenizer.get_or_train_tokenizer("", CORPUS, 350, str(tmp_path))
    assert os.path.dirname(first.path) == str(tmp_path) and first.model_proto == a.model_proto
    mtime = os.path.getmtime(first.path)
    again = tokenizer.get_or_train_tokenizer("", CORPUS, 350, str(tmp_path))
    assert again.path == first.path and os.path.getmtime(again.path) == mtime
    other = tokenizer.get_or_train_tokenizer("", CORPUS[:-1], 350, str(tmp_path))
    assert other.path != first.path  # A different corpus trains (and caches) a different model.
    explicit = tokenizer.get_or_train_tokenizer(first.path, [], 99, "/nonexistent")
    assert explicit.model_proto == first.model_proto


def test_cli_train_and_encode(tmp_path, capsys):
    records = tmp_path / "pairs.jsonl"
    records.write_text(
        "".join(json.dumps({"prompt": t, "chosen": " yes", "rejected": " no"}) + "\n" for t in CORPUS)
    )
    (tmp_path / "extra.txt").write_text("one line of plain text\nanother line\n")
    out = str(tmp_path / "cli.model")
    tokenizer.main(
        ["train", "--input", f"{records},{tmp_path / 'extra.txt'}", "--output", out, "--vocab_size", "380"]
    )
    assert "trained" in capsys.readouterr().out
    tokenizer.main(["encode", "--model", out, "my boss"])
    assert "[" in capsys.readouterr().out  # The pieces, then the ids.


def test_empty_corpus_raises():
    with pytest.raises(ValueError, match="empty corpus"):
        tokenizer.train_tokenizer(["", ""], vocab_size=300)
