"""Bad input files: damaged containers stop the load naming the file; bad records are skipped or named.

Each case builds a small real file: a gzip stream cut short or with a flipped CRC byte, a plain file
named `.gz`, a Parquet file truncated or with a garbled page header, a directory given as a file, raw
non-UTF-8 bytes in a JSONL line, and JSON `"\\ud800"` escapes (lone surrogates).
"""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch import train
from rlhf_jax import data
from rlhf_jax.data import inspect

ROWS = [{"prompt": f"Question {i}?", "chosen": " yes", "rejected": " no"} for i in range(300)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
STRICT = pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])


def _truncated_gzip(path):
    compressed = gzip.compress(JSONL)
    path.write_bytes(compressed[: len(compressed) // 2])
    return str(path)


def _bad_crc_gzip(path):
    compressed = bytearray(gzip.compress(JSONL))
    compressed[-8] ^= 0xFF  # The trailer is CRC-32 then length, 4 bytes each.
    path.write_bytes(bytes(compressed))
    return str(path)


def _parquet_bytes(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "good.parquet")
    return (tmp_path / "good.parquet").read_bytes()


@STRICT
def test_truncated_gzip_names_the_file_and_the_lines_read(tmp_path, strict):
    # Records before the damage are not kept even leniently: how many were lost is unknown.
    path = _truncated_gzip(tmp_path / "cut.jsonl.gz")
    with pytest.raises(data.DataError, match=r"cut\.jsonl\.gz: truncated or corrupt gzip file") as e:
        data.load_preference(path, strict=strict)
    assert e.value.path == path
    lines_read = int(str(e.value).split("after reading ")[1].split(" ")[0])
    assert 0 < lines_read < len(ROWS)


@STRICT
def test_bad_gzip_crc_is_an_error_even_after_every_line(tmp_path, strict):
    path = _bad_crc_gzip(tmp_path / "crc.jsonl.gz")
    with pytest.raises(data.DataError, match=rf"crc\.jsonl\.gz: .*after reading {len(ROWS)} line\(s\): CRC"):
        data.load_preference(path, strict=strict)


@STRICT
def test_plain_file_named_gz(tmp_path, strict):
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(JSONL)
    with pytest.raises(data.DataError, match=r"plain\.jsonl\.gz: not a gzip file despite its \.gz name"):
        data.load_preference(str(path), strict=strict)


@STRICT
def test_corrupt_parquet(tmp_path, strict):
    good = _parquet_bytes(tmp_path)
    (tmp_path / "cut.parquet").write_bytes(good[: len(good) // 2])  # No footer.
    with pytest.raises(data.DataError, match=r"cut\.parquet: not a readable Parquet file"):
        data.load_preference(str(tmp_path / "cut.parquet"), strict=strict)
    # A valid footer over a garbled first page header: the file opens, reading its rows fails.
    (tmp_path / "garbled.parquet").write_bytes(good[:4] + b"\xff" * 32 + good[36:])
    with pytest.raises(data.DataError, match=r"garbled\.parquet: corrupt Parquet data after 0 row\(s\)") as e:
        data.load_preference(str(tmp_path / "garbled.parquet"), strict=strict)
    assert "\n" not in str(e.value)  # pyarrow's message spans lines; ours is one.


def test_unreadable_path_names_the_file(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(data.DataError, match=r"dir\.jsonl: cannot open the file: Is a directory"):
        data.load_preference(str(tmp_path / "dir.jsonl"))


@pytest.mark.parametrize("container", ["jsonl", "jsonl.gz"])
def test_non_utf8_line_is_one_bad_record(tmp_path, container):
    lines = JSONL.splitlines(keepends=True)[:3]
    lines.insert(1, b'{"prompt": "caf\xe9 \xff\xfe", "chosen": " a", "rejected": " b"}\n')  # Latin-1 bytes.
    raw = b"".join(lines)
    path = tmp_path / f"bytes.{container}"
    path.write_bytes(gzip.compress(raw) if container == "jsonl.gz" else raw)
    examples, stats = data.load_preference(str(path))
    assert [e.prompt for e in examples] == ["Question 0?", "Question 1?", "Question 2?"]
    assert stats.skipped == {"invalid_utf8": 1}
    assert stats.records == stats.kept + sum(stats.skipped.values()) == 4
    assert "invalid_utf8=1" in stats.summary()
    pattern = rf"bytes\.{container}:2: field 'prompt': invalid_utf8: invalid UTF-8 byte 0xe9 at byte 16"
    with pytest.raises(data.DataError, match=pattern) as e:
        data.load_preference(str(path), strict=True)
    assert (e.value.line, e.value.field) == (2, "prompt")


def test_non_utf8_json_array_names_the_line(tmp_path):
    path = tmp_path / "array.json"
    path.write_bytes(b'[\n {"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": "\xff"}\n]\n')
    with pytest.raises(data.DataError, match=r"array\.json:3: JSON array with an invalid UTF-8 byte 0xff"):
        data.load_preference(str(path))


def test_lone_surrogates_are_bad_fields(tmp_path):
    # json.dumps writes "\ud800" for a lone surrogate and "\ud83d\ude00" for an escaped (valid) pair.
    rows = [
        {"prompt": "p\ud800", "chosen": " a", "rejected": " b"},
        {"prompt": "smile \U0001f600", "chosen": " a", "rejected": " b"},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\udfff"}],
         "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": " a", "rejected": " b", "note": {"\udc80": 1}},
    ]  # fmt: skip
    path = tmp_path / "surrogates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "\\ud800" in path.read_text() and "\\ud83d\\ude00" in path.read_text()
    examples, stats = data.load_preference(str(path))
    assert [e.prompt for e in examples] == ["smile \U0001f600"]
    assert stats.skipped == {"lone_surrogate": 3}
    with pytest.raises(
        data.DataError, match=r"surrogates\.jsonl:1: field 'prompt': lone_surrogate: .*U\+D800"
    ):
        data.load_preference(str(path), strict=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(data.DataError, match=r"surrogates\.jsonl:2: field 'prompt\[1\]\.content'"):
        data.load_preference(str(path), strict=True)
    # The same in a JSON array (element numbers), and the loaded text always encodes for the tokenizer.
    path = tmp_path / "surrogates.json"
    path.write_text(json.dumps(rows[:2]))
    with pytest.raises(data.DataError, match=r"surrogates\.json:1: field 'prompt': lone_surrogate"):
        data.load_preference(str(path), strict=True)
    (example,), stats = data.load_preference(str(path))
    assert stats.skipped == {"lone_surrogate": 1}
    example.prompt.encode("utf-8")
    # A file whose only record is bad still has its format detected from that record's keys.
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    examples, stats = data.load_preference(str(path))
    assert (examples, stats.files[0].format, stats.skipped) == ([], "preference", {"lone_surrogate": 1})


def test_inspect_reports_a_damaged_file_and_goes_on(tmp_path, capsys):
    bad = _truncated_gzip(tmp_path / "cut.jsonl.gz")
    good = tmp_path / "ok.jsonl"
    good.write_bytes(JSONL)
    assert inspect.main([bad, str(good)]) == 1
    out = capsys.readouterr().out
    assert f"== {bad}\nerror: {bad}: truncated or corrupt gzip file" in out
    assert f"records: {len(ROWS)}  kept: {len(ROWS)}" in out


@pytest.mark.parametrize("case", ["truncated_gzip", "strict_lone_surrogate"])
def test_launcher_exits_1_naming_the_bad_file(tmp_path, capsys, case):
    if case == "truncated_gzip":
        path, extra = _truncated_gzip(tmp_path / "cut.jsonl.gz"), []
    else:
        # Valid apart from line 2, which used to pass strict loading and fail later in the tokenizer.
        lines = JSONL.decode().splitlines(keepends=True)[:20]
        lines.insert(1, '{"prompt": "\\ud800", "chosen": " a", "rejected": " b"}\n')
        path, extra = str(tmp_path / "s.jsonl"), ["--config.data.strict=true"]
        (tmp_path / "s.jsonl").write_text("".join(lines))
    argv = ["--experiment=dpo_tldr:smoke", f"--workdir={tmp_path / 'wd'}", "--config.progress=false"]
    assert train.main([*argv, f"--config.data.path={path}", *extra]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}" in err and "Traceback" not in err
    if case == "strict_lone_surrogate":
        assert f"{path}:2: field 'prompt': lone_surrogate" in err
