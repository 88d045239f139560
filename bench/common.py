"""Shared pieces of the benchmarks: presets, the synthetic batch, the FLOP count, timing and output.

A benchmark preset is a model (a `rlhf_jax.models.ModelConfig`) plus the shape of one step's batch:
`pairs` preference pairs, each a prompt of `prompt_len` tokens followed by a response of `response_len`
tokens, chosen and rejected alike. Every token is real (no padding), and the loss mask covers the
response, as `rlhf_jax.data.pipeline` lays out a preference batch.

FLOPs of one DPO step (B pairs, T = prompt + response tokens, N = parameters other than the input
embedding, L layers, A = heads x head dim, the attention width)::

    policy forward + backward on 2B rows    6 N (2BT)  +  3 (4 L A T^2)(2B)
    reference forward on 2B rows            2 N (2BT)  +      4 L A T^2 (2B)
    total                                   2 B T (8 N + 16 L A T)

with the attention scores and the weighted sum counted over the full T x T square (the common
convention for MFU, which ignores causal masking). Without the reference forward (precomputed
reference log-probs) it is 2 B T (6 N + 12 L A T).

torch and transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import numpy as np

from rlhf_jax import models

VOCAB = 8192


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    """A model and the batch of one step.

    Attributes:
      name: the preset's name.
      model: the architecture (Llama-style, untied embeddings).
      prompt_len: prompt tokens per row.
      response_len: response tokens per row (the loss mask covers them).
      pairs: preference pairs per step (2 x pairs rows go through the policy).
    """

    name: str
    model: models.ModelConfig
    prompt_len: int
    response_len: int
    pairs: int

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def tokens_per_step(self) -> int:
        """Tokens through the policy per step: chosen and rejected, prompt and response."""
        return 2 * self.pairs * self.seq_len


def _llama(vocab, layers, width, heads, mlp, max_len, kv_heads=None, unroll=True) -> models.ModelConfig:
    return models.ModelConfig(
        vocab_size=vocab, num_layers=layers, d_model=width, num_heads=heads,
        num_kv_heads=kv_heads or heads, head_dim=width // heads, mlp_dim=mlp, max_len=max_len,
        norm_eps=1e-5, scan_unroll=layers if unroll else 1,
    )  # fmt: skip


PRESETS: dict[str, BenchPreset] = {
    # Smoke tests only: seconds to compile and run.
    "tiny": BenchPreset("tiny", _llama(256, 2, 64, 4, 176, 32), 8, 8, 2),
    "small": BenchPreset("small", _llama(VOCAB, 4, 256, 4, 704, 256), 128, 128, 8),
    "medium": BenchPreset("medium", _llama(VOCAB, 8, 512, 8, 1408, 512), 256, 256, 4),
    # For an accelerator (TinyLlama-1.1B shape, grouped-query attention, Llama's vocabulary).
    "1b": BenchPreset("1b", _llama(32_000, 22, 2048, 32, 5632, 1024, kv_heads=4, unroll=False), 256, 256, 8),
}
# The CPU presets unroll their few layers inside the scan (`ModelConfig.scan_unroll`): the same stacked
# parameters, ~10% faster steps than a rolled scan, compile time still seconds at 4-8 layers.


def get_preset(name: str, *, layers: int | None = None, dtype: str = "float32", **model_overrides):
    """The named preset, with the layer count, compute dtype and other model fields overridden.

    A preset that unrolls its whole stack keeps doing so at another layer count, unless `scan_unroll`
    is given.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown benchmark preset {name!r}; known: {sorted(PRESETS)}")
    p = PRESETS[name]
    overrides = {"dtype": dtype}
    if layers is not None:
        full = p.model.scan_unroll == p.model.num_layers
        overrides.update(num_layers=layers, scan_unroll=layers if full else min(p.model.scan_unroll, layers))
    overrides.update(model_overrides)
    return dataclasses.replace(p, model=dataclasses.replace(p.model, **overrides))


# ----------------------------------------------------------------------------------------------------
# FLOPs.


def matmul_params(config: models.ModelConfig) -> int:
    """N: parameters other than the input embedding (the LM head counts; it is a matmul)."""
    return models.param_count(config) - config.vocab_size * config.d_model


def flops_per_step(p: BenchPreset, *, reference_forward: bool = True) -> float:
    """Analytic FLOPs of one DPO step (module docstring): 2BT(8N + 16LAT), or 2BT(6N + 12LAT)."""
    c = p.model
    n, b, t = matmul_params(c), p.pairs, p.seq_len
    a = c.num_heads * c.head_dim
    if reference_forward:
        return 2.0 * b * t * (8 * n + 16 * c.num_layers * a * t)
    return 2.0 * b * t * (6 * n + 12 * c.num_layers * a * t)


