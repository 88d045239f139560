"""HuggingFace interop: tiny random Llama / Qwen2 / Gemma models built locally with transformers.

Tolerances: imported float32 logits match PyTorch's to LOGITS_ATOL = 1e-4 absolute on logits of order
1-10 (both sides float32; they differ only in reduction order and in how the rotary angles are computed);
transformers reloading our export reproduces its own logits to 1e-5 (the same weights; Gemma's norm
weights pass through 1 + w and back). Export then import is bit-exact, and so are shardings: a sharded
import equals the single-device one exactly.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from workdirs import stage_dir

from rlhf_jax import interop, models, sharding
from rlhf_jax.interop import __main__ as cli
from rlhf_jax.interop import _hf_layout, _safetensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; never reach for the hub
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGITS_ATOL = 1e-4
RELOAD_ATOL = 1e-5
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **SHAPE, num_key_value_heads=2, rope_theta=500_000.0, rms_norm_eps=1e-5, max_position_embeddings=64
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **SHAPE, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=64
    ),
    "gemma": lambda: transformers.GemmaConfig(
        **SHAPE, num_key_value_heads=1, head_dim=32, max_position_embeddings=64
    ),
}


def _randomize(model, family: str) -> None:
    """Weights of order-1 logits, norms away from their init, nonzero biases: every mapping is exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((0.0 if family == "gemma" else 1.0) + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.3 * r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5 if p.ndim == 2 and "embed" not in name else 0.5 * r)


