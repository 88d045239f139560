"""HuggingFace `config.json` <-> `ModelConfig`, for the Llama (2, 3, 3.1 with llama3 rope scaling),
Mistral, Qwen2/2.5, Qwen3, Gemma 1, Gemma 2 and Gemma 3 (text) families.

Every key of a config.json is accounted for: it maps to a ModelConfig field, it is metadata with no effect
on the forward pass (token ids, dtype, versions), or it must have the one value our model implements
(e.g. `attention_bias` false for Llama, `attn_logit_softcapping` null for Gemma 3, whose transformers
code never applies it). Anything else, including a key this module has never heard of, raises a
ValueError naming the key, so a checkpoint is never loaded into a model that computes something
different. Absent keys take the defaults of the family's transformers config class (older transformers
omit keys equal to the default when saving).

What each family adds to the Llama layout (`ModelConfig` fields):
  qwen2        q/k/v biases (attention_bias).
  qwen3        q/k RMSNorms over the head dimension before RoPE (qk_norm).
  mistral      a sliding window on every layer (sliding_window; null: none).
  gemma        sqrt(D) embedding scale, GeGLU, (1 + w) RMSNorms (stored as w + 1), tied embeddings.
  gemma2       gemma's, plus sandwich norms, query_pre_attn_scalar, attention and final-logit
               soft-capping, and sliding-window layers (layer_types, or the even/odd rule of older
               configs: layer i slides when i is even).
  gemma3_text  gemma2's without attention soft-capping, plus (1 + w) q/k norms, a local rotary base for
               the sliding layers (rope_local_base_freq) and linear rope scaling of the global ones;
               layer_types, or every `sliding_window_pattern`-th layer global (default 6).
Sliding windows in Qwen2/Qwen3 (use_sliding_window), Phi-3 and the multimodal Gemma 3 are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_jax.models.config import ModelConfig, sliding_layers

_GEMMA_SHAPE = dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True)
# family (= model_type) -> (architecture class, defaults of the transformers config class for absent keys).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
    )),
    "mistral": ("MistralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
        sliding_window=4096,
    )),
    "qwen2": ("Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
    )),
    "qwen3": ("Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
    )),
    "gemma": ("GemmaForCausalLM", dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0,
    )),
    "gemma2": ("Gemma2ForCausalLM", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
        rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0, **_GEMMA_SHAPE,
    )),
    "gemma3_text": ("Gemma3ForCausalLM", dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
        sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
        sliding_window_pattern=6, **_GEMMA_SHAPE,
    )),
}  # fmt: skip
_GEMMAS = ("gemma", "gemma2", "gemma3_text")  # (1 + w) RMSNorms, sqrt(D) embedding scale, hidden_activation

# Families that transformers has and we know we cannot represent, with what is missing.
_UNSUPPORTED = {
    "gemma3": "the multimodal Gemma 3 (Gemma3ForConditionalGeneration: a vision tower and a nested "
    "text_config) is not a causal LM checkpoint; the text-only gemma3_text (Gemma3ForCausalLM) is read",
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
suppress_tokens begin_suppress_tokens cache_implementation
""".split()
)

_SHAPE_KEYS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
    "head_dim hidden_act max_position_embeddings rms_norm_eps tie_word_embeddings rope_theta rope_scaling "
    "rope_parameters partial_rotary_factor attention_dropout"
).split()
_GEMMA2_KEYS = (
    "attention_bias", "hidden_activation", "use_bidirectional_attention", "query_pre_attn_scalar",
    "sliding_window", "layer_types", "final_logit_softcapping", "attn_logit_softcapping",
)  # fmt: skip
_FAMILY_KEYS = {
    "llama": ("attention_bias", "mlp_bias", "pretraining_tp"),
    "mistral": ("sliding_window",),
    "qwen2": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "use_mrope"),
    "qwen3": ("attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
    "gemma": ("attention_bias", "hidden_activation", "use_bidirectional_attention"),
    "gemma2": _GEMMA2_KEYS,
    "gemma3_text": (*_GEMMA2_KEYS, "rope_local_base_freq", "sliding_window_pattern"),
}
# Keys whose explicit null means something (no window, no cap) rather than "the default".
_NULLABLE = ("rope_scaling", "sliding_window", "final_logit_softcapping", "attn_logit_softcapping")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
_ROPE_WHY = "rlhf_jax.models applies plain RoPE, Llama 3.1's llama3 scaling or Gemma 3's linear scaling"
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _fail(where: str, key: str, value, why: str) -> ValueError:
    return ValueError(f"{where}: config field {key}={value!r} is not supported: {why}")


def family_of(hf: dict, where: str = "config.json") -> str:
    """The family (its model_type: "llama", "qwen3", "gemma2", ...) of a parsed config.json; raises
    ValueError otherwise."""
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


