"""Smoke tests of the benchmarks (`bench/`) on the tiny preset, so their code paths cannot rot.

They check what the benchmarks compute (FLOP formula, batch layout, presets, records, the summary line)
and that every path runs; they time nothing that matters. The PyTorch and TRL paths are skipped
unless the `bench` extra (and TRL) is installed.
"""

import json
import math
import os
import re

import jax
import numpy as np
import pytest

from bench import common, compile, memory, peak, sample, train_step
from rlhf_jax import models

TINY = common.get_preset("tiny")


def test_presets_are_the_issues():
    small, medium = common.get_preset("small"), common.get_preset("medium")
    assert (small.model.d_model, small.model.num_layers, small.model.num_heads, small.model.mlp_dim) == (
        256, 4, 4, 704,
    )  # fmt: skip
    assert (small.prompt_len, small.response_len, small.pairs, small.model.vocab_size) == (128, 128, 8, 8192)
    assert (medium.model.d_model, medium.model.num_layers, medium.model.num_heads, medium.model.mlp_dim) == (
        512, 8, 8, 1408,
    )  # fmt: skip
    assert (medium.prompt_len, medium.response_len, medium.pairs) == (256, 256, 4)
    assert not small.model.tie_embeddings and small.tokens_per_step == 2 * 8 * 256
    assert common.get_preset("small", layers=32, dtype="bfloat16").model.num_layers == 32


def test_flops_formula_by_hand():
    c = TINY.model  # L=2, D=64, H=4 x K=16, F=176, V=256
    layer = 4 * 64 * 64 + 3 * 64 * 176 + 2 * 64
    n = 2 * layer + 64 + 64 * 256  # layers, final norm, LM head; not the input embedding
    assert common.matmul_params(c) == n == models.param_count(c) - 256 * 64
    b, t = 2, 16
    policy = 6 * n * (2 * b * t) + 3 * 4 * 2 * 64 * t * t * (2 * b)
    reference = 2 * n * (2 * b * t) + 4 * 2 * 64 * t * t * (2 * b)
    assert common.flops_per_step(TINY) == policy + reference
    assert common.flops_per_step(TINY, reference_forward=False) == policy


def test_batch_layout():
    batch = common.make_batch(TINY)
    b, t = TINY.pairs, TINY.seq_len
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_tokens"].shape == (b, t)
        np.testing.assert_array_equal(batch[f"{side}_targets"][:, :-1], batch[f"{side}_tokens"][:, 1:])
        mask = batch[f"{side}_loss_mask"]
        assert mask.dtype == np.float32 and np.all(mask.sum(1) == TINY.response_len)
        assert np.all(mask[:, TINY.prompt_len - 1] == 1) and np.all(mask[:, : TINY.prompt_len - 1] == 0)
        assert np.all(batch[f"{side}_segment_ids"] == 1)
    np.testing.assert_array_equal(
        batch["chosen_tokens"][:, : TINY.prompt_len], batch["rejected_tokens"][:, : TINY.prompt_len]
    )


def test_peak_measures_a_matmul():
    out = peak.measure("float32", sizes=(64,), iters=1)
    assert out["peak_gflops"] > 0 and set(out["gflops_by_size"]) == {64}


def test_train_step_record_and_summary_line(capsys):
    record = train_step.main(["--preset=tiny", "--warmup=1", "--iters=1", "--peak-sizes=128", "--json="])
    assert record["tokens_per_s"] > 0 and record["ratio_vs_torch"] is None
    assert 0 < record["mfu"] < 1.5
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"tokens_per_s=[\d.]+ mfu=[\d.]+ ratio_vs_torch=na", last), last


def test_train_step_gives_attention_impl_to_our_model_only(monkeypatch):
    seen = {}

    class StopError(Exception):
        pass

    def fake_step(p, **kw):
        seen["impl"] = p.model.attention_impl
        raise StopError

    monkeypatch.setattr(common, "jax_dpo_step", fake_step)
    monkeypatch.setattr(peak, "measure", lambda *a, **kw: {"peak_gflops": None})
    with pytest.raises(StopError):
        train_step.main(["--preset=tiny", "--attention_impl=cpu_ffi", "--json="])
    assert seen["impl"] == "cpu_ffi"


SAMPLE_ARGS = ["--preset=tiny", "--prompts=4", "--prompt_len=8", "--new_tokens=5", "--runs=1"]


