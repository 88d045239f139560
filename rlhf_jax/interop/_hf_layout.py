"""Which HuggingFace tensor holds each of our parameters, and how one layout becomes the other.

HF stores every projection as a torch `Linear` weight [out, in] with heads flattened into `out`
(q_proj.weight is [H*K, D], head h in rows h*K .. h*K+K-1); we store einsum kernels with heads split
(`q_kernel` [D, H, K], `o_kernel` [H, K, D]). Each mapping is therefore a pure reshape (split HF dims,
never merge), a transpose, and for the Gemmas an offset: Gemma's RMSNorms (Gemma 3's q/k norms too)
scale by (1 + w) where ours scale by w, so w_ours = w_hf + 1. Rotary embeddings need no permutation:
ours use the same rotate-half pairing (i, i + K/2) as the Llama/Qwen/Mistral/Gemma modelling code.

Norms of a layer: `attn_norm` is input_layernorm; `mlp_norm` is post_attention_layernorm in the
pre-norm families (Llama, Mistral, Qwen, Gemma 1: the norm before the MLP), but pre_feedforward_layernorm
in the sandwich-norm ones (Gemma 2/3), where post_attention_layernorm normalises the attention output
(`post_attn_norm`) and post_feedforward_layernorm the MLP's (`post_mlp_norm`).

`read` produces any rectangular slice of one of our parameters from a memory-mapped HF tensor, reading
only the HF rows and columns that slice needs, so a device shard is read without the whole tensor.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from rlhf_jax.models.config import ModelConfig

_P = "model.layers.{i}."
# Tensors that may sit in a checkpoint without being parameters of ours.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Families whose RMSNorms scale by (1 + w).
GEMMA_NORMS = ("gemma", "gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor -> one (per-layer) parameter of ours: `(hf.reshape(split).transpose(perm)) + offset`.

    Attributes:
      hf_name: the tensor's name in the checkpoint; "{i}" stands for the layer index.
      hf_shape: its shape.
      split: `hf_shape` with some dimensions split into several (their product unchanged).
      perm: the transpose of the split view that gives our layout.
      offset: added after the transpose (1.0 for Gemma's norm scales).
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]
    offset: float = 0.0

    @property
    def shape(self) -> tuple[int, ...]:
        """Our shape (of one layer)."""
        return tuple(self.split[p] for p in self.perm)

    def groups(self) -> list[tuple[int, int]]:
        """For each HF dimension, the range [a, b) of `split` dimensions it was split into."""
        out, a = [], 0
        for size in self.hf_shape:
            b, prod = a, 1
            while (b == a or prod < size) and b < len(self.split):
                prod *= self.split[b]
                b += 1
            if prod != size:
                raise ValueError(f"{self.hf_name}: split {self.split} does not refine {self.hf_shape}")
            out.append((a, b))
            a = b
        return out

    def read(self, hf_tensor: np.ndarray, index: tuple[slice, ...], dtype) -> np.ndarray:
        """Our slice `index` of this parameter, reading only what it needs of `hf_tensor` (HF layout)."""
        index = tuple(index) + (slice(None),) * (len(self.perm) - len(index))
        view = [slice(None)] * len(self.split)
        for ours, p in enumerate(self.perm):
            view[p] = index[ours]
        view = [slice(*s.indices(n)) for s, n in zip(view, self.split, strict=True)]
        hf_index, block_shape, post = [], [], []
        for a, b in self.groups():
            inner = math.prod(self.split[a + 1 : b])
            rest_full = all(view[k] == slice(0, self.split[k], 1) for k in range(a + 1, b))
            if rest_full and view[a].step == 1:  # one contiguous HF range
                hf_index.append(slice(view[a].start * inner, view[a].stop * inner))
                block_shape += [view[a].stop - view[a].start, *self.split[a + 1 : b]]
                post += [slice(None)] * (b - a)
            else:
                hf_index.append(slice(None))
                block_shape += list(self.split[a:b])
                post += view[a:b]
        block = np.asarray(hf_tensor[tuple(hf_index)]).reshape(block_shape)[tuple(post)]
        out = block.transpose(self.perm)
        if self.offset:
            out = out.astype(np.float32) + np.float32(self.offset)
        return out.astype(dtype)

    def to_hf(self, ours: np.ndarray, dtype) -> np.ndarray:
        """The HF tensor (in `dtype`) of one layer's parameter in our layout."""
        x = ours.astype(np.float32) - np.float32(self.offset) if self.offset else ours
        return np.ascontiguousarray(x.transpose(np.argsort(self.perm)).reshape(self.hf_shape)).astype(dtype)