def _torch_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{family: (dir, torch logits, tokens)} of saved tiny random models; llama also saved sharded."""
    tokens_BT = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)
    out = {}
    for family, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        _randomize(model, family)
        path = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(path, safe_serialization=True)
        if family == "llama":
            model.save_pretrained(path + "_sharded", safe_serialization=True, max_shard_size="40KB")
        out[family] = (path, _torch_logits(model, tokens_BT), tokens_BT)
    return out


def _import(path: str, mesh=None, **overrides):
    config = interop.load_config(path, **overrides)
    model = models.Transformer(config)
    return config, model, interop.import_params(path, model, mesh)


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_logits_match_transformers_and_export_round_trips(hf_dirs, family, tmp_path):
    path, torch_logits, tokens_BT = hf_dirs[family]
    assert interop.family(path) == family
    config, model, params = _import(path)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(tokens_BT)))
    np.testing.assert_allclose(logits, torch_logits, atol=LOGITS_ATOL, rtol=0)
    assert np.abs(torch_logits).max() > 1.0  # the comparison is not vacuous

    out = str(tmp_path / "export")
    interop.export_params(params, config, out, source=path)
    _assert_trees_equal(interop.import_params(out, model), params)
    assert sorted(os.listdir(out)) == sorted(os.listdir(path))  # config, weights, generation_config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens_BT), torch_logits, atol=RELOAD_ATOL, rtol=0)


def test_sharded_checkpoint_onto_mesh_equals_single_device(hf_dirs, tmp_path):
    path = hf_dirs["llama"][0]
    assert os.path.exists(os.path.join(path + "_sharded", interop.hf.INDEX_FILE))
    config, model, single = _import(path)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    placed = interop.import_params(path + "_sharded", model, mesh)
    _assert_trees_equal(placed, single)
    want = models.param_shardings(model, mesh)
    for x, s in zip(jax.tree.leaves(placed), jax.tree.leaves(want), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(want))
    interop.export_params(placed, config, str(tmp_path))  # gathers each sharded tensor
    _assert_trees_equal(interop.import_params(str(tmp_path), model), single)


def test_unrolled_layout_equals_scanned(hf_dirs):
    path = hf_dirs["gemma"][0]
    config, _, scanned = _import(path)
    _, _, unrolled = _import(path, scan_layers=False)
    _assert_trees_equal(unrolled, models.unstack_layers(scanned, config.num_layers))


def test_bfloat16_checkpoint_round_trips_bit_exactly(hf_dirs, tmp_path):
    src = str(tmp_path / "bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["qwen2"][0]).to(torch.bfloat16)
    model.save_pretrained(src, safe_serialization=True)
    config, _, params = _import(src, param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = str(tmp_path / "out")
    interop.export_params(params, config, out, max_shard_bytes=20_000)  # several files and an index
    assert os.path.exists(os.path.join(out, interop.hf.INDEX_FILE))
    with open(os.path.join(out, interop.hf.INDEX_FILE)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    assert len(files) > 1
    from safetensors.torch import load_file

    theirs = load_file(os.path.join(src, "model.safetensors"))
    ours = {k: v for f in files for k, v in load_file(os.path.join(out, f)).items()}
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], t), name


@pytest.mark.parametrize(
    "index", [(slice(0, 32), slice(2, 4), slice(None)), (slice(16, 48), slice(1, 3), slice(4, 12))]
)
def test_read_of_a_slice_equals_the_slice_of_a_full_read(index):
    # q_proj [H*K, D] -> q_kernel [D, H, K]; the second index splits K, which needs the full-read path.
    # An offset as Gemma's norms have: ours -> HF -> ours is exact for values >= 0.5 (Sterbenz).
    tmap = _hf_layout.TensorMap("q", (4 * 16, 64), (4, 16, 64), (2, 0, 1), offset=1.0)
    hf = np.random.default_rng(0).uniform(-0.5, 1.0, size=tmap.hf_shape).astype(np.float32)
    full = tmap.read(hf, (slice(None),) * 3, np.float32)
    np.testing.assert_array_equal(full, hf.reshape(4, 16, 64).transpose(2, 0, 1) + np.float32(1.0))
    np.testing.assert_array_equal(tmap.read(hf, index, np.float32), full[index])
    np.testing.assert_array_equal(tmap.read(tmap.to_hf(full, np.float32), (), np.float32), full)


def test_safetensors_writer_is_read_by_the_reference_reader(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64)}
    path = str(tmp_path / "x.safetensors")
    _safetensors.write_file(path, [(k, v.shape, v.dtype) for k, v in arrays.items()], arrays.__getitem__)
    for k, v in load_file(path).items():
        np.testing.assert_array_equal(v, arrays[k])
    np.testing.assert_array_equal(_safetensors.SafetensorsFile(path).get("a")[1, 1:], [4.0, 5.0])


# ------------------------------------------------------------------------------------------ errors


def _edited(src: str, dst, **changes) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_parameters"])
def test_llama31_rope_scaling_matches_transformers_and_round_trips(tmp_path, layout):
    """Llama 3.1/3.2's llama3 frequency scaling, with the original context short enough (256) that the
    tiny head's 8 frequencies fall in all three bands (kept, interpolated, divided by the factor)."""
    rope = {**LLAMA31_ROPE, "original_max_position_embeddings": 256}
    hf = transformers.LlamaConfig(**SHAPE, num_key_value_heads=2, rope_theta=500_000.0, rms_norm_eps=1e-5,
                                  max_position_embeddings=512, rope_scaling=dict(rope))  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf).eval()
    _randomize(model, "llama")
    path = str(tmp_path / "llama31")
    model.save_pretrained(path, safe_serialization=True)
    if layout == "rope_parameters":  # the transformers 5 layout only
        _edited(path, tmp_path / "new", rope_scaling=None, rope_parameters={**rope, "rope_theta": 500_000.0})
        path = str(tmp_path / "new")
    tokens_BT = np.random.default_rng(0).integers(0, 128, size=(2, 40)).astype(np.int32)
    config, ours, params = _import(path)
    assert dict(config.rope_scaling) == rope and config.rope_theta == 500_000.0
    from rlhf_jax.models import layers

    inv_freq = layers.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    plain = layers.rope_inv_freq(config.head_dim, config.rope_theta)
    kept, divided = np.isclose(inv_freq, plain), np.isclose(inv_freq, plain / 8)
    assert kept.any() and divided.any() and (~kept & ~divided).any()  # all three bands are exercised
    logits = np.asarray(ours.apply({"params": params}, jnp.asarray(tokens_BT)))
    np.testing.assert_allclose(logits, _torch_logits(model, tokens_BT), atol=LOGITS_ATOL, rtol=0)
    no_scaling = dataclasses.replace(config, rope_scaling=())
    other = np.asarray(models.Transformer(no_scaling).apply({"params": params}, jnp.asarray(tokens_BT)))
    assert np.abs(other - logits).max() > 1e-3  # the scaling changes the logits: the check is not vacuous
    out = str(tmp_path / "export")
    interop.export_params(params, config, out, source=path)
    assert interop.load_config(out) == config
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens_BT), logits, atol=RELOAD_ATOL, rtol=0)


