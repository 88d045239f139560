"""Record formats and loaders: every format from every container, the real quirks, bad input, strict mode."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax import data
from rlhf_jax.data import formats, loading

TLDR_PROMPT = "SUBREDDIT: r/cats\nTITLE: My cat ran away\nPOST: She left two days ago.\nTL;DR:"


def write(path, rows, container="jsonl"):
    """Writes `rows` to `path` as JSONL, gzipped JSONL, a JSON array or Parquet; returns the path."""
    path = str(path)
    if container == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif container == "gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif container == "array":
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CONTAINERS = {"jsonl": "x.jsonl", "gz": "x.jsonl.gz", "array": "x.json", "parquet": "x.parquet"}


@pytest.mark.parametrize("container", CONTAINERS)
def test_generic_preference_from_every_container(tmp_path, container):
    rows = [
        {"prompt": "Q: 2+2?\nA:", "chosen": "4", "rejected": "5"},
        {"prompt": "Say hi. ", "chosen": " hi", "rejected": "bye"},
    ]
    path = write(tmp_path / CONTAINERS[container], rows, container)
    examples, stats = data.load_preference(path)
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        ("Q: 2+2?\nA:", " 4", " 5"),
        ("Say hi.", " hi", " bye"),  # Trailing prompt spaces move to the response, one space kept.
    ]
    assert (stats.records, stats.kept, stats.files[0].format) == (2, 2, "preference")


@pytest.mark.parametrize("container", CONTAINERS)
def test_openai_comparisons_from_every_container(tmp_path, container):
    rows = [
        {
            "info": {"id": "t3_a", "post": " My cat left. ", "title": "Cat gone", "subreddit": "cats"},
            "split": "train",
            "summaries": [
                {"text": " cat left", "policy": "ref", "note": None},
                {"text": " my cat ran", "note": "x"},
            ],
            "choice": 1,
            "worker": "w",
            "extra": {"confidence": 7},
        },
        {  # Raw batches: `r/` prefix, no id; HF fills missing fields with null.
            "info": {"id": None, "post": "p", "title": "t", "subreddit": "r/dogs"},
            "split": "valid2",
            "summaries": [
                {"text": " a<|endoftext|>junk", "policy": "p", "note": None},
                {"text": "b", "note": None},
            ],
            "choice": 0,
            "worker": "w",
            "extra": {"confidence": None},
        },
    ]
    path = write(tmp_path / CONTAINERS[container], rows, container)
    examples, stats = data.load_preference(path)
    assert stats.files[0].format == "openai_comparisons"
    first, second = examples
    assert first.prompt == "SUBREDDIT: r/cats\nTITLE: Cat gone\nPOST: My cat left.\nTL;DR:"
    assert (first.chosen, first.rejected, first.meta) == (" my cat ran", " cat left", {"confidence": 7})
    assert second.prompt.startswith("SUBREDDIT: r/dogs\n")
    assert (second.chosen, second.rejected, second.meta) == (" a", " b", {})


def test_openai_comparisons_bad_records_are_counted(tmp_path):
    good = {
        "info": {"post": "p", "title": "t", "subreddit": "s"},
        "summaries": [{"text": "a"}, {"text": "b"}],
    }
    rows = [
        {**good, "choice": 0},
        {**good, "choice": 2},  # wrong_type
        {**good, "choice": None},  # missing_field
        {
            "info": {"article": "cnn", "title": "t", "site": "cnn"},
            "summaries": good["summaries"],
            "choice": 0,
        },
        {**good, "summaries": [{"text": "a"}], "choice": 0},  # wrong_type: one summary
        {
            **good,
            "summaries": [{"text": "same"}, {"text": " same "}],
            "choice": 0,
        },  # identical after cleaning
    ]
    examples, stats = data.load_preference(write(tmp_path / "c.json", rows))
    assert len(examples) == 1
    assert stats.skipped == {"wrong_type": 2, "missing_field": 2, "identical_responses": 1}
    strict_path = write(tmp_path / "s.json", [rows[0], rows[3]])
    with pytest.raises(data.DataError, match=r"s\.json:2: field 'info\.post': missing_field"):
        data.load_preference(strict_path, strict=True, format="openai_comparisons")


def test_hh_split_quirks(tmp_path):
    p = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell me a joke."
    rows = [
        {"chosen": p + "\n\nAssistant: Sure.\n\nAssistant: Why did...", "rejected": p + "\n\nAssistant: No."},
        {"chosen": p + "\n\nAssistant: Same", "rejected": p + "\n\nAssistant: Same"},
        {"chosen": p + "\n\nAssistant:", "rejected": p + "\n\nAssistant: Something"},
        {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"},
        {"chosen": p + "\n\nAssistant: Human: is in here", "rejected": p + "\n\nAssistant: Ok"},
    ]
    examples, stats = data.load_preference(write(tmp_path / "hh.jsonl.gz", rows, "gz"))
    assert stats.files[0].format == "hh"
    assert stats.skipped == {"identical_responses": 1, "empty_response": 1, "split_failed": 1}
    joke, human = examples
    # The response containing "\n\nAssistant:" is not split at its inner marker.
    assert joke.prompt == p + "\n\nAssistant:"
    assert (joke.chosen, joke.rejected) == (" Sure.\n\nAssistant: Why did...", " No.")
    assert human.chosen == " Human: is in here"


def test_hh_common_prefix_inside_response(tmp_path):
    # Both responses start alike; the split still ends at the last shared Assistant turn.
    rows = [
        {
            "chosen": "\n\nHuman: q\n\nAssistant: I think yes",
            "rejected": "\n\nHuman: q\n\nAssistant: I think no",
        }
    ]
    (example,), _ = data.load_preference(write(tmp_path / "hh.jsonl", rows))
    assert (example.prompt, example.chosen, example.rejected) == (
        "\n\nHuman: q\n\nAssistant:",
        " I think yes",
        " I think no",
    )


def test_chat_messages(tmp_path):
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "Go away"}]
    (example,), _ = data.load_preference(write(tmp_path / "m.jsonl", rows))
    assert example.prompt == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:"
    assert (example.chosen, example.rejected) == (" Hello", " Go away")
    # TRL's implicit-prompt form: two full conversations, split like HH.
    convo = [{"role": "user", "content": "Hi"}]
    rows = [
        {
            "chosen": convo + [{"role": "assistant", "content": "Hello"}],
            "rejected": convo + [{"role": "assistant"}],
        },
        {
            "chosen": convo + [{"role": "assistant", "content": "Hey"}],
            "rejected": convo + [{"role": "assistant", "content": "Yo"}],
        },
    ]
    examples, stats = data.load_preference(write(tmp_path / "c.parquet", rows, "parquet"))
    assert stats.skipped == {"wrong_type": 1}
    assert (examples[0].prompt, examples[0].chosen) == ("\n\nHuman: Hi\n\nAssistant:", " Hey")
    sft_rows = [{"prompt": convo, "completion": [{"role": "assistant", "content": "Hello"}]}]
    (sft,), _ = data.load_sft(write(tmp_path / "s.jsonl", sft_rows))
    assert (sft.prompt, sft.completion) == ("\n\nHuman: Hi\n\nAssistant:", " Hello")


def test_tldr_variants_render_one_canonical_prompt(tmp_path):
    carper_prompt = "SUBREDDIT: r/cats\nTITLE: My cat ran away\nPOST: She left two days ago."
    trl_prompt = "SUBREDDIT: r/cats\n\nTITLE: My cat ran away\n\nPOST: She left two days ago.\n\nTL;DR:"
    files = {
        "openai_sft.jsonl": [
            {
                "id": "1",
                "subreddit": "cats",
                "title": "My cat ran away",
                "post": "She left two days ago.",
                "summary": "  gone<|endoftext|>",
            }
        ],
        "carper_sft.jsonl": [{"prompt": carper_prompt + "\nTL;DR: ", "label": "gone"}],
        "carper_cmp.jsonl": [
            {
                "prompt": carper_prompt,
                "chosen": "TL;DR:  gone",
                "rejected": "TL;DR: lost<|endoftext|>Citizens",
            }
        ],
        "trl_pref.jsonl": [{"prompt": trl_prompt, "chosen": " gone", "rejected": " lost"}],
    }
    paths = {name: write(tmp_path / name, rows) for name, rows in files.items()}
    sft, stats = data.load_sft([paths["openai_sft.jsonl"], paths["carper_sft.jsonl"]])
    assert [f.format for f in stats.files] == ["tldr_sft", "tldr_carper_sft"]
    assert [(e.prompt, e.completion) for e in sft] == [(TLDR_PROMPT, " gone")] * 2
    pref, stats = data.load_preference(f"{paths['carper_cmp.jsonl']},{paths['trl_pref.jsonl']}")
    assert [f.format for f in stats.files] == ["tldr_carper_comparisons", "tldr_trl_preference"]
    assert [(e.prompt, e.chosen, e.rejected) for e in pref] == [(TLDR_PROMPT, " gone", " lost")] * 2


def test_unparsed_tldr_prompt_and_empty_summary(tmp_path):
    rows = [
        {"prompt": "SUBREDDIT: r/x\n\nTITLE: t\n\nno post here", "chosen": " a", "rejected": " b"},
        {"prompt": TLDR_PROMPT, "chosen": " a", "rejected": "<|endoftext|>"},
    ]
    _, stats = data.load_preference(write(tmp_path / "t.jsonl", rows))
    assert stats.skipped == {"unparsed_prompt": 1, "empty_response": 1}


def test_bad_lines_counted_and_strict_names_file_line_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    lines = [
        good,
        "{not json",
        "",  # Blank lines are not records.
        "[1, 2]",
        json.dumps({"prompt": "p", "chosen": "a"}),
        json.dumps({"prompt": "p", "chosen": "a", "rejected": 3}),
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "  "}),
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}),
        json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    examples, stats = data.load_preference(str(path))
    assert len(examples) == 1
    assert stats.skipped == {
        "malformed_line": 2,
        "missing_field": 1,
        "wrong_type": 1,
        "empty_response": 1,
        "identical_responses": 1,
        "empty_prompt": 1,
    }
    assert stats.records == stats.kept + sum(stats.skipped.values()) == 8
    assert "malformed_line=2" in stats.summary()
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: malformed_line: invalid JSON") as e:
        data.load_preference(str(path), strict=True)
    assert e.value.line == 2 and isinstance(e.value, ValueError)
    path.write_text("\n".join([good, lines[4]]) + "\n")
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: field 'rejected': missing_field"):
        data.load_preference(str(path), strict=True)


def test_paths_globs_lists_and_kind_checks(tmp_path):
    for i in range(3):
        write(tmp_path / f"p{i}.jsonl", [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"}])
    examples, stats = data.load_preference(str(tmp_path / "p*.jsonl"))
    assert [e.prompt for e in examples] == ["q0", "q1", "q2"] and len(stats.files) == 3
    examples, _ = data.load_preference([tmp_path / "p2.jsonl", str(tmp_path / "p0.jsonl")])
    assert [e.prompt for e in examples] == ["q2", "q0"]
    with pytest.raises(FileNotFoundError):
        data.load_preference(str(tmp_path / "none*.jsonl"))
    with pytest.raises(data.DataError, match="holds preference examples"):
        data.load_sft(str(tmp_path / "p0.jsonl"))
    with pytest.raises(ValueError, match="not sft"):
        data.load_sft(str(tmp_path / "p0.jsonl"), format="hh")
    write(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(data.DataError, match="cannot detect the format"):
        data.load_preference(str(tmp_path / "odd.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    examples, stats = data.load_preference(str(tmp_path / "empty.jsonl"))
    assert examples == [] and stats.records == 0
    # An explicit format overrides detection: generic prompt/chosen/rejected read as HH dialogues.
    write(
        tmp_path / "hh.jsonl",
        [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"}],
    )
    (example,), _ = data.load_preference(str(tmp_path / "hh.jsonl"), format="hh")
    assert example.chosen == " x"


def test_detect_format_table():
    assert formats.detect_format({"prompt": "p", "completion": "c"}) == "sft"
    assert formats.detect_format({"chosen": "c", "rejected": "r"}) == "hh"
    assert formats.detect_format({"prompt": "SUBREDDIT: r/a", "chosen": "TL;DR: x", "rejected": "y"}) == (
        "tldr_carper_comparisons"
    )
    assert formats.detect_format({"prompt": TLDR_PROMPT, "chosen": " a", "rejected": " b"}) == "preference"
    assert formats.detect_format(["not", "a", "dict"]) is None
    assert set(formats.FORMATS) == set(formats.PREFERENCE_FORMATS) | set(formats.SFT_FORMATS)


def test_load_file_logs_nothing_silently(tmp_path, caplog):
    path = write(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with caplog.at_level("INFO", logger=loading.__name__):
        data.load_preference(path)
    assert "identical_responses=1" in caplog.text
