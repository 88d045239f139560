"""Qwen3, Mistral, Gemma 2 and Gemma 3 (text): parity with transformers on tiny random models, export,
refusals, and the sliding-window / soft-capping model features in the sampler and the fused log-probs.

Tolerances: imported float32 logits match PyTorch's to LOGITS_ATOL = 1e-4 absolute (measured: at most
~6e-6 on logits of order 3-6; both sides float32, differing only in reduction order and rotary angles);
transformers reloading our export reproduces its own logits to RELOAD_ATOL = 1e-5; export then import is
bit-exact. Sampler vs trainer log-probs: 1e-4 on sums of <= 8 tokens (tests/test_sampling.py's bound).
The tiny models have 3 layers, a window of 4 and 12-16 token sequences, so sliding and global layers,
local and global rotary tables, and keys outside the window all occur.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from random_params import random_params

from rlhf_jax import interop, lora, losses, models, sampling, scoring, sharding
from rlhf_jax.interop import _hf_config
from rlhf_jax.models import layers
from rlhf_jax.pipelines import fingerprints
from rlhf_jax.train import steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.xdist_group("hf_families")

LOGITS_ATOL = 1e-4
RELOAD_ATOL = 1e-5
LOGP_ATOL = 1e-4
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
WINDOW = 4
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
}
HF_CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(
        **SHAPE, num_key_value_heads=2, head_dim=16, rope_theta=1e6, max_position_embeddings=64
    ),
    "mistral": lambda: transformers.MistralConfig(
        **SHAPE, num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=64
    ),
    # layer_types left to Gemma 2's default: sliding, full, sliding. Untied, so greedy decoding is not
    # dominated by the tied head's preference for repeating the input token.
    "gemma2": lambda: transformers.Gemma2Config(
        **SHAPE, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=8.0, tie_word_embeddings=False,
        max_position_embeddings=64,
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **SHAPE, num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
        final_logit_softcapping=8.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={k: dict(v) for k, v in GEMMA3_ROPE.items()}, max_position_embeddings=64,
    ),
}  # fmt: skip
GEMMAS = ("gemma2", "gemma3_text")


def _randomize(model, family: str) -> None:
    """Order-1 logits, norms away from their init ((1 + w) norms stay in [0.5, 2], where w + 1 - 1
    is exact, so the export round trip can be bit-exact)."""
    g = torch.Generator().manual_seed(0)
    gemma = family in GEMMAS
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.1 * r)
            elif "embed" in name:
                p.copy_((0.1 if gemma else 0.5) * r)
            else:
                p.copy_(r / p.shape[-1] ** 0.5 * (2.0 if gemma else 1.0))


def _torch_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens_BT.astype(np.int64))).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{family: (dir, torch model, torch logits of TOKENS)} of saved tiny random models."""
    out = {}
    for family, make in HF_CONFIGS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        _randomize(model, family)
        path = str(tmp_path_factory.mktemp(family))
        model.save_pretrained(path, safe_serialization=True)
        out[family] = (path, model, _torch_logits(model, TOKENS_BT))
    return out


TOKENS_BT = np.random.default_rng(0).integers(0, 128, size=(2, 12)).astype(np.int32)


def _import(path: str, **overrides):
    config = interop.load_config(path, **overrides)
    model = models.Transformer(config)
    return config, model, interop.import_params(path, model)


def _logits(model, params, tokens_BT=TOKENS_BT) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens_BT)))


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_logits_match_transformers(hf_dirs, family, scan_layers):
    path, _, torch_logits = hf_dirs[family]
    assert interop.family(path) == family
    config, model, params = _import(path, scan_layers=scan_layers)
    logits = _logits(model, params)
    diff = np.abs(logits - torch_logits).max()
    print(f"{family} scan_layers={scan_layers}: max |ours - transformers| = {diff:.2e}")
    np.testing.assert_allclose(logits, torch_logits, atol=LOGITS_ATOL, rtol=0)
    assert np.abs(torch_logits).max() > 1.0  # the comparison is not vacuous