@pytest.mark.parametrize(
    "family, changes, named",
    [
        ("llama", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        (
            "llama",
            dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 5e5}),
            "rope_parameters",
        ),
        ("qwen2", dict(rope_scaling=LLAMA31_ROPE), "rope_scaling"),  # llama3 scaling is Llama's only
        ("llama", dict(attention_bias=True), "attention_bias"),
        ("llama", dict(mlp_bias=True), "mlp_bias"),
        ("llama", dict(hidden_act="gelu"), "hidden_act"),
        ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        ("llama", dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
        ("llama", dict(model_type="gpt2"), "gpt2"),
        ("qwen2", dict(use_sliding_window=True, max_window_layers=1, layer_types=None), "use_sliding_window"),
        ("qwen2", dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
        ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ],
)
def test_unsupported_config_field_is_named(hf_dirs, tmp_path, family, changes, named):
    path = _edited(hf_dirs[family][0], tmp_path / "edited", **changes)
    with pytest.raises(ValueError, match=named):
        interop.load_config(path)


def test_mismatched_model_and_extra_tensors_are_errors(hf_dirs, tmp_path):
    path = hf_dirs["llama"][0]
    config = interop.load_config(path)
    with pytest.raises(ValueError, match="num_heads"):
        interop.import_params(path, models.Transformer(models.preset("tiny")))
    # A tensor no parameter takes (here an o_proj bias) must not be dropped silently.
    src = _safetensors.SafetensorsFile(os.path.join(path, "model.safetensors"))
    extra = {k: np.asarray(src.get(k)) for k in src.keys()}
    extra["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    _safetensors.write_file(os.path.join(bad, "model.safetensors"),
                            [(k, v.shape, v.dtype) for k, v in extra.items()], extra.__getitem__)  # fmt: skip
    with pytest.raises(ValueError, match="o_proj.bias"):
        interop.import_params(bad, models.Transformer(config))
    with pytest.raises(ValueError, match="family='qwen2'"):
        interop.export_params({}, interop.load_config(hf_dirs["qwen2"][0]), str(tmp_path), family="llama")


def test_tokenizer_path_prefers_sentencepiece_then_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        interop.tokenizer_path(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert interop.tokenizer_path(str(tmp_path)) == str(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert interop.tokenizer_path(str(tmp_path)) == str(tmp_path / "tokenizer.model")


def test_cli_exports_a_finished_stage(hf_dirs, tmp_path):
    import orbax.checkpoint as ocp

    path, torch_logits, tokens_BT = hf_dirs["llama"]
    config, _, params = _import(path)
    workdir = tmp_path / "stage"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(workdir / "params"), params)
    (workdir / "model.json").write_text(json.dumps({"kind": "lm", **dataclasses.asdict(config)}))
    out = str(tmp_path / "hf")
    assert cli.main(["export", "--workdir", str(workdir), "--out", out, "--source", path]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, tokens_BT), torch_logits, atol=RELOAD_ATOL, rtol=0)
    assert cli.main(["inspect", out]) == 0


# config.json of released checkpoints (as published; no weights needed): they parse to our presets.
TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 22,
    "num_key_value_heads": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "use_cache": True,
    "vocab_size": 32000,
}
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "max_position_embeddings": 8192,
    "model_type": "gemma",
    "num_attention_heads": 8,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0",
    "use_cache": True,
    "vocab_size": 256000,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "use_mrope": False,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_released_configs_parse():
    from rlhf_jax.interop import _hf_config

    assert _hf_config.parse_config(TINYLLAMA) == (models.preset("1b"), "llama")
    assert _hf_config.parse_config(GEMMA_2B) == (models.preset("2b"), "gemma")
    qwen, family = _hf_config.parse_config(QWEN25_05B)
    assert family == "qwen2" and qwen.attention_bias and qwen.tie_embeddings
    assert (qwen.num_heads, qwen.num_kv_heads, qwen.head_dim, qwen.rope_theta) == (14, 2, 64, 1e6)
    assert models.param_count(qwen) == 494_032_768  # Qwen2.5-0.5B's published count
    llama32 = {**TINYLLAMA, "rope_scaling": {"factor": 32.0, "rope_type": "llama3"}}
    with pytest.raises(ValueError, match="rope_scaling"):
        _hf_config.parse_config(llama32)


