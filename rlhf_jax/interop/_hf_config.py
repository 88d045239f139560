"""HuggingFace `config.json` <-> `ModelConfig`, for the Llama, Qwen2 and Gemma (1) families.

Every key of a config.json is accounted for: it maps to a ModelConfig field, it is metadata with no effect
on the forward pass (token ids, dtype, versions), or it must have the one value our model implements
(e.g. `rope_scaling` null, `attention_bias` false for Llama). Anything else, including a key this module
has never heard of, raises a ValueError naming the key, so a checkpoint is never loaded into a model that
computes something different. Absent keys take the defaults of the family's transformers config class
(older transformers omit keys equal to the default when saving).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_jax.models.config import ModelConfig

# family -> (architecture class, defaults of the transformers config class for absent keys).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
    )),
    "qwen2": ("Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
    )),
    "gemma": ("GemmaForCausalLM", dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
    )),
}  # fmt: skip

# Families that transformers has and we know we cannot represent, with what is missing.
_UNSUPPORTED = {
    "gemma2": "Gemma 2 needs attn_logit_softcapping, final_logit_softcapping, sliding-window layers "
    "(sliding_window, layer_types), query_pre_attn_scalar and pre/post feed-forward norms",
    "gemma3": "Gemma 3 needs sliding-window layers, q/k norms and dual rope_theta",
    "gemma3_text": "Gemma 3 needs sliding-window layers, q/k norms and dual rope_theta",
    "mistral": "Mistral needs sliding_window attention",
    "qwen3": "Qwen3 needs q/k RMSNorms (q_norm, k_norm)",
    "phi3": "Phi-3 fuses qkv_proj and gate_up_proj and uses partial rotary embeddings",
}

# Keys with no effect on the forward pass (PretrainedConfig bookkeeping, generation defaults, token ids).
_METADATA = frozenset(
    """
architectures model_type transformers_version torch_dtype dtype use_cache initializer_range
bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id tokenizer_class
return_dict output_hidden_states output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads
chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention tie_encoder_decoder
cross_attention_hidden_size finetuning_task id2label label2id num_labels problem_type task_specific_params
prefix max_length min_length do_sample early_stopping num_beams num_beam_groups diversity_penalty
temperature top_k top_p typical_p repetition_penalty length_penalty no_repeat_ngram_size
encoder_no_repeat_ngram_size bad_words_ids num_return_sequences output_scores return_dict_in_generate
forced_bos_token_id forced_eos_token_id remove_invalid_values exponential_decay_length_penalty
suppress_tokens begin_suppress_tokens
""".split()
)

_SHAPE_KEYS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
    "head_dim hidden_act max_position_embeddings rms_norm_eps tie_word_embeddings rope_theta rope_scaling "
    "rope_parameters partial_rotary_factor attention_dropout"
).split()
_FAMILY_KEYS = {
    "llama": ("attention_bias", "mlp_bias", "pretraining_tp"),
    "qwen2": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "use_mrope"),
    "gemma": ("attention_bias", "hidden_activation", "use_bidirectional_attention"),
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}


def _fail(where: str, key: str, value, why: str) -> ValueError:
    return ValueError(f"{where}: config field {key}={value!r} is not supported: {why}")


def family_of(hf: dict, where: str = "config.json") -> str:
    """The family ("llama", "qwen2", "gemma") of a parsed config.json; raises ValueError otherwise."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type in _UNSUPPORTED:
        raise ValueError(
            f"{where}: model_type={model_type!r} (architectures {archs}) is not supported: "
            f"{_UNSUPPORTED[model_type]}, which rlhf_jax.models does not implement. Supported: {_supported()}"
        )
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type={model_type!r} (architectures {archs}) is not supported; "
                         f"supported: {_supported()}")  # fmt: skip
    arch = FAMILIES[model_type][0]
    if archs and archs != [arch]:
        raise _fail(where, "architectures", archs, f"only [{arch!r}] (a causal LM with its LM head) is read")
    return model_type


def _supported() -> str:
    return ", ".join(f"{f} ({arch})" for f, (arch, _) in FAMILIES.items())


def _rope(hf: dict, theta: float, where: str, family: str) -> tuple[float, tuple]:
    """(rope_theta, rope_scaling) from the old (`rope_theta`, `rope_scaling`) or new (`rope_parameters`)
    layout: plain RoPE ("default"), or Llama 3.1's "llama3" frequency scaling (Llama family only;
    `ModelConfig.rope_scaling`)."""
    why = "rlhf_jax.models applies plain RoPE or Llama 3.1's llama3 scaling (rope_type 'default' / 'llama3')"
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling = ()
    for field in ("rope_scaling", "rope_parameters"):
        params = hf.get(field)
        if params is None:
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        extra = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
        if kind == "llama3" and family == "llama":
            if any(k not in params for k in keys) or extra - set(keys):
                raise _fail(where, field, params, f"llama3 scaling needs exactly {list(keys)}")
            scaling = tuple(sorted({**{k: params[k] for k in keys}, "rope_type": "llama3"}.items()))
        elif kind != "default" or extra:
            raise _fail(where, field, params, why)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _fail(where, field, params, "rotary covers the whole head")
        theta = params.get("rope_theta", theta)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _fail(
            where, "partial_rotary_factor", hf["partial_rotary_factor"], "rotary covers the whole head"
        )
    return float(theta), scaling


