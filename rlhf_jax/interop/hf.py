"""Import and export HuggingFace-format checkpoints (config.json + *.safetensors) of Llama, Mistral, Qwen2,
Qwen3, Gemma, Gemma 2 and Gemma 3 (text).

    from rlhf_jax import interop, models, sharding
    config = interop.load_config("/ckpt/TinyLlama-1.1B", dtype="bfloat16")
    model = models.Transformer(config, mesh=mesh)
    params = interop.import_params("/ckpt/TinyLlama-1.1B", model)  # placed with the model's shardings
    ...
    interop.export_params(params, config, "/out/policy", source="/ckpt/TinyLlama-1.1B")

Import never builds a whole tensor on one host: each parameter is a `jax.make_array_from_callback` whose
callback reads, from the memory-mapped safetensors files, only the rows and columns of the device shard
it is asked for (on a pod each host reads just its own shards; the checkpoint directory must be readable
from every host). Export gathers one tensor (one layer of a stacked parameter) at a time; every process
takes part in the gathers and process 0 writes.

Supported: LlamaForCausalLM (Llama 2, TinyLlama, Llama 3, Llama 3.1/3.2 with llama3 rope scaling),
MistralForCausalLM (a sliding window on every layer, or none), Qwen2ForCausalLM (Qwen2, Qwen2.5: q/k/v
biases, tied embeddings of the small ones), Qwen3ForCausalLM (q/k RMSNorms), GemmaForCausalLM (Gemma 1:
sqrt(D) embedding scale, GeGLU, (1 + w) RMSNorm), Gemma2ForCausalLM (sandwich norms, soft-capping,
alternating sliding-window layers, query_pre_attn_scalar) and Gemma3ForCausalLM (gemma3_text: Gemma 2's
without attention soft-capping, plus q/k norms, a local rotary base and linear rope scaling); details in
`_hf_config`. Anything else raises a ValueError naming the model_type or config field.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import models
from rlhf_jax.interop import _hf_config, _hf_layout
from rlhf_jax.interop._safetensors import SafetensorsFile, write_file
from rlhf_jax.models.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Copied from `source` on export: tokenizers and generation defaults, untouched.
SIDE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
_ARCH_FIELDS = (
    "vocab_size num_layers d_model num_heads num_kv_heads head_dim mlp_dim rope_theta rope_scaling norm_eps "
    "tie_embeddings attention_bias embed_scale mlp_activation qk_norm sandwich_norms query_pre_attn_scalar "
    "attn_softcap final_softcap sliding_window layer_types local_rope_theta"
).split()


def read_config(path: str) -> dict:
    """The parsed `path/config.json`."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path!r} is not a HuggingFace checkpoint directory: no config.json")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def load_config(path: str, **overrides) -> ModelConfig:
    """The ModelConfig of the checkpoint in `path`.

    Args:
      path: a directory with config.json.
      **overrides: runtime fields (param_dtype, dtype, remat, scan_layers, attention_impl, decode_attention,
        max_len); max_len defaults to the checkpoint's max_position_embeddings.

    Returns:
      The validated architecture.

    Raises:
      ValueError: for an unsupported architecture or config field (named in the message).
    """
    config, _ = _hf_config.parse_config(read_config(path), os.path.join(path, "config.json"))
    return _hf_config.runtime_overrides(config, overrides)


def family(path: str) -> str:
    """The family (model_type: "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2" or "gemma3_text")
    of the checkpoint in `path`."""
    return _hf_config.parse_config(read_config(path), os.path.join(path, "config.json"))[1]


class _Checkpoint:
    """The tensors of a checkpoint directory, by name, with their files opened on first use."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                self.files = dict(json.load(f)["weight_map"])
        elif os.path.exists(os.path.join(path, SINGLE_FILE)):
            self.files = {n: SINGLE_FILE for n in SafetensorsFile(os.path.join(path, SINGLE_FILE)).keys()}
        else:
            raise FileNotFoundError(
                f"{path!r}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are read; "
                f"files there: {sorted(os.listdir(path))})"
            )
        self.path, self._open = path, {}

    def _file(self, name: str) -> SafetensorsFile:
        file = self.files[name]
        if file not in self._open:
            self._open[file] = SafetensorsFile(os.path.join(self.path, file))
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor, memory-mapped in the checkpoint's layout and dtype."""
        return self._file(name).get(name)


