"""Stage fingerprints: a finished stage is reused only when it was computed from the same inputs.

A run's workdir holds one subdirectory per stage name, and under it one directory per fingerprint:

    WORKDIR/sft/3f2a9c1e0b7d/       params/, metrics.jsonl, results.json, fingerprint.json, ...
    WORKDIR/rm/81c0d2e4f5a6/
    WORKDIR/policy/0b9e.../         (one per loss variant: an earlier variant stays for comparison)
    WORKDIR/stages.json             which stage directories the config just run used
    WORKDIR/results.json            the results of the config just run

A stage's fingerprint is the SHA-256 of a canonical JSON `spec`: exactly the configuration fields the
stage's output depends on, plus the fingerprints of its inputs (upstream stages, and the contents of
the user's data, tokenizer and checkpoint files). `fingerprint.json` next to the output records both.
What the output does not depend on is left out on purpose, so that changing it reuses the stage: the
device mesh (a checkpoint restores onto another mesh; results agree up to float reassociation),
checkpoint cadence, logging cadence, progress bars. A rerun in the same workdir therefore reuses the
stages whose fingerprint still matches (the log says so) and computes the others in new directories:
the README's loss variants of `rso_tldr` share one SFT policy and one reward model, and a changed
stage is never reported as the new config's result.

Reuse across workdirs (`launch.train --reuse=DIR`, `launch.study --reuse=DIR`): a finished stage
directory with the same name and full fingerprint under DIR is copied in instead of being recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import shutil

import jax
import numpy as np

from rlhf_jax.data import readers
from rlhf_jax.pipelines import workdir as workdir_io

log = logging.getLogger("rlhf_jax")

FINGERPRINT_FILE = "fingerprint.json"
SHORT = 12  # hex digits of the fingerprint in a stage's directory name

# Files at most this large are hashed by content; larger ones (checkpoint shards) by size and mtime.
_HASH_LIMIT_BYTES = 256 << 20


def _canonical(obj):
    """JSON-able form of configs: dataclasses as dicts, tuples as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def fingerprint(spec: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of `spec` (key order does not matter)."""
    text = json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    if size > _HASH_LIMIT_BYTES:
        return f"size={size},mtime_ns={mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str) -> str:
    """The content hash of a file (size and mtime for files over 256 MiB)."""
    st = os.stat(path)
    return _file_digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def files_digest(paths: str) -> list[str]:
    """Content hashes of the files a data path names (a file, glob or comma-separated list), in order.

    Paths themselves are left out: the same data moved elsewhere gives the same fingerprint.
    """
    if not paths:
        return []
    return [file_digest(p) for p in readers.expand_paths(paths)]


def dir_digest(path: str) -> dict:
    """Content hashes of the files of a directory (e.g. a HuggingFace checkpoint), by relative name."""
    out = {}
    for p in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        if os.path.isfile(p):
            out[os.path.relpath(p, path)] = file_digest(p)
    return out


def data_spec(data) -> dict:
    """The fingerprint entry of a `DataConfig`: every field, with the files' contents for their paths."""
    spec = _canonical(data)
    spec.pop("path", None)  # shorthand for preference_path, already folded into it
    if data.task not in ("arith", "math"):  # math-only fields: the other tasks' fingerprints predate them
        for key in ("num_train", "arith_max_steps", "arith_error_rate", "arith_misread_rate"):
            spec.pop(key, None)
    if data.task != "dialogue":  # dialogue-only fields: the other tasks' fingerprints predate them
        for key in ("dialogue_max_turns", "dialogue_error_rate"):
            spec.pop(key, None)
    if data.task != "tools":  # tool-task-only fields (the SFT weights enter the tool task's stages)
        for key in ("tool_weights", "tools_per_prompt"):
            spec.pop(key, None)
    # A template file enters by content; "auto" uses the tokenizer's template, which enters through the
    # tokenizer's source. "auto" is kept in the spec of runs on the user's files, whose conversational
    # records were rendered HH-style before templates were applied (so such a stage is recomputed, never
    # reused with the old rendering); the synthetic tasks' fingerprints are unchanged.
    files = data.sft_path or data.preference_path or data.eval_path
    if data.chat_template == "auto" and not files:
        spec.pop("chat_template", None)
    elif data.chat_template not in ("auto", "none"):
        spec["chat_template"] = file_digest(data.chat_template)
    if not data.chat_template_kwargs:
        spec.pop("chat_template_kwargs", None)
    for key in ("sft_path", "preference_path", "eval_path"):
        spec[key] = files_digest(getattr(data, key))
    tok = data.tokenizer
    spec["tokenizer"] = (dir_digest(tok) if os.path.isdir(tok) else file_digest(tok)) if tok else ""
    return spec


def stage_input(path: str) -> str | dict:
    """How an upstream stage directory enters a fingerprint: its own fingerprint when it has one, else
    (a stage written by hand or by an older version) the contents of its files."""
    if not path:
        return ""
    record = read_fingerprint(path)
    if record is not None:
        return record["fingerprint"]
    return {"path": os.path.abspath(path), "files": dir_digest(path)}


def read_fingerprint(stage_dir: str) -> dict | None:
    """The stage's fingerprint.json ({"fingerprint", "spec", "name"}), or None."""
    path = os.path.join(stage_dir, FINGERPRINT_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ModelConfig fields added after stages were first fingerprinted, with the value that leaves the model as
# it was: left out of the spec at that value, so those stages are still found and reused.
_MODEL_FIELDS_SINCE = {
    "rope_scaling": [],
    # The Qwen3 / Gemma 2 / Gemma 3 / Mistral options (`ModelConfig`), off by default.
    "qk_norm": False,
    "sandwich_norms": False,
    "query_pre_attn_scalar": None,
    "attn_softcap": None,
    "final_softcap": None,
    "sliding_window": None,
    "layer_types": None,
    "local_rope_theta": None,
    # The cached-attention kernel (None: full on the CPU, bounded on TPU/GPU): the same model.
    "decode_attention": None,
}


def model_spec(model_config) -> dict:
    """The fingerprint entry of a `ModelConfig` (fields of `_MODEL_FIELDS_SINCE` at their old value
    left out)."""
    spec = _canonical(model_config)
    for key, old in _MODEL_FIELDS_SINCE.items():
        if spec.get(key) == old:
            spec.pop(key)
    return spec


def trainer_spec(cfg, *, kind: str, loss: bool) -> dict:
    """The part of a training stage's `StageConfig` its output depends on.

    Args:
      cfg: the stage's `StageConfig`.
      kind: the stage's kind ("sft", "reward:pointwise", "policy", ...).
      loss: whether the stage trains with `cfg.loss` (preference stages; SFT and reward models do not).
    """
    train = _canonical(cfg.train)
    train.pop("log_every")  # logging cadence changes metrics.jsonl's rows, not the trained parameters
    if not cfg.train.lora_rank:  # full fine-tuning: stages fingerprinted before LoRA existed still match
        for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
            train.pop(key, None)
    if not loss:  # keys only preference stages read
        train.pop("reference")
        train.pop("eval_every")
    spec = {
        "kind": kind,
        "seed": cfg.seed,
        "model": model_spec(cfg.model),
        "optim": _canonical(cfg.optim),
        "train": train,
        "data": data_spec(cfg.data),
        "init_from": stage_input(cfg.init_from),
        "init_from_hf": dir_digest(cfg.init_from_hf) if cfg.init_from_hf else "",
    }
    if loss:
        spec["loss"] = _canonical(cfg.loss)
    return spec


def arrays_digest(*arrays) -> str:
    """Content hash of numpy arrays (e.g. sampled token ids handed to a stage in memory)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def examples_digest(examples) -> str:
    """Content hash of in-memory SFT examples (their prompt, completion and segments, in order)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.completion, [list(s) for s in ex.segments]]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage's place in a workdir: `dir` is WORKDIR/{name}/{fingerprint[:12]}."""

    name: str
    dir: str
    fingerprint: str
    reused: bool = False

    @property
    def short(self) -> str:
        return self.fingerprint[:SHORT]

    def record(self) -> dict:
        """The stage's entry in stages.json and results.json (`dir` relative to the workdir)."""
        return {"dir": f"{self.name}/{self.short}", "fingerprint": self.fingerprint, "reused": self.reused}


def claim(stage_dir: str, spec: dict, name: str = "") -> str:
    """Marks `stage_dir` as the output of `spec` (writes fingerprint.json); returns the fingerprint.

    Raises:
      ValueError: the directory already holds a stage computed from another spec (never reuse it as
        this config's output).
    """
    fp = fingerprint(spec)
    record = read_fingerprint(stage_dir)
    if record is not None and record["fingerprint"] != fp:
        raise ValueError(
            f"{stage_dir} holds a stage of another configuration (fingerprint "
            f"{record['fingerprint'][:SHORT]}, this one {fp[:SHORT]}); give a fresh directory, or run "
            "through launch.train, which keeps one directory per fingerprint"
        )
    if record is None:  # written by process 0, atomically
        workdir_io.write_json(os.path.join(stage_dir, FINGERPRINT_FILE),
                          {"name": name, "fingerprint": fp, "spec": _canonical(spec)})  # fmt: skip
    return fp


def _find_elsewhere(name: str, fp: str, roots: tuple[str, ...], done) -> str | None:
    for root in roots:
        pattern = os.path.join(root, "**", name, fp[:SHORT], FINGERPRINT_FILE)
        for path in sorted(glob.glob(pattern, recursive=True)):
            candidate = os.path.dirname(path)
            record = read_fingerprint(candidate)
            if record and record["fingerprint"] == fp and done(candidate):
                return candidate
    return None


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(tag)


def locate(workdir: str, name: str, spec: dict, *, done, reuse_from: tuple[str, ...] = ()) -> Stage:
    """The directory of stage `name` with this `spec` under `workdir`, claimed (fingerprint.json written).

    A finished stage with the same fingerprint under one of `reuse_from` (other workdirs) is copied in
    first. Logs whether the stage is reused or will be computed.

    Args:
      workdir: the run's workdir.
      name: the stage's name (a subdirectory of the workdir, e.g. "sft" or "iter_2/policy").
      spec: what the stage's output depends on (see the module docstring).
      done: `done(stage_dir) -> bool`, whether a stage directory holds finished output.
      reuse_from: other workdirs to search for the same finished stage.
    """
    fp = fingerprint(spec)
    stage_dir = os.path.join(os.path.abspath(workdir), name, fp[:SHORT])
    source = None
    if reuse_from:
        if not done(stage_dir):
            source = _find_elsewhere(name, fp, reuse_from, done)
        if source is not None and workdir_io.is_main():
            tmp = stage_dir + ".copying"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            shutil.rmtree(stage_dir, ignore_errors=True)  # an unfinished attempt of the same stage
            os.replace(tmp, stage_dir)
        # Every process syncs here whatever it saw: another process may find the stage done only because
        # the main one has just copied it in (a sync under `not done` would then be entered by some).
        _sync(f"reuse {name} {fp}")
    claim(stage_dir, spec, name)
    reused = done(stage_dir)
    if workdir_io.is_main():
        if source is not None:
            print(f"[stages] reused {name}/ (fingerprint {fp[:SHORT]}, copied from {source})", flush=True)
        elif reused:
            print(f"[stages] reused {name}/ (fingerprint {fp[:SHORT]})", flush=True)
        else:
            print(f"[stages] computing {name}/ (fingerprint {fp[:SHORT]})", flush=True)
    return Stage(name=name, dir=stage_dir, fingerprint=fp, reused=reused)


def write_stages(workdir: str, stages: list[Stage], final: str) -> None:
    """WORKDIR/stages.json: the stage directories (relative to WORKDIR) of the config just run, and which
    one is its output (`final`, what `init_from=WORKDIR` starts from)."""
    stages_json = {"final": final, "stages": {s.name: s.record() for s in stages}}
    workdir_io.write_json(os.path.join(workdir, "stages.json"), stages_json)


def resolve_init_from(path: str) -> str:
    """`init_from` may name a stage directory (it has params/) or a run's workdir: then the run's final
    stage (stages.json) is meant."""
    if not path or os.path.isdir(os.path.join(path, "params")):
        return path
    index = os.path.join(path, "stages.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            stages = json.load(f)
        return os.path.join(path, stages["stages"][stages["final"]]["dir"])
    return path


def finish(workdir: str, results: dict, stages: list[Stage], final: str) -> dict:
    """Ends a pipeline run: WORKDIR/stages.json (`write_stages`) and WORKDIR/results.json, which holds
    `results` plus the stages' records under "stages"; returns what it wrote."""
    results = {**results, "stages": {s.name: s.record() for s in stages}}
    write_stages(workdir, stages, final=final)
    workdir_io.write_json(os.path.join(workdir, "results.json"), results)
    return results