# ----------------------------------------------------------------------------------------------------
# The batch.


def make_batch(p: BenchPreset, seed: int = 0) -> dict[str, np.ndarray]:
    """A preference batch in `rlhf_jax.data.pipeline`'s layout, every token real.

    Row layout (T = P + R): tokens at 0..T-1; targets[t] = tokens[t + 1]; loss_mask is 1 for
    P - 1 <= t < T - 1, the R positions whose target is a response token (the last response token
    stands in for the EOS).
    """
    rng = np.random.default_rng(seed)
    b, t, v = p.pairs, p.seq_len, p.model.vocab_size
    mask_T = ((np.arange(t) >= p.prompt_len - 1) & (np.arange(t) < t - 1)).astype(np.float32)
    prompt_BT = rng.integers(3, v, (b, p.prompt_len), dtype=np.int32)
    batch = {}
    for side in ("chosen", "rejected"):
        response_BT = rng.integers(3, v, (b, p.response_len), dtype=np.int32)
        tokens_BT = np.concatenate([prompt_BT, response_BT], axis=1)
        targets_BT = np.concatenate([tokens_BT[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
        batch[f"{side}_tokens"] = tokens_BT
        batch[f"{side}_targets"] = targets_BT
        batch[f"{side}_loss_mask"] = np.broadcast_to(mask_T, (b, t)).copy()
        batch[f"{side}_segment_ids"] = np.ones((b, t), np.int32)
        batch[f"{side}_lengths"] = np.full((b,), p.response_len, np.int32)
    batch["prompt_lengths"] = np.full((b,), p.prompt_len, np.int32)
    batch["weights"] = np.ones((b,), np.float32)
    return batch


# ----------------------------------------------------------------------------------------------------
# Timing.


def time_calls(fn: Callable[[], object], *, warmup: int, iters: int, min_seconds: float = 0.0) -> list[float]:
    """Seconds of each of `iters` calls of `fn` (which must block until its work is done), after
    `warmup` untimed calls; keeps going past `iters` until `min_seconds` have been timed."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < iters or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(times: list[float]) -> float:
    return float(statistics.median(times))


# ----------------------------------------------------------------------------------------------------
# Output.


def machine() -> dict[str, object]:
    """The CPU model, core count and library versions, for the JSON record."""
    import jax

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), cpu
        )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        # Other processes' load: timings are only comparable within one run (see the README).
        "loadavg_1min": os.getloadavg()[0],
    }


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    """Prints `rows` as an aligned text table with the given columns."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.4e}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(path: str, record: dict) -> None:
    """Writes the benchmark's record (creating the folder); prints where."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    print(f"wrote {path}")


def summary_line(tokens_per_s: float, mfu: float | None, ratio_vs_torch: float | None) -> str:
    """The last line of `bench.train_step` and `bench.sample`, for scripts."""
    na = lambda x, f: "na" if x is None else format(x, f)
    return f"tokens_per_s={tokens_per_s:.2f} mfu={na(mfu, '.4f')} ratio_vs_torch={na(ratio_vs_torch, '.4f')}"


# ----------------------------------------------------------------------------------------------------
# Our DPO step.


@dataclasses.dataclass
class JaxStep:
    """A jitted, donating DPO train step and its inputs:
    `state, metrics = step_fn(state, batch, reference_params)`."""

    step_fn: Callable
    state: object
    batch: dict
    reference_params: object


def optim_config():
    """The optimizer of every benchmark, ours and PyTorch's: AdamW, clip at global norm 1."""
    from rlhf_jax.train import optim

    return optim.OptimConfig(learning_rate=1e-5, schedule="constant", weight_decay=0.0, grad_clip_norm=1.0)


def jax_dpo_step(p: BenchPreset, *, loss: str = "dpo", reference: str = "online", mesh=None) -> JaxStep:
    """Builds the library's DPO step for preset `p` with the trainer core (`rlhf_jax.train.trainer`), as
    the preference stage does.

    Args:
      p: the preset.
      loss: a pairwise loss name from `rlhf_jax.losses`.
      reference: "online" (a reference forward in every step, as TRL's default) or "precomputed"
        (reference log-probs in the batch, computed once here as a pipeline does once per dataset).
      mesh: if given, params, state and batch are sharded on it (FSDP over its `fsdp` axis).

    Returns:
      A JaxStep whose state and batch are on device.
    """
    import functools

    import jax

    from rlhf_jax import losses, sharding
    from rlhf_jax.train import optim, steps, trainer

    if reference not in ("online", "precomputed"):
        raise ValueError(f"reference must be 'online' or 'precomputed', got {reference!r}")
    model = models.Transformer(p.model, mesh=mesh)
    params = models.init_params(model, jax.random.key(0))
    reference_params = jax.tree.map(lambda x: x.copy(), params)
    tx = optim.make_optimizer(optim_config(), total_steps=1_000_000)
    objective = functools.partial(
        steps.preference_objective, model=model, loss_fn=losses.make(loss),
        loss_inputs=losses.required_inputs(loss), metric_beta=0.1,
    )  # fmt: skip
    param_sh = None if mesh is None else models.param_shardings(model, mesh)
    state, state_sh = trainer.init_state(params, tx, seed=0, mesh=mesh, param_shardings=param_sh)
    step_fn = trainer.make_train_step(
        objective, weight_fn=steps.pair_weight, tx=tx, mesh=mesh, state_shardings=state_sh,
        reference_shardings=param_sh,
    )  # fmt: skip
    host_batch = make_batch(p)
    batch = jax.device_put(host_batch) if mesh is None else sharding.shard_batch(host_batch, mesh)
    if reference == "precomputed":
        chosen_B, rejected_B = jax.jit(lambda q, b: steps.pair_logps(model, q, b))(reference_params, batch)
        batch = {**batch, "reference_chosen_logps": chosen_B, "reference_rejected_logps": rejected_B}
        reference_params = None
    return JaxStep(step_fn, state, batch, reference_params)


class JaxRunner:
    """Runs steps of a JaxStep to completion, threading the donated state through (`.state` is live)."""

    def __init__(self, s: JaxStep):
        self.step, self.state = s, s.state

    def __call__(self) -> None:
        import jax

        self.state, metrics = self.step.step_fn(self.state, self.step.batch, self.step.reference_params)
        jax.block_until_ready((self.state, metrics))

    def profile(self, *, top: int = 25) -> list[dict]:
        """`op_profile` of two steps."""
        s = self.step
        hlo = s.step_fn.lower(self.state, s.batch, s.reference_params).compile().as_text()
        self()
        return op_profile(self, hlo, steps=2, top=top)


def cores() -> int:
    """CPU cores this process may use (the thread count for PyTorch)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------
# Where the time goes.


def op_profile(fn: Callable[[], object], hlo_text: str, *, steps: int = 2, top: int = 25) -> list[dict]:
    """A per-op breakdown of `fn` (one call = one step) from a `jax.profiler` trace.

    Each executed XLA op (a thunk of the compiled step) is matched to its HLO instruction in
    `hlo_text` (the compiled module's `as_text()`), which names its result shape and the JAX source op
    (`op_name` metadata). Ops run on several threads at once, so the total can exceed wall time.

    Returns:
      The `top` ops by milliseconds per step: {"op", "ms", "calls", "shape", "source"}.
    """
    import collections
    import re
    import tempfile

    import jax

    info = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\S+) ", line)
        if m:
            src = re.search(r'op_name="([^"]*)"', line)
            info[m.group(1)] = (m.group(2), src.group(1) if src else "")
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            fn()
        jax.profiler.stop_trace()
        path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb"))
        data = jax.profiler.ProfileData.from_file(path)
        agg = collections.defaultdict(lambda: [0.0, 0])
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in info:
                        agg[ev.name][0] += ev.duration_ns / 1e6 / steps
                        agg[ev.name][1] += 1
    rows = [
        {"op": k, "ms": v[0], "calls": v[1] // steps, "shape": info[k][0][:40],
         "source": re.sub(r"jit\(\w+\)/|closed_call/|Transformer\.", "", info[k][1])[-90:]}
        for k, v in agg.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["ms"])[:top]


# ----------------------------------------------------------------------------------------------------
# The same architecture in Hugging Face transformers (imported lazily).


def hf_llama_config(c: models.ModelConfig):
    """A `transformers.LlamaConfig` with our architecture: untied, no biases, same RoPE and norm."""
    import transformers

    if c.tie_embeddings or c.attention_bias or c.embed_scale or c.mlp_activation != "silu":
        raise ValueError("only Llama-style presets (untied, no biases, SwiGLU) have a transformers twin")
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_dim,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        use_cache=False, attn_implementation="sdpa", pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