# Each family feature, switched off, changes the logits: the parity above exercises all of them.
FEATURES_OFF = {
    "mistral": [dict(sliding_window=None)],
    "gemma2": [dict(sliding_window=None), dict(attn_softcap=None), dict(final_softcap=None),
               dict(query_pre_attn_scalar=None)],
    "gemma3_text": [dict(sliding_window=None), dict(local_rope_theta=None), dict(rope_scaling=()),
                    dict(final_softcap=None)],
}  # fmt: skip


@pytest.mark.parametrize("family", list(FEATURES_OFF))
def test_every_family_feature_matters(hf_dirs, family):
    path, _, torch_logits = hf_dirs[family]
    config, _, params = _import(path)
    for off in FEATURES_OFF[family]:
        other = _logits(models.Transformer(dataclasses.replace(config, **off)), params)
        assert np.abs(other - torch_logits).max() > 1e-3, off


def test_sharded_import_equals_single_device(hf_dirs):
    path = hf_dirs["gemma3_text"][0]  # one kv head: no tensor axis
    config, model, single = _import(path)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4, tensor=1))
    _assert_trees_equal(interop.import_params(path, model, mesh), single)


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_export_round_trips_and_reloads_in_transformers(hf_dirs, family, tmp_path):
    path, _, torch_logits = hf_dirs[family]
    config, model, params = _import(path)
    out = str(tmp_path / "export")
    interop.export_params(params, config, out, source=path)
    assert interop.family(out) == family  # inferred from the config
    assert interop.load_config(out) == config
    _assert_trees_equal(interop.import_params(out, model), params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(reloaded, TOKENS_BT), torch_logits, atol=RELOAD_ATOL, rtol=0)


def test_export_refuses_a_family_that_cannot_hold_the_model(hf_dirs, tmp_path):
    config = interop.load_config(hf_dirs["gemma2"][0])
    with pytest.raises(ValueError, match="family='gemma2'"):
        interop.export_params({}, config, str(tmp_path), family="gemma")
    mistral = interop.load_config(hf_dirs["mistral"][0])
    with pytest.raises(ValueError, match="sliding_window"):
        interop.export_params({}, mistral, str(tmp_path), family="llama")
    scaled_everywhere = dataclasses.replace(
        interop.load_config(hf_dirs["gemma3_text"][0]), local_rope_theta=None
    )
    with pytest.raises(ValueError, match="global layers"):
        _hf_config.build_config(scaled_everywhere, "gemma3_text", "float32")


# ------------------------------------------------------------------------------ config layouts