@pytest.mark.slow
def test_launch_starts_from_a_hf_checkpoint(tmp_path):
    """`--config.model.init_from_hf=DIR` through the real command line: SFT then DPO from a tiny Llama."""
    import subprocess
    import sys

    from rlhf_jax.data import synthetic_tldr
    from rlhf_jax.data.tokenizer import get_or_train_tokenizer

    splits = synthetic_tldr.generate_splits(num_sft=64, num_pref=96, num_eval=8)
    tok = get_or_train_tokenizer("", synthetic_tldr.corpus(splits), 1536, str(tmp_path / "tok"))
    config = transformers.LlamaConfig(
        vocab_size=1600, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(str(hf_dir), safe_serialization=True)
    (hf_dir / "tokenizer.model").write_bytes(tok.model_proto)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "launch.train", "--experiment=dpo_tldr:smoke", f"--workdir={tmp_path / 'run'}",
         f"--config.model.init_from_hf={hf_dir}", "--config.progress=false"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "V=1600" in out.stdout  # the checkpoint's embedding, not the tokenizer's 1536 ids
    model_json = json.loads(open(os.path.join(stage_dir(tmp_path / "run", "sft"), "model.json")).read())
    assert model_json["d_model"] == 64 and model_json["num_kv_heads"] == 2
    # SFT from the imported weights learns: its held-out NLL falls below the imported model's own, which
    # the same SFT with zero steps evaluates (7.41 to 7.16 nats in the six smoke steps; no change at a
    # learning rate of 1e-12).
    zero = tmp_path / "zero"
    untrained = subprocess.run(
        [sys.executable, "-m", "launch.train", "--experiment=sft_tldr:smoke", f"--workdir={zero}",
         f"--config.model.init_from_hf={hf_dir}", "--config.progress=false", "--config.train.steps=0"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert untrained.returncode == 0, untrained.stderr[-3000:]
    initial = json.loads(open(os.path.join(stage_dir(zero, "sft"), "results.json")).read())[
        "eval_nll_per_token"
    ]
    sft_path = os.path.join(stage_dir(tmp_path / "run", "sft"), "results.json")
    trained = json.loads(open(sft_path).read())["eval_nll_per_token"]
    assert trained < initial - 0.1, (trained, initial)
    bad = subprocess.run(
        [sys.executable, "-m", "launch.train", "--experiment=sft_tldr:smoke", f"--workdir={tmp_path / 'bad'}",
         f"--config.model.init_from_hf={hf_dir}", "--config.model.mlp_dim=128"],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "cannot be set with init_from_hf" in bad.stderr