def _scaling(params: dict, field: str, where: str, allowed: tuple[str, ...]) -> tuple:
    """`ModelConfig.rope_scaling` of one rope_scaling / rope_parameters dict (its rope_theta aside)."""
    kind = params.get("rope_type", params.get("type", "default"))
    extra = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _fail(where, field, params, "rotary covers the whole head")
    if kind == "default" and not extra:
        return ()
    if kind == "llama3" and "llama3" in allowed:
        if any(k not in params for k in _LLAMA3_KEYS) or extra - set(_LLAMA3_KEYS):
            raise _fail(where, field, params, f"llama3 scaling needs exactly {list(_LLAMA3_KEYS)}")
        return tuple(sorted({**{k: params[k] for k in _LLAMA3_KEYS}, "rope_type": "llama3"}.items()))
    if kind == "linear" and "linear" in allowed:
        if extra != {"factor"}:
            raise _fail(where, field, params, "linear scaling needs exactly ['factor']")
        return (("factor", params["factor"]), ("rope_type", "linear"))
    raise _fail(where, field, params, f"{_ROPE_WHY}; this family takes rope_type 'default' or {allowed}")


def _rope(hf: dict, c: dict, where: str, family: str) -> tuple[float, tuple, float | None]:
    """(rope_theta, rope_scaling, local_rope_theta) from the old (`rope_theta`, `rope_scaling`,
    `rope_local_base_freq`) or new (`rope_parameters`; per layer type for Gemma 3) layout."""
    allowed = {"llama": ("llama3",), "gemma3_text": ("linear",)}.get(family, ())
    theta, scaling, local = c["rope_theta"], (), c.get("rope_local_base_freq")
    if hf.get("rope_scaling") is not None:
        scaling = _scaling(hf["rope_scaling"], "rope_scaling", where, allowed)
    params = hf.get("rope_parameters")
    if (
        params is not None
        and family == "gemma3_text"
        and set(params) <= {"full_attention", "sliding_attention"}
    ):
        full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        scaling = _scaling(full, "rope_parameters.full_attention", where, allowed)
        _scaling(sliding, "rope_parameters.sliding_attention", where, ())
        theta, local = full.get("rope_theta", theta), sliding.get("rope_theta", local)
    elif params is not None:
        scaling = _scaling(params, "rope_parameters", where, allowed)
        theta = params.get("rope_theta", theta)
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _fail(
            where, "partial_rotary_factor", hf["partial_rotary_factor"], "rotary covers the whole head"
        )
    return float(theta), scaling, None if local is None else float(local)


def _layer_types(c: dict, family: str, where: str) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) of the ModelConfig: Mistral slides on every layer (layer_types
    None), Gemma 2/3 on the layers of `layer_types` (or of their config class's rule when it is absent)."""
    L, window = c["num_hidden_layers"], c.get("sliding_window")
    if family == "mistral":
        return window, None
    if family not in ("gemma2", "gemma3_text"):
        return None, None
    types = c.get("layer_types")
    if types is None:
        # transformers' rule: layer i is global when (i + 1) % pattern == 0 (pattern 2 for Gemma 2).
        pattern = 2 if family == "gemma2" else c["sliding_window_pattern"]
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(L)]
    if len(types) != L or set(types) - {"full_attention", "sliding_attention"}:
        raise _fail(where, "layer_types", types, f"one of full_attention / sliding_attention per layer ({L})")
    return window, tuple(types)


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
    c = {**FAMILIES[family][1], **{k: v for k, v in hf.items() if v is not None or k in _NULLABLE}}

    def must(key: str, allowed: tuple, why: str) -> None:
        if hf.get(key) not in allowed:
            raise _fail(where, key, hf.get(key), why)

    must("attention_dropout", (None, 0, 0.0), "training-time attention dropout is not implemented")
    act_key = "hidden_activation" if family in ("gemma2", "gemma3_text") else "hidden_act"
    if family == "llama":
        must("attention_bias", (None, False), "Llama's attention_bias adds an o_proj bias we do not have")
        must("mlp_bias", (None, False), "the MLP has no biases")
    elif family in ("qwen2", "qwen3"):
        if family == "qwen2":
            must("use_mrope", (None, False), "multimodal rotary embeddings are not implemented")
        else:
            must("attention_bias", (None, False), "Qwen3's attention_bias adds an o_proj bias we do not have")
        sliding = [t for t in c.get("layer_types") or [] if t != "full_attention"]
        if sliding:
            raise _fail(where, "layer_types", c["layer_types"], "sliding-window attention is not implemented "
                        f"for {family} (it is for mistral, gemma2 and gemma3_text)")  # fmt: skip
        if c.get("use_sliding_window") and c.get("max_window_layers", 28) < c["num_hidden_layers"]:
            raise _fail(where, "use_sliding_window", True, f"sliding-window attention is not implemented "
                        f"for {family} (it is for mistral, gemma2 and gemma3_text)")  # fmt: skip
    elif family in _GEMMAS:
        must("attention_bias", (None, False), "Gemma's attention_bias adds q/k/v/o biases; o_proj has none")
        must("use_bidirectional_attention", (None, False), "the model is causal")
        if family == "gemma3_text":
            why = "Gemma 3's transformers code never soft-caps attention scores; a cap would change our model"
            must("attn_logit_softcapping", (None,), why)
        if family == "gemma" and c.get("hidden_activation") is not None:
            act_key = "hidden_activation"  # transformers 4.x reads this key for Gemma, not hidden_act
        elif family == "gemma" and c["hidden_act"] == "gelu":
            c["hidden_act"] = "gelu_pytorch_tanh"  # the legacy value of the Gemma releases means tanh GELU
    if c[act_key] not in _ACTIVATIONS:
        raise _fail(where, act_key, c[act_key], f"the gated MLP supports {sorted(_ACTIVATIONS)}")

    heads = c["num_attention_heads"]
    theta, scaling, local_theta = _rope(hf, c, where, family)
    window, layer_types = _layer_types(c, family, where)
    sandwich = family in ("gemma2", "gemma3_text")
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
        embed_scale=family in _GEMMAS,
        mlp_activation=_ACTIVATIONS[c[act_key]],
        qk_norm=family in ("qwen3", "gemma3_text"),
        sandwich_norms=sandwich,
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]) if sandwich else None,
        attn_softcap=_float_or_none(c.get("attn_logit_softcapping")),
        final_softcap=_float_or_none(c.get("final_logit_softcapping")),
        sliding_window=window,
        layer_types=layer_types,
        local_rope_theta=local_theta if family == "gemma3_text" else None,
    )
    return config, family


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _float_or_none(x) -> float | None:
    return None if x is None else float(x)