def parse_config(hf: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """Validates a config.json dict and returns (ModelConfig, family).

    Args:
      hf: the parsed config.json.
      where: the file, for error messages.

    Returns:
      The architecture (param_dtype and dtype float32, other runtime fields at their defaults) and the
      family name.

    Raises:
      ValueError: naming the model_type or config field that rlhf_jax.models does not implement.
    """
    family = family_of(hf, where)
    known = set(_SHAPE_KEYS) | set(_FAMILY_KEYS[family]) | _METADATA
    unknown = sorted(k for k in hf if k not in known and not k.startswith("_"))
    if unknown:
        raise ValueError(
            f"{where}: config fields {unknown} are not known to the {family} importer, so it cannot tell "
            "whether they change the model; refusing rather than risking a silent mis-load"
        )
    c = {**FAMILIES[family][1], **{k: v for k, v in hf.items() if v is not None or k == "rope_scaling"}}

    def must(key: str, allowed: tuple, why: str) -> None:
        if hf.get(key) not in allowed:
            raise _fail(where, key, hf.get(key), why)

    must("attention_dropout", (None, 0, 0.0), "training-time attention dropout is not implemented")
    act_key = "hidden_act"
    if family == "llama":
        must("attention_bias", (None, False), "Llama's attention_bias adds an o_proj bias we do not have")
        must("mlp_bias", (None, False), "the MLP has no biases")
    elif family == "qwen2":
        must("use_mrope", (None, False), "multimodal rotary embeddings are not implemented")
        sliding = [t for t in c.get("layer_types") or [] if t != "full_attention"]
        if sliding:
            raise _fail(where, "layer_types", c["layer_types"], "sliding-window attention is not implemented")
        if c.get("use_sliding_window") and c.get("max_window_layers", 28) < c["num_hidden_layers"]:
            raise _fail(where, "use_sliding_window", True, "sliding-window attention is not implemented")
    else:
        must("attention_bias", (None, False), "Gemma's attention_bias adds q/k/v/o biases; o_proj has none")
        must("use_bidirectional_attention", (None, False), "the model is causal")
        if c.get("hidden_activation") is not None:
            act_key = "hidden_activation"  # transformers 4.x reads this key for Gemma, not hidden_act
        elif c["hidden_act"] == "gelu":
            c["hidden_act"] = "gelu_pytorch_tanh"  # the legacy value of the Gemma releases means tanh GELU
    if c[act_key] not in _ACTIVATIONS:
        raise _fail(where, act_key, c[act_key], f"the gated MLP supports {sorted(_ACTIVATIONS)}")

    heads = c["num_attention_heads"]
    theta, scaling = _rope(hf, c["rope_theta"], where, family)
    config = ModelConfig(
        vocab_size=c["vocab_size"],
        num_layers=c["num_hidden_layers"],
        d_model=c["hidden_size"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        mlp_dim=c["intermediate_size"],
        max_len=c["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(c["rms_norm_eps"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        attention_bias=family == "qwen2",
        embed_scale=family == "gemma",
        mlp_activation=_ACTIVATIONS[c[act_key]],
    )
    return config, family


def infer_family(config: ModelConfig) -> str:
    """The family for `config`: qwen2 with q/k/v biases, gemma with sqrt(D) embedding scale, else llama."""
    return "qwen2" if config.attention_bias else "gemma" if config.embed_scale else "llama"


def build_config(
    config: ModelConfig, family: str, dtype: str, base: dict | None = None, extra: dict | None = None
) -> dict:
    """The config.json of `config` as a `family` checkpoint.

    Args:
      config: the architecture.
      family: "llama", "qwen2" or "gemma".
      dtype: the stored dtype ("float32" or "bfloat16").
      base: a source config.json whose metadata (token ids, ...) and max_position_embeddings are kept.
      extra: keys to set last (e.g. token ids of the tokenizer shipped with the export).

    Returns:
      The config dict, loadable by transformers 4.x (`rope_theta`, `torch_dtype`) and 5.x
      (`rope_parameters`, `dtype`).

    Raises:
      ValueError: if the family cannot represent `config`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {_supported()}")
    wants = {"llama": (False, False), "qwen2": (True, False), "gemma": (False, True)}[family]
    if config.rope_scaling and family != "llama":
        raise ValueError(
            f"family {family!r} has no llama3 rope scaling; the model has {dict(config.rope_scaling)}"
        )
    if (config.attention_bias, config.embed_scale) != wants:
        raise ValueError(
            f"family {family!r} needs attention_bias={wants[0]} and embed_scale={wants[1]}, the model has "
            f"attention_bias={config.attention_bias}, embed_scale={config.embed_scale}; "
            f"use family={infer_family(config)!r}"
        )
    c = config
    out = {k: v for k, v in (base or {}).items() if k in _METADATA or k.startswith("_")}
    out.update(
        architectures=[FAMILIES[family][0]],
        model_type=family,
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        hidden_act={"silu": "silu", "gelu": "gelu_pytorch_tanh"}[c.mlp_activation],
        # The trained context of the source, not our max_len (the length this run used).
        max_position_embeddings=(base or {}).get("max_position_embeddings") or c.max_len,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        rope_theta=c.rope_theta,
        rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta, **dict(c.rope_scaling)},
        attention_dropout=0.0,
        torch_dtype=dtype,
        dtype=dtype,
    )
    if family in ("llama", "gemma"):
        out["attention_bias"] = False
    if family == "llama":
        out["mlp_bias"] = False
    if family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
        out["layer_types"] = ["full_attention"] * c.num_layers
    out.update(extra or {})
    parse_config(out, "exported config")  # what we write must read back as the same architecture
    return dict(sorted(out.items()))


def runtime_overrides(config: ModelConfig, overrides: dict) -> ModelConfig:
    """`config` with runtime fields replaced; architecture fields are fixed by the checkpoint."""
    allowed = {"param_dtype", "dtype", "remat", "scan_layers", "attention_impl", "max_len"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(
            f"ModelConfig fields {bad} are fixed by the checkpoint's config.json; only {sorted(allowed)} "
            "may be overridden"
        )
    return dataclasses.replace(config, **overrides)
