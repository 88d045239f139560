"""The `grpo_gsm8k` experiment: GSM8K-format files and a tiny random HuggingFace Llama through the real
command line (SFT from the checkpoint's weights → GRPO → held-out evaluation), and the error that names
`data.path` when no problems are given."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch import train
from rlhf_jax import models
from rlhf_jax.data import math_formats
from rlhf_jax.pipelines import workdir as workdir_io
from tests.workdirs import stage_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# GSM8K-style word problems: (question, worked answer with calculator annotations and `#### N`).
_TEMPLATES = (
    lambda a, b: (
        f"{_NAMES[a % 4]} has {a} apples and buys {b} more. How many apples does {_NAMES[a % 4]} have now?",
        f"{_NAMES[a % 4]} has {a}+{b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
    ),
    lambda a, b: (
        f"A box holds {a} pencils. How many pencils are in {b} boxes?",
        f"There are {a}*{b} = <<{a}*{b}={a * b}>>{a * b} pencils.\n#### {a * b}",
    ),
    lambda a, b: (
        f"A shop had {a + b} cakes and sold {b} of them. How many cakes are left?",
        f"The shop sold {b}, so {a + b}-{b} = <<{a + b}-{b}={a}>>{a} cakes are left.\n#### {a}",
    ),
    lambda a, b: (
        f"Each ticket costs ${a}. Sam buys {b} tickets and pays with a $1,000 bill. How much change?",
        f"The tickets cost {a}*{b} = $<<{a}*{b}={a * b}>>{a * b}.\n"
        f"The change is 1000-{a * b} = $<<1000-{a * b}={1000 - a * b}>>{1000 - a * b}.\n#### {1000 - a * b}",
    ),
)
_NAMES = ("Ann", "Ben", "Cleo", "Dev")


def _write_gsm8k(path, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        a, b = (int(x) for x in rng.integers(2, 30, size=2))
        question, answer = _TEMPLATES[i % len(_TEMPLATES)](a, b)
        rows.append({"question": question, "answer": answer})
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


def _cli(args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "launch.train", *args, "--config.progress=false"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def _smoke_from(hf_dir, tmp_path):
    """`grpo_gsm8k:smoke` from the checkpoint `hf_dir` on tmp_path's train/test files; (workdir, output)."""
    run = tmp_path / "run"
    out = _cli([
        "--experiment=grpo_gsm8k:smoke", f"--workdir={run}", f"--config.data.path={tmp_path / 'train.jsonl'}",
        f"--config.data.eval_path={tmp_path / 'test.jsonl'}", f"--config.model.init_from_hf={hf_dir}",
    ])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out