def infer_family(config: ModelConfig) -> str:
    """The family for `config`: gemma3_text with q/k norms and sandwich norms, gemma2 with sandwich norms,
    qwen3 with q/k norms, qwen2 with q/k/v biases, gemma with sqrt(D) embedding scale, mistral with a
    sliding window, else llama."""
    if config.sandwich_norms:
        return "gemma3_text" if config.qk_norm else "gemma2"
    if config.qk_norm:
        return "qwen3"
    if config.attention_bias:
        return "qwen2"
    if config.embed_scale:
        return "gemma"
    return "mistral" if config.sliding_window is not None else "llama"


# family -> the ModelConfig fields that identify it, and their values.
_SIGNATURES = {
    "llama": dict(attention_bias=False, embed_scale=False, qk_norm=False, sandwich_norms=False),
    "mistral": dict(attention_bias=False, embed_scale=False, qk_norm=False, sandwich_norms=False),
    "qwen2": dict(attention_bias=True, embed_scale=False, qk_norm=False, sandwich_norms=False),
    "qwen3": dict(attention_bias=False, embed_scale=False, qk_norm=True, sandwich_norms=False),
    "gemma": dict(attention_bias=False, embed_scale=True, qk_norm=False, sandwich_norms=False),
    "gemma2": dict(attention_bias=False, embed_scale=True, qk_norm=False, sandwich_norms=True),
    "gemma3_text": dict(attention_bias=False, embed_scale=True, qk_norm=True, sandwich_norms=True),
}
# family -> the optional ModelConfig features it can hold (each None / () / False when absent).
_FEATURES = {
    "llama": ("rope_scaling",),
    "mistral": ("sliding_window",),
    "gemma2": ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window", "layer_types"),
    "gemma3_text": (
        "query_pre_attn_scalar",
        "final_softcap",
        "sliding_window",
        "layer_types",
        "local_rope_theta",
        "rope_scaling",
    ),  # fmt: skip
}
_OPTIONAL = ("rope_scaling", "query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window",
             "layer_types", "local_rope_theta")  # fmt: skip


