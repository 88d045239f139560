"""`python -m rlhf_jax.data.inspect`: per-file format, counts, skips, token lengths and truncations."""

import json
import subprocess
import sys

from rlhf_jax.data import inspect, tokenizer


def _files(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}:", "chosen": "a yes " * (i + 1), "rejected": "no"} for i in range(10)]
    lines = [json.dumps(r) for r in rows] + [
        "{broken",
        json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}),
    ]
    pairs.write_text("\n".join(lines) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Question:", "completion": "answer"}) + "\n")
    return pairs, sft


def test_main_reports_every_file(tmp_path, capsys):
    pairs, sft = _files(tmp_path)
    texts = [f"Question {i}: a yes no answer" for i in range(50)]
    model = str(tmp_path / "t.model")
    tokenizer.train_tokenizer(texts, vocab_size=300, model_path=model)
    status = inspect.main([str(pairs), str(tmp_path / "sft*.jsonl"), "--tokenizer", model, "--max_len", "12"])
    out = capsys.readouterr().out
    assert status == 0
    assert f"== {pairs}\nformat: preference (preference)\n" in out
    assert "records: 12  kept: 10  skipped: 2 (identical_responses=1, malformed_line=1)" in out
    assert "format: sft (sft)" in out and "records: 1  kept: 1  skipped: 0 (none)" in out
    assert "tokens     chosen: p50" in out and "tokens completion: p50" in out
    assert "truncated at max_len=12, max_prompt_len=6: chosen=" in out


def test_command_line_without_tokenizer(tmp_path):
    pairs, _ = _files(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.data.inspect", str(pairs), str(tmp_path / "missing.jsonl")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1  # One file is missing; the other is still reported.
    assert "format: preference" in result.stdout and "error: no such file" in result.stdout
    assert "tokens" not in result.stdout
