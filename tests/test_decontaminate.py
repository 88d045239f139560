"""Decontamination: Light-R1's digit-insensitive exact match and word n-gram overlap, on hand-built files."""

import json

import pytest

from rlhf_jax.data import decontaminate as dc
from rlhf_jax.data.records import DataError

LONG = " ".join(f"w{k}" for k in range(40))  # 40 distinct words, so 32-grams exist.


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_digitless_and_ngrams():
    assert dc.digitless("Tom has 3  apples\nand 12 pears.") == "tom has apples and pears."
    assert dc.ngrams("a b c", 2) == {("a", "b"), ("b", "c")}
    assert dc.ngrams("a b", 3) == set()


def test_find_overlaps_rules():
    evals = ["Tom has 3 apples. How many?", "unrelated " + LONG]
    train = [
        "tom has 17 apples.  How many?",  # numbers changed: exact_digitless
        "prefix words " + " ".join(LONG.split()[3:36]),  # shares a 32-gram (w3..w34) with evals[1]
        "prefix words " + " ".join(LONG.split()[3:34]),  # only 31 shared words: clean
        "Tom has 3 pears. How many?",  # a word differs: clean
    ]
    found = dc.find_overlaps(train, evals, n=32)
    assert [(i, j, r) for i, j, r, _ in found] == [(0, 0, "exact_digitless"), (1, 1, "ngram")]
    assert len(found[1][3].split()) == 32


def test_command_writes_clean_file_and_report(tmp_path):
    train = _write(
        tmp_path / "train.jsonl",
        [
            {"question": "Ann buys 4 pens at $2 each. Cost?", "answer": "4*2=8\n#### 8"},
            {"question": "Bob runs 5 km a day. In a week?", "answer": "5*7=35\n#### 35"},
        ],
    )
    test = _write(
        tmp_path / "test.jsonl", [{"question": "Ann buys 9 pens at $3 each. Cost?", "answer": "#### 27"}]
    )
    out, report = str(tmp_path / "clean.jsonl"), str(tmp_path / "report.json")
    dc.main(["--train", train, "--eval", test, "--out", out, "--report", report])
    kept = [json.loads(line) for line in open(out)]
    assert [r["question"] for r in kept] == ["Bob runs 5 km a day. In a week?"]
    rep = json.load(open(report))
    assert (rep["dropped"], rep["kept"], rep["by_rule"]["exact_digitless"]) == (1, 1, 1)
    assert rep["examples"][0]["train_line"] == 1 and rep["examples"][0]["eval_line"] == 1


@pytest.mark.parametrize(
    "line, needle",
    [
        ("not json\n", "train.jsonl:2"),
        ('["a list"]\n', "train.jsonl:2"),
        ('{"answer": "#### 1"}\n', "no question"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, line, needle):
    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps({"question": "ok?", "answer": "#### 1"}) + "\n" + line)
    test = _write(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(DataError, match=needle) as e:
        dc.decontaminate(str(p), [test], str(tmp_path / "o.jsonl"))
    assert "train.jsonl:2" in str(e.value)