def _edited(src: str, dst, drop=(), **changes) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def test_legacy_gemma_configs_read_as_transformers_reads_them(hf_dirs, tmp_path):
    """Configs saved by transformers 4.x: Gemma 3's rope_theta / rope_local_base_freq / rope_scaling and
    sliding_window_pattern instead of per-layer-type rope_parameters and layer_types; Gemma 2 without
    layer_types (layer i slides when i is even)."""
    path, _, torch_logits = hf_dirs["gemma3_text"]
    legacy = _edited(
        path, tmp_path / "g3", drop=("rope_parameters", "layer_types", "_sliding_window_pattern"),
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0},
        sliding_window_pattern=2,
    )  # fmt: skip
    assert interop.load_config(legacy) == interop.load_config(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(legacy, attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(theirs, TOKENS_BT), torch_logits, atol=RELOAD_ATOL, rtol=0)
    path2 = hf_dirs["gemma2"][0]
    legacy2 = _edited(path2, tmp_path / "g2", drop=("layer_types", "rope_parameters"), rope_theta=10000.0)
    assert interop.load_config(legacy2) == interop.load_config(path2)
    assert interop.load_config(path2).layer_types == (
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    )


@pytest.mark.parametrize(
    "family, changes, named",
    [
        ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
        (
            "gemma3_text",
            dict(
                rope_parameters={
                    **GEMMA3_ROPE,
                    "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                }
            ),
            "rope_parameters",
        ),  # fmt: skip
        (
            "gemma3_text",
            dict(rope_parameters=None, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "rope_scaling",
        ),  # fmt: skip
        ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        (
            "gemma3_text",
            dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
            "gemma3",
        ),
        (
            "gemma2",
            dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            "rope_parameters",
        ),  # fmt: skip
        ("gemma2", dict(attention_bias=True), "attention_bias"),
        ("gemma2", dict(layer_types=["sliding_attention"]), "layer_types"),
        ("gemma2", dict(hidden_activation="relu"), "hidden_activation"),
        ("qwen3", dict(attention_bias=True), "attention_bias"),
        (
            "qwen3",
            dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, layer_types=None),
            "use_sliding_window",
        ),  # fmt: skip
        ("qwen3", dict(layer_types=["full_attention", "sliding_attention", "full_attention"]), "layer_types"),
        ("mistral", dict(layer_types=["sliding_attention"] * 3), "layer_types"),
        ("mistral", dict(model_type="phi3", architectures=["Phi3ForCausalLM"]), "phi3"),
    ],
)
def test_unsupported_config_field_is_named(hf_dirs, tmp_path, family, changes, named):
    path = _edited(hf_dirs[family][0], tmp_path / "edited", **changes)
    with pytest.raises(ValueError, match=named):
        interop.load_config(path)


# config.json of released checkpoints (as published; no weights needed).
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "model_type": "qwen3",
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "transformers_version": "4.42.4",
    "use_cache": True,
    "vocab_size": 256000,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912,
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
    "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}  # fmt: skip


@pytest.mark.parametrize("hf", [QWEN3_06B, MISTRAL_7B, GEMMA2_2B, GEMMA3_1B], ids=lambda c: c["model_type"])
def test_released_configs_parse_with_transformers_parameter_count(hf):
    config, family = _hf_config.parse_config(hf)
    assert family == hf["model_type"]
    theirs = transformers.CONFIG_MAPPING[family](**{k: v for k, v in hf.items() if k != "model_type"})
    with torch.device("meta"):  # shapes only
        model = transformers.AutoModelForCausalLM.from_config(theirs)
    assert models.param_count(config) == sum(p.numel() for p in model.parameters())
    types = theirs.layer_types if family in GEMMAS else None
    assert config.layer_types == (tuple(types) if types else None)
    if family == "mistral":
        assert models.param_count(config) == 7_241_732_096  # Mistral-7B's published count


# ------------------------------------------------------------------------------- model config


def test_model_config_fields_validate_and_keep_old_fingerprints():
    tiny = models.preset("tiny")
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(tiny, layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(tiny, layer_types=("sliding_attention", "local"))
    with pytest.raises(ValueError, match="sliding_window"):
        dataclasses.replace(tiny, sliding_window=0)
    with pytest.raises(ValueError, match="rope_scaling"):
        dataclasses.replace(tiny, rope_scaling=(("rope_type", "linear"),))
    g = dataclasses.replace(
        tiny, layer_types=["sliding_attention", "full_attention"], sliding_window=4, attn_softcap=5.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, local_rope_theta=1e4,
    )  # fmt: skip
    assert g.layer_types == ("sliding_attention", "full_attention")
    assert models.ModelConfig(**json.loads(json.dumps(dataclasses.asdict(g)))) == g  # model.json
    # New fields at their defaults stay out of the fingerprint, so earlier stages are still reused: a field
    # added to ModelConfig must be listed in `_MODEL_FIELDS_SINCE` (or this list changed on purpose,
    # which changes every stage's fingerprint).
    first = (
        "attention_bias",
        "attention_impl",
        "d_model",
        "dtype",
        "embed_scale",
        "head_dim",
        "max_len",
        "mlp_activation",
        "mlp_dim",
        "norm_eps",
        "num_heads",
        "num_kv_heads",
        "num_layers",
        "param_dtype",
        "remat",
        "rope_theta",
        "scan_layers",
        "scan_unroll",
        "tie_embeddings",
        "vocab_size",
    )
    assert set(fingerprints.model_spec(tiny)) == set(first)
    assert fingerprints.model_spec(g)["layer_types"] == ["sliding_attention", "full_attention"]


# ------------------------------------------------------------------- attention, sampler, log-probs


def _reference_attention(q, k, v, mask, scale, cap):
    """Plain softmax attention, autodiff'd: the reference for `causal_attention`'s custom VJP."""
    G = k.shape[2]
    k, v = jnp.repeat(k, q.shape[2] // G, axis=2), jnp.repeat(v, q.shape[2] // G, axis=2)
    s = jnp.einsum("BTHK,BSHK->BHTS", q, k) * scale
    s = cap * jnp.tanh(s / cap)
    T = q.shape[1]
    causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    s = jnp.where(causal[None, None] & mask, s, -jnp.inf)
    return jnp.einsum("BHTS,BSHK->BTHK", jax.nn.softmax(s, axis=-1), v)


def test_soft_capped_windowed_attention_and_its_gradient_match_a_plain_reference():
    rng = np.random.default_rng(0)
    B, T, H, G, K = 2, 16, 4, 2, 8
    q, k = 2.0 * rng.normal(size=(B, T, H, K)), 2.0 * rng.normal(size=(B, T, G, K))
    q, k, v, cot = (jnp.asarray(x, jnp.float32) for x in (q, k, rng.normal(size=(B, T, G, K)),
                                                          rng.normal(size=(B, T, H, K))))  # fmt: skip
    idx = np.arange(T)
    mask = jnp.asarray((idx[:, None] - idx[None, :]) < 5)[None, None]  # a window of 5
    ours = lambda q, k, v: jnp.sum(cot * layers.causal_attention(q, k, v, mask, 8, 0.3, 2.0))
    ref = lambda q, k, v: jnp.sum(cot * _reference_attention(q, k, v, mask, 0.3, 2.0))
    np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v), rtol=1e-5)
    grads = [jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v) for f in (ours, ref)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_fused_log_probs_apply_the_final_soft_cap(hf_dirs):
    """DPO/SFT log-probs through the fused head (`steps.sequence_logps`) are log_softmax of the
    soft-capped logits, transformers' own; gradients too; hidden_and_head refuses to drop the cap."""
    path, _, torch_logits = hf_dirs["gemma2"]
    config, model, params = _import(path)
    tokens, targets = TOKENS_BT[:, :-1], TOKENS_BT[:, 1:]
    mask = np.ones_like(tokens)
    mask[0, :3] = 0  # a prompt
    seg = np.ones_like(tokens)
    theirs = torch.log_softmax(torch.from_numpy(torch_logits[:, :-1]), -1).numpy()
    want = np.sum(np.take_along_axis(theirs, targets[..., None], -1)[..., 0] * mask, -1)
    fused = jax.jit(steps.sequence_logps, static_argnums=0)(model, params, tokens, targets, mask, seg)
    np.testing.assert_allclose(fused, want, atol=LOGP_ATOL, rtol=0)
    # Per-shard compaction (shards=2: each batch shard chunks its own rows) keeps the cap, values and grads.
    hidden, w, cap = model.apply({"params": params}, tokens, segment_ids_BT=seg, method="hidden_and_head",
                                 return_softcap=True)  # fmt: skip
    assert cap == config.final_softcap
    by_shards = lambda h, k, z: losses.sequence_logps_from_hidden(
        hidden=h, kernel=k, targets=targets, mask=mask, softcap=cap, shards=z)  # fmt: skip
    np.testing.assert_allclose(by_shards(hidden, w, 2), want, atol=LOGP_ATOL, rtol=0)
    g1, g2 = (
        jax.grad(lambda h, k, z=z: jnp.sum(by_shards(h, k, z)), argnums=(0, 1))(hidden, w) for z in (1, 2)
    )
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    batch = dict(tokens=tokens, targets=targets, loss_mask=mask.astype(np.float32), segment_ids=seg,
                 weights=np.ones(2, np.float32))  # fmt: skip
    nll, _ = jax.jit(lambda p, b: steps.sft_objective(p, b, None, model=model))(params, batch)
    np.testing.assert_allclose(nll, -want.sum(), atol=LOGP_ATOL, rtol=0)

    def via_logits(p):
        logits = model.apply({"params": p}, tokens, segment_ids_BT=seg)
        return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0] * mask)

    fused_sum = lambda p: jnp.sum(steps.sequence_logps(model, p, tokens, targets, mask, seg))
    g_fused, g_logits = jax.jit(jax.grad(fused_sum))(params), jax.jit(jax.grad(via_logits))(params)
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_logits), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="return_softcap"):
        model.apply({"params": params}, tokens, method="hidden_and_head")


