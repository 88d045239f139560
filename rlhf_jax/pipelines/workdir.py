"""A stage directory's files: JSON and npz written atomically, the final params and `model.json`.

A training stage's directory holds `fingerprint.json` (`rlhf_jax.pipelines.fingerprints`),
`tokenizer.model`, `model.json`, `checkpoints/` (Orbax, resumable), `metrics.jsonl`, `tensorboard/`,
`curves.png`, `results.json` and, once it has finished, `params/` (the final parameters, which
`init_from` reads and whose presence marks the stage as done). A LoRA stage also keeps its adapters
(`adapters/`, `lora.json`; `params/` then holds the merged weights). Only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import models


def is_main() -> bool:
    return jax.process_index() == 0


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file + rename), from process 0 only."""
    if not is_main():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_npz(path: str, arrays: dict) -> None:
    """Writes arrays to `path` (.npz) atomically, from process 0 only."""
    if not is_main():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def write_jsonl(path: str, rows) -> None:
    """Writes one JSON object per line atomically, from process 0 only."""
    if not is_main():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


ADAPTERS_DIR, LORA_JSON = "adapters", "lora.json"


def params_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "params")


def stage_done(workdir: str) -> bool:
    """Whether a training stage finished in `workdir` (its final params are written atomically, last)."""
    return os.path.isdir(params_dir(workdir))


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_results(workdir: str) -> dict:
    """A finished stage's results.json ({} if absent)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_params(workdir: str, params, model: models.ModelConfig, kind: str) -> None:
    """Writes the final params (Orbax, atomic) and `model.json` describing them.

    `kind` is "lm" for a language model, or the reward model's kind ("pointwise" or "pairwise").
    """
    write_json(os.path.join(workdir, "model.json"), {"kind": kind, **dataclasses.asdict(model)})
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir(workdir), params, force=True)


def save_adapters(workdir: str, adapters, lora_config) -> None:
    """Writes a LoRA stage's adapters (Orbax, WORKDIR/adapters) and `lora.json` (their `LoRAConfig`)."""
    write_json(os.path.join(workdir, LORA_JSON), dataclasses.asdict(lora_config))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(workdir), ADAPTERS_DIR), adapters, force=True)


def load_adapters(workdir: str, base, shardings=None):
    """(adapters, LoRAConfig) of a finished LoRA stage, shaped for the params `base` (arrays or shapes),
    placed by `shardings` (a tree like the adapters; default: whole on the first device).

    Raises:
      FileNotFoundError: the stage trained every weight (no lora.json / adapters there).
    """
    from rlhf_jax import lora

    path = os.path.join(os.path.abspath(workdir), ADAPTERS_DIR)
    if not os.path.exists(os.path.join(workdir, LORA_JSON)) or not os.path.isdir(path):
        raise FileNotFoundError(
            f"{workdir}: no LoRA adapters ({LORA_JSON}, {ADAPTERS_DIR}/); was it a LoRA stage?"
        )
    config = lora.LoRAConfig(**read_json(os.path.join(workdir, LORA_JSON)))
    shapes = lora.adapter_shapes(base, config)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, abstract), config


def load_model_json(workdir: str) -> dict:
    path = os.path.join(workdir, "model.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"init_from={workdir!r}: no model.json there (is it a finished stage's workdir?)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_params(workdir: str, target) -> dict:
    """Restores the final params of the stage in `workdir` onto `target`'s shapes and shardings."""
    path = params_dir(workdir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"init_from={workdir!r}: no finished params at {path}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
    )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, abstract)
        except Exception as e:
            raise ValueError(
                f"init_from={workdir!r}: params at {path} do not match this model ({e}); "
                "the architecture (model.* config) must equal the earlier stage's"
            ) from e


def check_same_architecture(init_from: str, model: models.ModelConfig) -> None:
    """Raises if the earlier stage's model.json describes a different architecture."""
    saved = load_model_json(init_from)
    mine = dataclasses.asdict(model)
    keys = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
    diff = {k: (saved.get(k), mine[k]) for k in keys if saved.get(k) != mine[k]}
    if diff:
        raise ValueError(f"init_from={init_from!r} has a different architecture (saved, this run): {diff}")


def load_lm(workdir: str, mesh) -> tuple[models.Transformer, object]:
    """The language model finished in a stage's `workdir` (its model.json and final params)."""
    saved = load_model_json(workdir)
    saved.pop("kind")
    lm = models.Transformer(models.ModelConfig(**saved), mesh=mesh)
    return lm, load_params(workdir, models.init_params(lm, jax.random.key(0)))