def layer_maps(config: ModelConfig, family: str) -> dict[tuple[str, ...], TensorMap]:
    """Maps of one decoder layer, keyed by the parameter's path under `decoder/layers`."""
    D, H, G, K, F = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.mlp_dim
    norm = 1.0 if family in GEMMA_NORMS else 0.0
    attn = _P + "self_attn."
    pre_mlp = "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
    maps = {
        ("attn", "q_kernel"): TensorMap(attn + "q_proj.weight", (H * K, D), (H, K, D), (2, 0, 1)),
        ("attn", "k_kernel"): TensorMap(attn + "k_proj.weight", (G * K, D), (G, K, D), (2, 0, 1)),
        ("attn", "v_kernel"): TensorMap(attn + "v_proj.weight", (G * K, D), (G, K, D), (2, 0, 1)),
        ("attn", "o_kernel"): TensorMap(attn + "o_proj.weight", (D, H * K), (D, H, K), (1, 2, 0)),
        ("mlp", "gate_kernel"): TensorMap(_P + "mlp.gate_proj.weight", (F, D), (F, D), (1, 0)),
        ("mlp", "up_kernel"): TensorMap(_P + "mlp.up_proj.weight", (F, D), (F, D), (1, 0)),
        ("mlp", "down_kernel"): TensorMap(_P + "mlp.down_proj.weight", (D, F), (D, F), (1, 0)),
        ("attn_norm", "scale"): TensorMap(_P + "input_layernorm.weight", (D,), (D,), (0,), norm),
        ("mlp_norm", "scale"): TensorMap(_P + pre_mlp + ".weight", (D,), (D,), (0,), norm),
    }
    if config.sandwich_norms:
        for ours, theirs in (("post_attn_norm", "post_attention_layernorm"),
                             ("post_mlp_norm", "post_feedforward_layernorm")):  # fmt: skip
            maps[(ours, "scale")] = TensorMap(_P + theirs + ".weight", (D,), (D,), (0,), norm)
    if config.qk_norm:
        for name in ("q", "k"):
            maps[("attn", f"{name}_norm", "scale")] = TensorMap(
                attn + f"{name}_norm.weight", (K,), (K,), (0,), norm
            )
    if config.attention_bias:
        for name, n in (("q", H), ("k", G), ("v", G)):
            maps[("attn", f"{name}_bias")] = TensorMap(attn + f"{name}_proj.bias", (n * K,), (n, K), (0, 1))
    return maps


def top_maps(config: ModelConfig, family: str) -> dict[tuple[str, ...], TensorMap]:
    """Maps of the parameters outside the layers, keyed by their path."""
    V, D = config.vocab_size, config.d_model
    maps = {
        ("decoder", "embedding"): TensorMap("model.embed_tokens.weight", (V, D), (V, D), (0, 1)),
        ("decoder", "final_norm", "scale"): TensorMap(
            "model.norm.weight", (D,), (D,), (0,), 1.0 if family in GEMMA_NORMS else 0.0
        ),
    }
    if not config.tie_embeddings:
        maps[("lm_head",)] = TensorMap("lm_head.weight", (V, D), (V, D), (1, 0))
    return maps


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of ours: its path, its map, and its layers (None: not a layer; several: stacked)."""

    path: tuple[str, ...]
    map: TensorMap
    layers: tuple[int, ...] | None
    stacked: bool

    def hf_names(self) -> list[str]:
        layers = self.layers if self.layers is not None else (None,)
        return [self.map.hf_name.format(i=i) for i in layers]


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def plan(tree, config: ModelConfig, family: str) -> list[Entry]:
    """The Entry of every leaf of a params(-shaped) tree, in the tree's flattening order.

    Raises:
      ValueError: for a parameter no HF tensor holds (e.g. a reward head), naming it.
    """
    top, layer = top_maps(config, family), layer_maps(config, family)
    entries = []
    for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = tuple(_key(k) for k in key_path)
        if path in top:
            entries.append(Entry(path, top[path], None, False))
        elif len(path) > 2 and path[0] == "decoder" and path[1] == "layers" and path[2:] in layer:
            entries.append(Entry(path, layer[path[2:]], tuple(range(config.num_layers)), True))
        elif len(path) > 2 and path[1].startswith("layers_") and path[2:] in layer:
            entries.append(Entry(path, layer[path[2:]], (int(path[1][len("layers_") :]),), False))
        else:
            raise ValueError(
                f"parameter {'/'.join(path)} has no counterpart in a HuggingFace causal-LM checkpoint "
                "(for a RewardModel, import a Transformer and copy params['decoder'])"
            )
    return entries
