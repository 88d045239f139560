"""A real end-to-end path from a pretrained checkpoint: a tiny random Qwen2.5-style model built with
`transformers` (a byte-level BPE `tokenizer.json` built with `tokenizers`, no BOS, EOS `<|im_end|>`, the
Qwen2.5 chat template), conversational preference pairs, `dpo_hh:smoke` through the command line (SFT
from the checkpoint's weights, then DPO with LoRA adapters), exports of the SFT policy, of the merged DPO
policy and of the adapters alone, and `transformers` / `peft` reloading each with our logits.
(SFT → GRPO from such a checkpoint: tests/test_grpo_gsm8k.py.)"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.data import tokenizer as tokenizer_lib
from rlhf_jax.pipelines import workdir as workdir_io
from tests.test_hf_tokenizer import QWEN_TEMPLATE, build_tokenizer
from tests.workdirs import stage_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS_ATOL = 1e-4


def _run(module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _pairs(n: int, seed: int) -> list[dict]:
    """TRL's conversational preference records: a user turn, a right and a wrong assistant answer."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 20, size=2))
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
            "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
            "rejected": [{"role": "assistant", "content": f"{a} plus {b} is {a + b + 1}."}],
        })  # fmt: skip
    return rows


@pytest.mark.slow
def test_dpo_hh_with_lora_from_a_qwen25_style_checkpoint_exports_to_transformers_and_peft(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    # The checkpoint: tokenizer.json + tokenizer_config.json (with the chat template) + weights.
    train_rows, test_rows = _pairs(48, 0), _pairs(12, 1)
    corpus = [m["content"] for r in train_rows for k in ("prompt", "chosen", "rejected") for m in r[k]]
    hf_dir = tmp_path / "qwen"
    build_tokenizer(
        hf_dir, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], corpus=corpus * 4 + [QWEN_TEMPLATE],
        config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "chat_template": QWEN_TEMPLATE},
        generation={"eos_token_id": [2, 0]}, qwen_style=True,
    )  # fmt: skip
    tok = tokenizer_lib.load_tokenizer(str(hf_dir))
    assert tok.bos_id is None and tok.eos_ids == (2, 0)
    config = transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(str(hf_dir), safe_serialization=True)
    # As published: generation stops at <|im_end|> and <|endoftext|> (save_pretrained wrote its own).
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    assert tokenizer_lib.load_tokenizer(str(hf_dir)).eos_ids == (2, 0)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    # SFT (every weight) → DPO (LoRA on q, v, o and the MLP) through the command line.
    run = tmp_path / "run"
    out = _run(
        "launch.train", "--experiment=dpo_hh:smoke", f"--workdir={run}",
        f"--config.data.path={tmp_path / 'train.jsonl'}",
        f"--config.data.eval_path={tmp_path / 'test.jsonl'}", f"--config.model.init_from_hf={hf_dir}",
        "--config.data.max_len=96", "--config.data.max_prompt_len=64",
        "--config.train.lora_rank=4", "--config.train.lora_targets=q,v,o,gate,up,down",
        "--config.train.learning_rate=5e-3", "--config.progress=false",
    )  # fmt: skip
    assert "LoRA rank 4" in out.stdout
    results = json.load(open(run / "results.json"))
    assert np.isfinite(results["eval_loss"]) and results["truncated"] == {}
    sft_dir, policy_dir = stage_dir(run, "sft"), stage_dir(run, "policy")
    kept = tokenizer_lib.load_tokenizer(policy_dir)
    assert kept.chat_template == QWEN_TEMPLATE and kept.eos_ids == tok.eos_ids

    # Exports: the SFT policy (the LoRA base), the merged DPO policy, the adapters alone.
    exported = {name: tmp_path / name for name in ("sft_hf", "policy_hf", "adapters")}
    _run("rlhf_jax.interop", "export", f"--workdir={sft_dir}", f"--out={exported['sft_hf']}")
    _run("rlhf_jax.interop", "export", f"--workdir={run}", f"--out={exported['policy_hf']}")
    _run("rlhf_jax.interop", "export", f"--workdir={run}", f"--out={exported['adapters']}", "--peft",
         f"--source={exported['sft_hf']}")  # fmt: skip
    assert json.load(open(exported["policy_hf"] / "config.json"))["model_type"] == "qwen2"

    # A templated conversation, as `transformers` tokenises it.
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(exported["policy_hf"]))
    messages = test_rows[0]["prompt"] + test_rows[0]["chosen"]
    ids = theirs_tok.apply_chat_template(messages, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert theirs_tok.decode(ids).startswith("<|im_start|>system\nYou are Qwen")
    tokens_BT = np.asarray([ids], np.int32)

    def torch_logits(model):
        with torch.no_grad():
            return model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.float().numpy()

    model, merged = workdir_io.load_lm(policy_dir, None)
    ours = np.asarray(model.apply({"params": merged}, tokens_BT))
    policy_hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported["policy_hf"])).eval()
    np.testing.assert_allclose(torch_logits(policy_hf), ours, atol=LOGITS_ATOL, rtol=0)

    sft_hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported["sft_hf"])).eval()
    sft_logits = torch_logits(sft_hf)
    assert np.abs(sft_logits - ours).max() > 1e-3  # DPO moved the policy away from its base
    with_adapters = peft.PeftModel.from_pretrained(sft_hf, str(exported["adapters"])).eval()
    np.testing.assert_allclose(torch_logits(with_adapters), ours, atol=LOGITS_ATOL, rtol=0)