GEMMA_STYLE = models.ModelConfig(
    vocab_size=128, num_layers=3, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96,
    max_len=64, rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_embeddings=True,
    embed_scale=True, mlp_activation="gelu", qk_norm=True, sandwich_norms=True, query_pre_attn_scalar=24.0,
    attn_softcap=5.0, final_softcap=8.0, sliding_window=WINDOW, local_rope_theta=1e4,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
)  # fmt: skip


def test_sampler_log_probs_equal_the_trainers_with_a_window_and_soft_caps():
    model = models.Transformer(GEMMA_STYLE)
    params = random_params(model, 0)
    rng = np.random.default_rng(0)
    P, T, N, NEW = 4, 6, 2, 8
    lengths = rng.integers(1, T + 1, P).astype(np.int32)
    prompts = np.where(np.arange(T) < lengths[:, None], rng.integers(3, 128, (P, T)), 0).astype(np.int32)
    out = sampling.sample(model, params, prompts, lengths, config=sampling.SamplingConfig(NEW),
                          num_samples=N, rng=jax.random.key(0), eos_id=None, pad_id=0)  # fmt: skip
    batch = scoring.completions_to_batch(prompts, lengths, out.tokens_PNT, out.lengths_PN, pad_id=0)
    keys = (batch["tokens"], batch["targets"], batch["loss_mask"], batch["segment_ids"])
    logps = jax.jit(steps.sequence_logps, static_argnums=0)
    np.testing.assert_allclose(out.logps_PN.reshape(-1), logps(model, params, *keys), atol=LOGP_ATOL)
    # Rows are longer than the window: without it the trainer's log-probs differ.
    unwindowed = models.Transformer(dataclasses.replace(GEMMA_STYLE, sliding_window=None))
    assert np.abs(out.logps_PN.reshape(-1) - logps(unwindowed, params, *keys)).max() > 1e-3


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_greedy_decoding_equals_transformers_generate(hf_dirs, family):
    path, theirs, _ = hf_dirs[family]
    P, T, NEW = 2, 5, 11  # 16 tokens, four windows
    prompts = np.random.default_rng(1).integers(3, 128, size=(P, T)).astype(np.int32)
    theirs.generation_config.eos_token_id = None  # generate exactly NEW tokens, as eos_id=None does
    gen = transformers.GenerationConfig(
        max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        want = theirs.generate(torch.from_numpy(prompts.astype(np.int64)), generation_config=gen).numpy()[
            :, T:
        ]
    config, model, params = _import(path)
    greedy = dict(config=sampling.SamplingConfig(NEW, greedy=True), num_samples=1, rng=jax.random.key(0),
                  eos_id=None, pad_id=0)  # fmt: skip
    got = sampling.sample(model, params, prompts, np.full(P, T, np.int32), **greedy).tokens_PNT[:, 0]
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > NEW  # not a degenerate repetition
    no_window = models.Transformer(dataclasses.replace(config, sliding_window=None))
    other = sampling.sample(no_window, params, prompts, np.full(P, T, np.int32), **greedy).tokens_PNT[:, 0]
    assert not np.array_equal(other, want)  # the window decides some tokens


def test_lora_runs_on_a_gemma_style_model():
    model = models.Transformer(GEMMA_STYLE)
    params = random_params(model, 1)
    lc = lora.LoRAConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    adapters = lora.init(params, lc, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    attached = _logits(model, lora.attach(params, adapters, lc))
    np.testing.assert_allclose(attached, _logits(model, lora.merge(params, adapters, lc)), atol=2e-5, rtol=0)
    assert np.abs(attached - _logits(model, params)).max() > 1e-2
