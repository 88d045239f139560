"""LoRA adapters in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

    interop.export_peft(adapters, lora_config, model_config, "/tmp/adapters", base_model="/ckpt/Qwen2.5")
    # in PyTorch: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "/tmp/adapters")

PEFT stores, for each adapted `nn.Linear` (weight [out, in]), `lora_A.weight` [r, in] and `lora_B.weight`
[out, r] under `base_model.model.{module}`, and applies y = W x + (lora_alpha / r) B A x. Ours are A
[*in, r] and B [r, *out] with heads split (`rlhf_jax.lora`); the flattening of the head dimensions is the
one of the base weights (`_hf_layout`: row h·K + k), so each tensor is a reshape and a transpose.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from rlhf_jax import lora as lora_lib
from rlhf_jax.interop._safetensors import write_file
from rlhf_jax.models.config import ModelConfig

# Our target -> the HF module under `model.layers.{i}`.
HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def adapter_config(lora: lora_lib.LoRAConfig, *, base_model: str = "") -> dict:
    """PEFT's `adapter_config.json` for `lora` (a causal-LM LoRA, no biases, no rsLoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(HF_MODULES[t].split(".")[-1] for t in lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _layers(adapters):
    """(layer index, {target: (a, b)}) for each decoder layer, from the scanned or unrolled layout."""
    decoder = adapters["decoder"]
    out = []
    if "layers" in decoder:
        stacked = decoder["layers"]
        first = next(iter(jax.tree.leaves(stacked)))
        for i in range(first.shape[0]):
            out.append((i, jax.tree.map(lambda x, i=i: x[i], stacked)))
    else:
        for name, layer in decoder.items():
            out.append((int(name[len("layers_") :]), layer))
    return sorted(out, key=lambda t: t[0])


def export_peft(
    adapters, lora: lora_lib.LoRAConfig, config: ModelConfig, path: str, *, base_model: str = "", dtype=None
) -> None:
    """Writes `adapters` (`rlhf_jax.lora`) as a PEFT LoRA checkpoint in `path`.

    Args:
      adapters: the adapters tree (scanned or unrolled layout, any sharding).
      lora: their settings (rank, α, targets).
      config: the model they adapt.
      path: output directory (created).
      base_model: written as `base_model_name_or_path` (the checkpoint PEFT loads them onto).
      dtype: stored dtype; default the adapters' own.
    """
    del config  # the shapes come from the adapters; kept for symmetry with `export_params`
    tensors = {}
    for i, layer in _layers(adapters):
        for target in lora.targets:
            module, kernel, n_in = lora_lib.TARGETS[target]
            ad = layer[module][kernel]
            a = np.asarray(jax.device_get(ad["a"]))
            b = np.asarray(jax.device_get(ad["b"]))
            r = lora.rank
            name = f"base_model.model.model.layers.{i}.{HF_MODULES[target]}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, r).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(r, -1).T)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    dtype = np.dtype(dtype) if dtype is not None else next(iter(tensors.values())).dtype
    names = sorted(tensors)
    specs = [(n, tensors[n].shape, dtype) for n in names]
    write_file(os.path.join(path, ADAPTER_FILE), specs, lambda n: tensors[n].astype(dtype),
               metadata={"format": "pt"})  # fmt: skip
    tmp = os.path.join(path, ADAPTER_CONFIG + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(adapter_config(lora, base_model=base_model), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(path, ADAPTER_CONFIG))
