"""Model configuration: one frozen dataclass, named presets, and the exact parameter count.

The presets span CPU tests (``tiny``), the synthetic-task default (``small``) and the real scales used in
the papers we reproduce (``400m`` .. ``7b``, and ``t5_large_equiv``, a decoder-only stand-in for the
~770M T5-large policy of RSO, Liu et al. 2023). Every field can be overridden: ``preset("small",
vocab_size=tokenizer.vocab_size())``.
"""

import dataclasses

import jax.numpy as jnp

_REMAT = ("none", "full", "save_dots")
_ACTIVATIONS = ("silu", "gelu")
LAYER_TYPES = ("full_attention", "sliding_attention")


# The values of `ModelConfig.attention_impl` (see its docstring and `layers.attention_kernel`).
ATTENTION_IMPLS = (None, "xla", "cudnn", "auto", "cpu_ffi")
# The values of `ModelConfig.decode_attention` (see its docstring and `layers.decode_kernel`).
DECODE_ATTENTIONS = (None, "full", "bounded")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama/Gemma-family decoder-only transformer.

    Attributes:
      vocab_size: V, the tokenizer's vocabulary size.
      num_layers: L.
      d_model: D, the residual-stream width.
      num_heads: H, query heads.
      num_kv_heads: G, key/value heads (grouped-query attention; G == H is multi-head, 1 multi-query).
      head_dim: K; H * K need not equal D (Gemma-2B has 8 x 256 on D = 2048).
      mlp_dim: F, the hidden width of the gated MLP.
      max_len: longest sequence (prompt + response) the model is used with; the default KV-cache size.
      rope_theta: rotary-embedding base.
      rope_scaling: () for plain RoPE, or a frequency scaling as sorted (key, value) pairs: Llama 3.1's
        (rope_type "llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
        or linear position interpolation (rope_type "linear", factor: every frequency divided by it;
        Gemma 3's global layers) (`layers.rope_inv_freq`). With `local_rope_theta` set it applies to the
        global layers only. A list of pairs (as model.json stores it) is normalised to the tuple.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: the LM head reuses the input embedding (Gemma); otherwise a separate [D, V] kernel.
      param_dtype: storage dtype of the parameters ("float32" or "bfloat16").
      dtype: compute dtype of activations and matmuls; logits and log-probs are always float32.
      remat: rematerialisation of each layer in the backward pass: "none", "full" (recompute the whole
        layer) or "save_dots" (keep matmul outputs without batch dimensions, recompute the rest).
      scan_layers: run the layers under one `scan` (compile time independent of depth; parameters
        stacked with a leading L axis). False unrolls them (parameters `layers_0`, `layers_1`, ...);
        `transformer.stack_layers`/`unstack_layers` convert between the two layouts.
      scan_unroll: layers per iteration of that scan (`scan_layers=True` only). 1 keeps compile time flat
        in depth; `num_layers` unrolls the whole stack while keeping the stacked parameter layout, which
        lets XLA drop the scan's per-layer stacking of activations: faster CPU steps for the 4-8 layer
        benchmark models (bench/README.md), at a compile time that grows with depth. Keep 1 with `remat`:
        unrolled, XLA:CPU schedules the recomputation early and most of the memory saving is lost.
      attention_bias: biases on the q/k/v projections (Qwen2).
      embed_scale: multiply input embeddings by sqrt(D) (Gemma).
      mlp_activation: "silu" (SwiGLU, Llama) or "gelu" (GeGLU with tanh-approximate GELU, Gemma).
      attention_impl: the kernel of the uncached (training, scoring, prefill) attention, chosen per
        platform by `layers.attention_kernel`: None uses `layers.causal_attention` on the CPU
        (blockwise causal, the same maths, faster there: bench/README.md) and JAX's XLA attention
        elsewhere; "xla" forces JAX's; "cudnn" JAX's cuDNN flash attention (GPU); "auto" picks
        `causal_attention` on the CPU, cuDNN flash attention on a GPU (bf16 compute; XLA for
        float32, which cuDNN does not take), and the Pallas splash-attention kernel on a TPU (packed
        sequences by segment ids, scores soft-capped in the kernel; XLA when the model has sliding
        windows or the sequence is not a multiple of 128); "cpu_ffi" the optional native XLA:CPU kernel
        (`layers.cpu_ffi_attention`; build it first with `python -m rlhf_jax.kernels.build`) on the CPU
        with float32 compute and no soft-capping or sliding windows, else what None picks. With
        `attn_softcap` set the uncached forward uses `layers.causal_attention` except under splash (JAX's
        attention has no soft-capping).
      decode_attention: the attention over a KV cache (decoding, `extend`), chosen per platform by
        `layers.decode_kernel`: "full" reads every slot of the cache each step (one matmul per row and
        kv head over the whole buffer, masked: the fastest on the CPU, where the buffer is read at
        memory speed either way); "bounded" (`layers.bounded_cached_attention`) reads the cache in
        chunks of slots up to the batch's last filled slot, with an online softmax, so the empty tail
        of the buffer is never read (the TPU/GPU decode path: a decode step there is bound by the
        bytes of cache it reads); None: "full" on the CPU, "bounded" elsewhere.
      qk_norm: RMSNorm over the head dimension of every query and key head before RoPE, one scale
        [K] each for queries and keys (Qwen3, Gemma 3).
      sandwich_norms: RMSNorm also on the outputs of attention and MLP before they join the residual
        stream, x + post_norm(f(pre_norm(x))) (Gemma 2, Gemma 3).
      query_pre_attn_scalar: attention scores scaled by query_pre_attn_scalar^-1/2 instead of
        head_dim^-1/2 (Gemma 2, Gemma 3); None: head_dim.
      attn_softcap: soft-capping of the scaled attention scores, s -> c·tanh(s / c), before the mask
        and softmax (Gemma 2's attn_logit_softcapping); None: none.
      final_softcap: soft-capping of the output logits, z -> c·tanh(z / c) (Gemma 2's
        final_logit_softcapping), applied wherever logits or log-probs are computed (forward,
        sampler, the fused log-probs of `losses.sequence_logps_from_hidden`); None: none.
      sliding_window: W, the keys a query of a sliding-window layer sees: positions q - W + 1 .. q
        (transformers' `kv_idx > q_idx - sliding_window`); None: every layer attends to all earlier keys.
      layer_types: per layer, "sliding_attention" or "full_attention"; None: every layer is
        "sliding_attention" when `sliding_window` is set (Mistral), else "full_attention". A list is
        normalised to a tuple.
      local_rope_theta: the rotary base of the sliding-window layers (Gemma 3's rope_local_base_freq,
        without `rope_scaling`); None: they use `rope_theta` like the others.
    """

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_len: int
    rope_theta: float = 10_000.0
    rope_scaling: tuple = ()
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    scan_unroll: int = 1
    attention_bias: bool = False
    embed_scale: bool = False
    mlp_activation: str = "silu"
    attention_impl: str | None = None
    decode_attention: str | None = None
    qk_norm: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    local_rope_theta: float | None = None

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if self.decode_attention not in DECODE_ATTENTIONS:
            raise ValueError(
                f"ModelConfig.decode_attention must be one of {DECODE_ATTENTIONS}, "
                f"got {self.decode_attention!r}"
            )
        scaling = tuple(
            sorted((str(k), v) for k, v in (dict(self.rope_scaling) if self.rope_scaling else {}).items())
        )
        object.__setattr__(self, "rope_scaling", scaling)
        if scaling:
            keys = {k for k, _ in scaling}
            kind = dict(scaling).get("rope_type")
            if kind not in ROPE_SCALINGS or keys != set(ROPE_SCALINGS[kind]):
                raise ValueError(
                    "ModelConfig.rope_scaling must be () or one of "
                    + ", ".join(
                        f"rope_type {k!r} with the keys {sorted(v)}" for k, v in ROPE_SCALINGS.items()
                    )
                    + f"; got {dict(scaling)}"
                )
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(
                    f"ModelConfig.layer_types must give one of {LAYER_TYPES} for each of the "
                    f"num_layers={self.num_layers} layers, got {self.layer_types}"
                )
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window",
                     "local_rope_theta"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be None or positive, got {value}")
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.mlp_dim <= 0 or self.max_len <= 0:
            raise ValueError(
                f"ModelConfig mlp_dim={self.mlp_dim} and max_len={self.max_len} must be positive"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (rotary embeddings)")
        if not 1 <= self.scan_unroll <= self.num_layers:
            raise ValueError(
                f"ModelConfig.scan_unroll={self.scan_unroll} must be in [1, num_layers={self.num_layers}]"
            )
        if self.remat not in _REMAT:
            raise ValueError(f"ModelConfig.remat={self.remat!r} must be one of {_REMAT}")
        if self.mlp_activation not in _ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.mlp_activation={self.mlp_activation!r} must be one of {_ACTIVATIONS}"
            )
        for name in ("param_dtype", "dtype"):
            if jnp.dtype(getattr(self, name)) not in (jnp.dtype("float32"), jnp.dtype("bfloat16")):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} must be float32 or bfloat16")


ROPE_SCALING_KEYS = (
    "factor",
    "high_freq_factor",
    "low_freq_factor",
    "original_max_position_embeddings",
    "rope_type",
)
# rope_type -> the keys of `ModelConfig.rope_scaling` (rope_type included).
ROPE_SCALINGS = {"llama3": ROPE_SCALING_KEYS, "linear": ("factor", "rope_type")}


def sliding_layers(config: ModelConfig) -> tuple[bool, ...]:
    """Per layer, whether it is a "sliding_attention" layer (`ModelConfig.layer_types`; when that is
    None, every layer is one exactly when `sliding_window` is set). Such a layer attends within the
    window (if `sliding_window` is set) and uses `local_rope_theta` (if set)."""
    if config.layer_types is None:
        return (config.sliding_window is not None,) * config.num_layers
    return tuple(t == "sliding_attention" for t in config.layer_types)


PRESETS: dict[str, ModelConfig] = {
    # CPU tests. H=8, G=4 (grouped-query) with H*K != D, and every tensor-sharded dimension (V, F, H, G)
    # divisible by 4, so the (1, 2, 4) data/fsdp/tensor test mesh shards it.
    "tiny": ModelConfig(
        vocab_size=256, num_layers=2, d_model=64, num_heads=8, num_kv_heads=4, head_dim=16, mlp_dim=176,
        max_len=128,
    ),
    # The synthetic-task default; the same width/depth/heads/MLP as the benchmark's `small`.
    "small": ModelConfig(
        vocab_size=4096, num_layers=4, d_model=256, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=704,
        max_len=512,
    ),
    "400m": ModelConfig(
        vocab_size=32_000, num_layers=24, d_model=1024, num_heads=16, num_kv_heads=16, head_dim=64,
        mlp_dim=3072, max_len=2048, norm_eps=1e-5,
    ),
    # TinyLlama-1.1B shape.
    "1b": ModelConfig(
        vocab_size=32_000, num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4, head_dim=64,
        mlp_dim=5632, max_len=2048, norm_eps=1e-5,
    ),
    # Gemma-2B shape: multi-query attention, head_dim 256, GeGLU, tied and sqrt(D)-scaled embeddings.
    "2b": ModelConfig(
        vocab_size=256_000, num_layers=18, d_model=2048, num_heads=8, num_kv_heads=1, head_dim=256,
        mlp_dim=16_384, max_len=8192, tie_embeddings=True, embed_scale=True, mlp_activation="gelu",
    ),
    # Llama-2-7B shape.
    "7b": ModelConfig(
        vocab_size=32_000, num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32, head_dim=128,
        mlp_dim=11_008, max_len=4096, norm_eps=1e-5,
    ),
    # Decoder-only with T5-large's parameter budget (~770M) and T5's 32128-token vocabulary.
    "t5_large_equiv": ModelConfig(
        vocab_size=32_128, num_layers=24, d_model=1536, num_heads=24, num_kv_heads=24, head_dim=64,
        mlp_dim=4096, max_len=1024, norm_eps=1e-6,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> ModelConfig:
    """Returns the named preset with `overrides` applied, e.g. ``preset("small", vocab_size=3000)``.

    Args:
      name: one of `PRESETS`.
      **overrides: ModelConfig fields to replace.

    Returns:
      A validated ModelConfig.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def param_count(config: ModelConfig, *, reward_head: bool = False) -> int:
    """Exact number of parameters, from the shapes alone (never allocates).

    Args:
      config: the model.
      reward_head: count a `RewardModel` (trunk + Dense(D -> 1) with bias, no LM head) instead of a
        `Transformer` (trunk + LM head unless the embeddings are tied).

    Returns:
      The parameter count.
    """
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attention = c.d_model * (q_out + 2 * kv_out) + q_out * c.d_model
    if c.attention_bias:
        attention += q_out + 2 * kv_out
    mlp = 3 * c.d_model * c.mlp_dim
    norms = (4 if c.sandwich_norms else 2) * c.d_model + (2 * c.head_dim if c.qk_norm else 0)
    layer = attention + mlp + norms  # RMSNorm scales
    trunk = c.vocab_size * c.d_model + c.num_layers * layer + c.d_model  # embedding, layers, final norm
    if reward_head:
        return trunk + c.d_model + 1
    return trunk + (0 if c.tie_embeddings else c.d_model * c.vocab_size)