def _check_architecture(checkpoint: ModelConfig, model: ModelConfig, path: str) -> None:
    diff = {k: (getattr(checkpoint, k), getattr(model, k)) for k in _ARCH_FIELDS}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        raise ValueError(
            f"{path}: the model's architecture differs from the checkpoint's (checkpoint, model): {diff}; "
            "build it from interop.load_config(path)"
        )


def import_params(path: str, model, mesh: jax.sharding.Mesh | None = None):
    """Reads a HuggingFace checkpoint into `model`'s parameters, each placed with its target sharding.

    Args:
      path: a directory with config.json and model.safetensors or model.safetensors.index.json.
      model: a `models.Transformer` whose config matches the checkpoint's architecture (any param_dtype,
        dtype, remat, scan_layers).
      mesh: default `model.mesh`; with neither, everything goes to the first local device.

    Returns:
      The params pytree, structured like `models.param_shapes(model)`, in `param_dtype`.

    Raises:
      ValueError: unsupported config field; an architecture mismatch; a tensor of the wrong shape; a
        tensor in the checkpoint that no parameter takes (e.g. an o_proj bias).
      FileNotFoundError: no config.json or safetensors files.
    """
    hf_config, fam = _hf_config.parse_config(read_config(path), os.path.join(path, "config.json"))
    _check_architecture(hf_config, model.config, path)
    shapes = models.param_shapes(model)
    mesh = model.mesh if mesh is None else mesh
    if mesh is None:
        target = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), shapes)
    else:
        target = models.param_shardings(model, mesh)
    ckpt = _Checkpoint(path)
    entries = _hf_layout.plan(shapes, model.config, fam)

    used = set()
    for e in entries:
        for name in e.hf_names():
            if name not in ckpt.files:
                raise ValueError(f"{path}: tensor {name!r} is missing from the checkpoint")
            shape = ckpt.shape(name)
            if shape != e.map.hf_shape:
                raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected {e.map.hf_shape}")
            used.add(name)
    ignorable = lambda n: (
        n.endswith(_hf_layout.IGNORED_SUFFIXES) or (n == "lm_head.weight" and model.config.tie_embeddings)
    )
    unused = sorted(n for n in ckpt.files if n not in used and not ignorable(n))
    if unused:
        raise ValueError(
            f"{path}: the checkpoint has tensors the {fam} model has no place for (first of "
            f"{len(unused)}): {unused[:8]}; its architecture has parts rlhf_jax.models does not implement"
        )

    def place(entry: _hf_layout.Entry, shape_struct, sharding):
        dtype = shape_struct.dtype

        def callback(index):
            if not entry.stacked:
                return entry.map.read(ckpt.tensor(entry.hf_names()[0]), index, dtype)
            layers = range(shape_struct.shape[0])[index[0]]
            names = entry.hf_names()
            return np.stack([entry.map.read(ckpt.tensor(names[i]), index[1:], dtype) for i in layers])

        return jax.make_array_from_callback(shape_struct.shape, sharding, callback, dtype=dtype)

    leaves = [
        place(e, s, sh)
        for e, s, sh in zip(entries, jax.tree.leaves(shapes), jax.tree.leaves(target), strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


_layer_of = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False))


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host (an all-gather across processes when it is not addressable here)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def export_params(
    params,
    config: ModelConfig,
    path: str,
    *,
    family: str | None = None,
    dtype: str | None = None,
    source: str | None = None,
    extra_config: dict | None = None,
    max_shard_bytes: int = 5 << 30,
) -> None:
    """Writes `params` as a HuggingFace checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
      params: a `Transformer`'s params (scanned or unrolled layout, any sharding).
      config: its architecture.
      path: the output directory (created; existing files of the same names are replaced).
      family: one of `_hf_config.FAMILIES`; default inferred (`_hf_config.infer_family`: gemma3_text
        with q/k and sandwich norms, gemma2 with sandwich norms, qwen3 with q/k norms, qwen2 with
        attention biases, gemma with the sqrt(D) embedding scale, mistral with a sliding window, else
        llama).
      dtype: stored dtype, "float32" or "bfloat16"; default `config.param_dtype`.
      source: the checkpoint the model came from: its config.json's token ids and other metadata are
        kept, and its tokenizer files and generation_config.json (`SIDE_FILES`) are copied.
      extra_config: config.json keys to set (e.g. {"bos_token_id": 2, "eos_token_id": 3}).
      max_shard_bytes: files larger than this are split into model-0000k-of-0000n.safetensors with an
        index, as transformers does.

    Raises:
      ValueError: if `family` cannot represent `config` (e.g. attention biases as Llama).
    """
    family = family or _hf_config.infer_family(config)
    dtype = np.dtype(dtype or config.param_dtype)
    base = read_config(source) if source else None
    hf_config = _hf_config.build_config(config, family, dtype.name, base, extra_config)
    entries = _hf_layout.plan(params, config, family)
    arrays = dict(zip((e.path for e in entries), jax.tree.leaves(params), strict=True))

    # One HF tensor per (entry, layer), ordered as transformers writes them: embedding, layers, norm, head.
    tensors = {}
    for e in entries:
        for j, name in enumerate(e.hf_names()):
            tensors[name] = (e, j)
    order = lambda n: (n.startswith("lm_head"), n == "model.norm.weight", _layer_index(n), n)
    names = sorted(tensors, key=order)
    nbytes = {n: int(np.prod(tensors[n][0].map.hf_shape)) * dtype.itemsize for n in names}
    shards = [[]]
    for n in names:
        if shards[-1] and sum(nbytes[m] for m in shards[-1]) + nbytes[n] > max_shard_bytes:
            shards.append([])
        shards[-1].append(n)

    def produce(name: str) -> np.ndarray:
        e, j = tensors[name]
        x = arrays[e.path]
        x = _layer_of(x, j) if e.stacked else x
        return e.map.to_hf(_to_host(x), dtype)

    main = jax.process_index() == 0
    if main:
        os.makedirs(path, exist_ok=True)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]  # fmt: skip
    for file, shard in zip(files, shards, strict=True):
        specs = [(n, tensors[n][0].map.hf_shape, dtype) for n in shard]
        if main:
            write_file(os.path.join(path, file), specs, produce, metadata={"format": "pt"})
        else:
            for n in shard:  # take part in the gathers process 0 is doing
                produce(n)
    if not main:
        return
    if len(shards) > 1:
        weight_map = {n: f for f, shard in zip(files, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        _write_json(os.path.join(path, INDEX_FILE), index)
    elif os.path.exists(os.path.join(path, INDEX_FILE)):
        os.remove(os.path.join(path, INDEX_FILE))  # a stale index would shadow model.safetensors
    _write_json(os.path.join(path, "config.json"), hf_config)
    for name in SIDE_FILES if source else ():
        if os.path.exists(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(path, name))


def _layer_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else -1


def _write_json(file: str, obj) -> None:
    with open(file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(file + ".tmp", file)


def tokenizer_path(path: str) -> str:
    """The tokenizer file of the checkpoint in `path`: its sentencepiece `tokenizer.model` (Llama 2,
    TinyLlama, Gemma), else its HuggingFace `tokenizer.json` (Llama 3, Qwen2.5); either loads with
    `rlhf_jax.data.tokenizer.load_tokenizer`.

    Raises:
      FileNotFoundError: if there is neither.
    """
    for name in ("tokenizer.model", "tokenizer.json"):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path!r} has no tokenizer.model (nor tokenizer.json)")