def test_sample_record_profile_and_summary_line(tmp_path):
    """bench.sample on the tiny preset: record, summary line, and a profile whose loop ops run
    new_tokens - 1 times (the first token comes from the prefill). In a fresh process on the CPU
    platform: once a test in this worker has loaded libtpu (the TPU-plan and kernel tests compile for
    a TPU topology), JAX's profiler starts libtpu's tracer plugin, which crashes without a TPU."""
    import subprocess
    import sys

    path = tmp_path / "sample.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-m", "bench.sample", *SAMPLE_ARGS, "--profile", f"--json={path}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert re.fullmatch(r"tokens_per_s=[\d.]+ mfu=na ratio_vs_torch=na", out.strip().splitlines()[-1])
    record = json.loads(path.read_text())
    assert record["tokens_per_s"] > 0 and record["ratio_vs_torch"] is None
    assert record["workload"]["new_tokens"] == 5
    profile = record["results"][0]["profile"]
    assert profile and {"op", "ms", "calls", "shape", "source"} <= set(profile[0])
    assert any(row["calls"] == 4 for row in profile), profile


def test_sample_compares_with_hf_generate(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    assert sample.main([*SAMPLE_ARGS, "--compare=torch", "--json="]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"tokens_per_s=[\d.]+ mfu=na ratio_vs_torch=[\d.]+", last), last


def test_torch_steps_have_loss_log2_at_start():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    for masked in (False, True):
        step = train_step.TorchDPO(TINY, reference="online", masked_rows=masked)
        assert step.step() == pytest.approx(math.log(2), abs=1e-6)


def test_torch_logps_variants_agree():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    step = train_step.TorchDPO(TINY, reference="online", masked_rows=False)
    with torch.no_grad():
        full = train_step._torch_sequence_logps(
            step.policy, step.tokens, step.targets, step.mask, masked_rows=False
        )
        rows = train_step._torch_sequence_logps(
            step.policy, step.tokens, step.targets, step.mask, masked_rows=True
        )
    np.testing.assert_allclose(full.numpy(), rows.numpy(), rtol=1e-5)


def test_trl_times_steps():
    pytest.importorskip("trl")
    times = train_step.time_trl(TINY, reference="online", warmup=1, iters=1)
    assert len(times) == 1 and times[0] > 0


def test_compile_measures_lower_and_compile():
    row = compile.measure("tiny", 1)
    assert row["layers"] == 1 and row["lower_s"] > 0 and row["compile_s"] > 0


def test_memory_remat_analysis():
    row = memory.remat_memory("tiny", "full")
    if row["peak_MiB"] is None:
        pytest.skip("backend gives no memory analysis")
    assert row["peak_MiB"] >= row["temp_MiB"] > 0


def test_fsdp_state_is_split_over_devices():
    assert jax.device_count() == 8
    row = memory.fsdp_state_bytes("tiny", 8)
    # Everything but the replicated norm scales (a few hundred bytes) is split 8 ways.
    assert 1 / 8 <= row["params_fraction"] < 1 / 8 + 0.01
    assert 1 / 8 <= row["opt_state_fraction"] < 1 / 8 + 0.01


def test_lora_memory_counts_adapters_and_saves_the_reference_copy():
    """The full-vs-LoRA compile on the tiny preset: LoRA trains the adapters alone (rank r on seven
    projections of 2 layers), and its arguments lack the full run's reference copy and AdamW moments
    (bf16 weights: each copy is 2 bytes per parameter, split 8 ways), less the adapters' own state,
    which at this size is a fifth of the model."""
    from rlhf_jax import models

    rows = {r["mode"]: r for r in memory.lora_memory(8, 4, preset="tiny", pairs=8, seq_len=32)}
    full, lora_row = rows["full"], rows["lora r=4"]
    c = models.preset("tiny")
    per_layer = 4 * (c.d_model + c.num_heads * c.head_dim) + 2 * 4 * (c.d_model + c.num_kv_heads * c.head_dim)
    per_layer += 4 * (c.num_heads * c.head_dim + c.d_model) + 3 * 4 * (c.d_model + c.mlp_dim)
    assert lora_row["trainable_params"] == c.num_layers * per_layer
    assert full["trainable_params"] == models.param_count(c)
    copy_gib = 2 * models.param_count(c) / 8 / 2**30
    assert full["arguments_GiB"] - lora_row["arguments_GiB"] > 1.5 * copy_gib
    assert lora_row["peak_GiB"] < full["peak_GiB"]


GRPO_ARGS = ["--preset=tiny", "--prompts=2", "--group=4", "--new_tokens=8", "--warmup=1", "--iters=1"]


def test_grpo_step_record_and_summary_line(tmp_path, capsys):
    """bench.grpo_step on the tiny preset: our generation and training both timed, the tokens counted
    from the workload (2 prompts x 4 samples x 8 new tokens; prompt 8 tokens), the summary line."""
    from bench import grpo_step

    path = tmp_path / "grpo.json"
    record = grpo_step.main([*GRPO_ARGS, f"--json={path}"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"iter_s=[\d.]+ gen_tok_s=[\d.]+ train_tok_s=[\d.]+ ratio_vs_trl=na ratio_vs_torch=na", last
    ), last
    assert json.loads(path.read_text())["workload"] == {
        "prompts": 2, "group": 4, "prompt_len": 8, "new_tokens": 8, "warmup": 1, "iters": 1,
        "dtype": "float32",
    }  # fmt: skip
    (ours,) = record["rows"]
    assert ours["gen_s"] > 0 and ours["train_s"] > 0
    assert ours["iter_s"] == pytest.approx(ours["gen_s"] + ours["train_s"])
    assert ours["gen_tok_s"] == pytest.approx(2 * 4 * 8 / ours["gen_s"])
    assert ours["train_tok_s"] == pytest.approx(2 * 4 * (8 + 8) / ours["train_s"])
    with pytest.raises(SystemExit):  # 8 prompt + 64 new tokens do not fit the tiny preset's 32 positions
        grpo_step.main(["--preset=tiny", "--new_tokens=64", "--json="])


def test_grpo_step_compares_with_trl_grpo_trainer_and_a_torch_iteration(capsys):
    pytest.importorskip("trl")
    from bench import grpo_step

    record = grpo_step.main([*GRPO_ARGS, "--compare=trl,torch", "--json="])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"iter_s=[\d.]+ gen_tok_s=[\d.]+ train_tok_s=[\d.]+ ratio_vs_trl=[\d.]+ ratio_vs_torch=[\d.]+", last
    ), last
    _, trl_row, torch_row = record["rows"]
    assert trl_row["impl"] == "trl GRPOTrainer" and trl_row["gen_s"] > 0 and trl_row["train_s"] > 0
    assert record["ratio_vs_trl"] == pytest.approx(trl_row["iter_s"] / record["iter_s"])
    assert torch_row["impl"] == "torch (hand-written)" and torch_row["gen_s"] > 0 and torch_row["train_s"] > 0
    assert record["ratio_vs_torch"] == pytest.approx(torch_row["iter_s"] / record["iter_s"])
    with pytest.raises(SystemExit):
        grpo_step.main([*GRPO_ARGS, "--compare=vllm", "--json="])


def test_attention_times_each_implementation_and_checks_its_output(tmp_path, capsys):
    from bench import attention

    path = tmp_path / "attention.json"
    record = attention.main(
        ["--shape=2,40,4,2,16", "--impls=blockwise,xla,torch", "--iters=1", f"--json={path}"]
    )
    rows = {r["impl"]: r for r in record["results"]}
    assert set(rows) == {"blockwise", "xla", "torch"}
    for r in rows.values():
        assert r["fwd ms"] > 0 and r["fwd+bwd ms"] > 0
        assert r["max |out - first|"] < 1e-5  # the three compute the same causal attention
    assert record["shape"] == {"B": 2, "T": 40, "H": 4, "G": 2, "K": 16}
    assert json.loads(path.read_text())["results"][0]["impl"] == "blockwise"
    with pytest.raises(SystemExit, match="unknown"):
        attention.main(["--impls=flash"])


def test_train_step_compare_times_each_implementation_in_its_own_process(tmp_path):
    """--compare runs ours, torch and torch-masked each in a fresh `--only=NAME` process and tabulates
    them as before; --no-isolate keeps them in this process."""
    pytest.importorskip("transformers")
    args = ["--preset=tiny", "--warmup=1", "--iters=2", "--peak-sizes=128", "--compare=torch"]
    record = train_step.main([*args, f"--json={tmp_path / 'isolated.json'}"])
    assert record["isolated"] is True
    assert [r["impl"] for r in record["rows"]] == ["ours (jax)", "torch", "torch-masked"]
    pids = record["pids"]  # three fresh processes, none of them this one
    assert set(pids) == {"ours", "torch", "torch-masked"} and len(set(pids.values())) == 3
    assert os.getpid() not in pids.values()
    for r in record["rows"]:
        assert len(r["times"]) == 2 and all(t > 0 for t in r["times"]) and len(r["cpu_times"]) == 2
    best_torch = max(r["tokens/s"] for r in record["rows"][1:])
    assert record["ratio_vs_torch"] == pytest.approx(record["tokens_per_s"] / best_torch)
    together = train_step.main([*args, "--no-isolate", "--json="])
    assert together["isolated"] is False and len(together["rows"]) == 3
    assert set(together["pids"].values()) == {os.getpid()}
    with pytest.raises(SystemExit):
        train_step.main(["--preset=tiny", "--only=jax"])