def _check_representable(config: ModelConfig, family: str) -> None:
    """Raises ValueError when `family`'s config.json cannot describe `config`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {_supported()}")
    wants = _SIGNATURES[family]
    has = {k: getattr(config, k) for k in wants}
    if has != wants:
        raise ValueError(
            f"family {family!r} needs {wants}, the model has {has}; use family={infer_family(config)!r}"
        )
    features = _FEATURES.get(family, ())
    extra = {k: getattr(config, k) for k in _OPTIONAL if k not in features and getattr(config, k)}
    if extra:
        raise ValueError(f"family {family!r} cannot represent the model's {extra}")
    kind = dict(config.rope_scaling).get("rope_type")
    if kind is not None and kind != {"llama": "llama3", "gemma3_text": "linear"}[family]:
        raise ValueError(
            f"family {family!r} has no {kind} rope scaling; the model has {dict(config.rope_scaling)}"
        )
    if family == "gemma3_text" and config.rope_scaling and config.local_rope_theta is None:
        raise ValueError("family 'gemma3_text' scales the global layers' RoPE only; the model scales every "
                         "layer's (rope_scaling without local_rope_theta)")  # fmt: skip
    if (
        family == "mistral"
        and config.layer_types is not None
        and set(config.layer_types) != {"sliding_attention"}
    ):
        raise ValueError(
            f"family 'mistral' slides on every layer; the model has layer_types={config.layer_types}"
        )


_RUNTIME = (
    "param_dtype", "dtype", "remat", "scan_layers", "scan_unroll", "attention_impl", "decode_attention",
    "max_len",
)  # fmt: skip


def _architecture(config: ModelConfig) -> dict:
    """The fields that fix what the model computes, with equivalent spellings made equal."""
    out = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RUNTIME}
    out["layer_types"] = sliding_layers(config)
    out["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.head_dim
    out["local_rope_theta"] = config.local_rope_theta or config.rope_theta
    return out


def build_config(
    config: ModelConfig, family: str, dtype: str, base: dict | None = None, extra: dict | None = None
) -> dict:
    """The config.json of `config` as a `family` checkpoint.

    Args:
      config: the architecture.
      family: one of `FAMILIES` ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text").
      dtype: the stored dtype ("float32" or "bfloat16").
      base: a source config.json whose metadata (token ids, ...) and max_position_embeddings are kept.
      extra: keys to set last (e.g. token ids of the tokenizer shipped with the export).

    Returns:
      The config dict, loadable by transformers 4.x (`rope_theta`, `torch_dtype`) and 5.x
      (`rope_parameters`, `dtype`).

    Raises:
      ValueError: if the family cannot represent `config`.
    """
    _check_representable(config, family)
    c = config
    out = {k: v for k, v in (base or {}).items() if k in _METADATA or k.startswith("_")}
    out.pop("_sliding_window_pattern", None)  # layer_types below says which layers slide
    act = {"silu": "silu", "gelu": "gelu_pytorch_tanh"}[c.mlp_activation]
    rope = {"rope_type": "default", "rope_theta": c.rope_theta, **dict(c.rope_scaling)}
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
        hidden_act=act,
        # The trained context of the source, not our max_len (the length this run used).
        max_position_embeddings=(base or {}).get("max_position_embeddings") or c.max_len,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings,
        rope_theta=c.rope_theta,
        rope_scaling=dict(c.rope_scaling) if c.rope_scaling else None,
        rope_parameters=rope,
        attention_dropout=0.0,
        torch_dtype=dtype,
        dtype=dtype,
    )
    if family in ("llama", "qwen3") or family in _GEMMAS:
        out["attention_bias"] = False
    if family == "llama":
        out["mlp_bias"] = False
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
        out["layer_types"] = ["full_attention"] * c.num_layers
    if family == "mistral":
        out["sliding_window"] = c.sliding_window
    if family in ("gemma2", "gemma3_text"):
        types = (
            c.layer_types or ["sliding_attention" if c.sliding_window else "full_attention"] * c.num_layers
        )
        out.pop("hidden_act")
        out.update(
            hidden_activation=act,
            use_bidirectional_attention=False,
            query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar or c.head_dim),  # an int field in 5.x
            sliding_window=c.sliding_window,
            layer_types=list(types),
            final_logit_softcapping=c.final_softcap,
            attn_logit_softcapping=c.attn_softcap,
        )
    if family == "gemma3_text":
        local = c.rope_theta if c.local_rope_theta is None else c.local_rope_theta
        out.update(
            rope_local_base_freq=local,
            rope_parameters={
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
            },
        )
    out.update(extra or {})
    parsed, _ = parse_config(out, "exported config")  # what we write must read back as the architecture
    if _architecture(parsed) != _architecture(c):
        raise ValueError(f"the {family} config.json written for {c} reads back as {parsed}")
    return dict(sorted(out.items()))


def runtime_overrides(config: ModelConfig, overrides: dict) -> ModelConfig:
    """`config` with runtime fields replaced; architecture fields are fixed by the checkpoint."""
    allowed = {
        "param_dtype", "dtype", "remat", "scan_layers", "attention_impl", "decode_attention", "max_len",
    }  # fmt: skip
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(
            f"ModelConfig fields {bad} are fixed by the checkpoint's config.json; only {sorted(allowed)} "
            "may be overridden"
        )
    return dataclasses.replace(config, **overrides)