def test_without_a_data_path_the_error_names_data_path(tmp_path, capsys):
    for variant in ("grpo_gsm8k", "grpo_gsm8k:smoke"):
        assert train.main([f"--experiment={variant}", f"--workdir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert "--config.data.path=" in err and "GSM8K" in err, err
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_smoke_from_a_hf_checkpoint_on_gsm8k_files(tmp_path):
    """`grpo_gsm8k:smoke` with `--config.model.init_from_hf` on 24 training and 8 held-out GSM8K-format
    problems: the pinned results, the GRPO records with both rewards, and SFT (hence GRPO) started from
    the checkpoint: its architecture (width 48, the checkpoint's 64 extra embedding rows) and its weights
    (after the six SFT steps every matrix is within 0.25 of the checkpoint's, relative: 0.05 for the
    embedding, ~0.12 for the kernels; a fresh init is 5-50 away)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from rlhf_jax import interop
    from rlhf_jax.data.tokenizer import get_or_train_tokenizer

    train_rows = _write_gsm8k(tmp_path / "train.jsonl", 24, seed=0)
    _write_gsm8k(tmp_path / "test.jsonl", 8, seed=1)
    texts = [t for r in train_rows for t in (math_formats.prompt(r["question"]), r["answer"])]
    tok = get_or_train_tokenizer("", texts, 400, str(tmp_path / "tok"))
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size + 64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(str(hf_dir), safe_serialization=True)
    (hf_dir / "tokenizer.model").write_bytes(tok.model_proto)

    run, out = _smoke_from(hf_dir, tmp_path)
    assert "Online RL on math: grpo/dapo" in out.stdout

    results = json.load(open(run / "results.json"))
    assert results["eval_problems"] == 8  # the eval_path's problems, not a share of the training file
    for key in ("accuracy", "accuracy_sft", "pass_at_k"):
        assert 0.0 <= results[key] <= 1.0, (key, results[key])
    low, high = results["accuracy_ci95"]
    assert 0.0 <= low <= results["accuracy"] <= high <= 1.0
    assert 1 <= results["mean_response_length"] <= 33  # at most max_new_tokens=32 plus EOS
    assert np.isfinite(results["kl_to_sft"]) and results["wall_time_s"] > 0
    assert results["training"]["iterations"] == 2
    records = [json.loads(line) for line in open(os.path.join(stage_dir(run, "policy"), "metrics.jsonl"))]
    assert len(records) == 2
    assert all("reward/gsm8k" in r and "reward/format" in r for r in records), records[0]

    # SFT started from the checkpoint: its shape, and (GRPO then starting from SFT) its weights.
    sft_dir = stage_dir(run, "sft")
    for stage in ("sft", "policy"):
        saved = json.load(open(os.path.join(stage_dir(run, stage), "model.json")))
        assert (saved["d_model"], saved["num_kv_heads"], saved["vocab_size"]) == (48, 2, tok.vocab_size + 64)
    model, sft_params = workdir_io.load_lm(sft_dir, None)
    hf_params = interop.import_params(str(hf_dir), model)
    fresh_params = models.init_params(model, jax.random.key(0))
    # The matrices (norm scales start at one in any init), by path.
    matrices = lambda params: {
        jax.tree_util.keystr(path): np.asarray(x, np.float64)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if "norm" not in jax.tree_util.keystr(path)
    }
    sft_Ws, hf_Ws, fresh_Ws = matrices(sft_params), matrices(hf_params), matrices(fresh_params)
    assert len(sft_Ws) == 9 and sft_Ws.keys() == hf_Ws.keys() == fresh_Ws.keys()  # embedding, 7 kernels, head
    for name, sft_W in sft_Ws.items():
        hf_W, fresh_W = hf_Ws[name], fresh_Ws[name]
        relative = lambda W, hf_W=hf_W: np.linalg.norm(W - hf_W) / np.linalg.norm(hf_W)
        assert 0 < relative(sft_W) < 0.25, relative(sft_W)  # moved by SFT, from the checkpoint's weights
        assert relative(fresh_W) > 1.0  # what ignoring the checkpoint would give


@pytest.mark.slow
def test_smoke_from_a_qwen2_checkpoint_with_only_tokenizer_json(tmp_path):
    """A Qwen2.5-style checkpoint that ships only `tokenizer.json` (byte-level BPE, no BOS token, EOS
    `<|im_end|>`) and a chat template: `grpo_gsm8k:smoke` trains SFT → GRPO with that tokenizer (every
    stage keeps it), each question is rendered as a user turn of the template (default system prompt,
    generation header) with no BOS, samples stop at `<|im_end|>`, and the result exports with the
    tokenizer beside it, which `transformers` loads back with the same ids, the same chat prompt and
    the trained policy's logits."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from rlhf_jax.data import tokenizer as tokenizer_lib
    from rlhf_jax.pipelines import config as config_lib
    from rlhf_jax.pipelines import tasks
    from tests.test_hf_tokenizer import QWEN_TEMPLATE, build_tokenizer

    train_rows = _write_gsm8k(tmp_path / "train.jsonl", 24, seed=0)
    _write_gsm8k(tmp_path / "test.jsonl", 8, seed=1)
    hf_dir = tmp_path / "hf"
    texts = [t for r in train_rows for t in (math_formats.prompt(r["question"]), r["answer"])]
    qwen = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "chat_template": QWEN_TEMPLATE}  # fmt: skip
    build_tokenizer(
        hf_dir,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        corpus=texts * 4,
        config=qwen,
        qwen_style=True,
    )
    tok = tokenizer_lib.load_tokenizer(str(hf_dir))
    assert tok.bos_id is None and not (hf_dir / "tokenizer.model").exists()
    config = transformers.Qwen2Config(
        vocab_size=tok.vocab_size + 16, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(hf_dir), safe_serialization=True)

    # The prompts the run samples from: the template's rendering of the question as a user turn.
    config = train.resolve_config("grpo_gsm8k:smoke", [f"--config.data.path={tmp_path / 'train.jsonl'}",
                                                       f"--config.model.init_from_hf={hf_dir}"])  # fmt: skip
    task = tasks.load_task(config_lib.stage_config(config).data, 0, tokenizer=tok)
    first = task.problems[0]
    question = next(r["question"] for r in train_rows if r["question"].strip() in first.prompt)
    messages = [{"role": "user", "content": question}]
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert first.prompt == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert first.prompt.startswith("<|im_start|>system\nYou are Qwen")

    run, out = _smoke_from(hf_dir, tmp_path)
    results = json.load(open(run / "results.json"))
    assert 0.0 <= results["accuracy"] <= 1.0 and results["training"]["iterations"] == 2
    for stage in ("sft", "policy"):
        assert not os.path.exists(os.path.join(stage_dir(run, stage), "tokenizer.model"))
    sft_dir = stage_dir(run, "sft")
    kept = tokenizer_lib.load_tokenizer(sft_dir)
    assert (kept.bos_id, kept.eos_id, kept.pad_id) == (None, tok.eos_id, tok.pad_id)

    exported = tmp_path / "exported"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "rlhf_jax.interop", "export", f"--workdir={stage_dir(run, 'policy')}",
           f"--out={exported}", "--family=qwen2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = transformers.AutoTokenizer.from_pretrained(str(exported))
    question = math_formats.prompt(train_rows[0]["question"])
    assert theirs(question, add_special_tokens=False)["input_ids"] == tok.encode(question)
    assert json.load(open(exported / "config.json"))["eos_token_id"] == tok.eos_id
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == first.prompt

    # The exported weights are the trained policy's: transformers' logits on a templated prompt equal ours.
    ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    tokens_BT = np.asarray([list(ids["input_ids"] if hasattr(ids, "keys") else ids)], np.int32)
    model, params = workdir_io.load_lm(stage_dir(run, "policy"), None)
    ours = np.asarray(model.apply({"params": params}, tokens_BT))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.float().numpy()
    np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=0)
    start = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        start_logits = start(torch.from_numpy(tokens_BT.astype(np.int64))).logits.float().numpy()
    assert np.abs(start_logits - ours).max() > 1e-3  # SFT and GRPO moved the policy from the checkpoint
