"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), as a transformation of
the parameter tree.

A targeted projection y = x W (W [I, O]) becomes

    y = x W + (α / r) · dropout(x) A B,        A [I, r], B [r, O], B = 0 at init,

with the base W frozen and only (A, B) trained. A is initialised as PEFT does (Kaiming-uniform with
a = √5, i.e. U(-1/√I, 1/√I)), so a fresh adapter is the identity map of the base model.

The adapters live in their own tree, mirroring the paths of the kernels they adapt::

    adapters["decoder"]["layers"]["attn"]["q_kernel"] = {"a": [L, D, r], "b": [L, r, H, K]}

`attach(base, adapters, config)` returns the base tree with, next to each adapted kernel, the leaves
`{kernel}_lora_a` and `{kernel}_lora_b` (B already scaled by α / r), and, with dropout, a per-layer key
and rate. The decoder's projections (`rlhf_jax.models.layers.lora_delta`) add x A B wherever those leaves
exist, so every model (policy, reference, reward model), the KV-cached sampler and the scorer run
unchanged on an attached tree: nothing is merged, and no second copy of the base weights exists. The
base with the adapters left off is the policy at initialisation, which is the DPO/RL reference
(`objective` passes the base as the step's reference params, as TRL does with PEFT's disabled
adapters).

Only the adapters are in the optimizer state and the checkpoints; `merge` folds them into the base
(W + α/r · A B) for a plain parameter tree (export, later stages), and `rlhf_jax.interop.export_peft`
writes them in PEFT's format.

Dropout. PEFT drops each input element of each adapter independently per token; so do we (the
decoder draws the mask from the attached key), with a fresh key per step and micro-batch (`objective`
takes the step's key from `rlhf_jax.train.steps`).

    cfg = lora.LoRAConfig(rank=16, alpha=32, targets=("q", "v"))
    adapters = lora.init(params, cfg, model.config, jax.random.key(0))
    logits_BTV = model.apply({"params": lora.attach(params, adapters, cfg)}, tokens_BT)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax import sharding

# Target name -> (module, kernel) inside a decoder layer, with how many leading kernel dims are inputs.
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("attn", "q_kernel", 1),
    "k": ("attn", "k_kernel", 1),
    "v": ("attn", "v_kernel", 1),
    "o": ("attn", "o_kernel", 2),
    "gate": ("mlp", "gate_kernel", 1),
    "up": ("mlp", "up_kernel", 1),
    "down": ("mlp", "down_kernel", 1),
}
# Suffixes of the leaves `attach` adds next to a kernel / inside a module.
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"
DROPOUT_KEY, DROPOUT_RATE = "lora_dropout_key", "lora_dropout_rate"
RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Attributes:
    rank: r, the adapters' inner dimension (> 0).
    alpha: α; the update is scaled by α / r (PEFT's `lora_alpha`).
    dropout: probability of dropping an adapter input element during training (PEFT's `lora_dropout`).
    targets: which projections get adapters: any of q, k, v, o, gate, up, down.
    """

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank <= 0:
            raise ValueError(f"lora rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"lora targets must be distinct names from {list(TARGETS)}, got {list(self.targets)}"
            )

    @property
    def scale(self) -> float:
        """α / r."""
        return self.alpha / self.rank


def _layer_dicts(tree) -> list[tuple[tuple[str, ...], dict, bool]]:
    """(path, layer dict, stacked) of every decoder layer of a params tree: `decoder/layers` (stacked
    under a scan, leading L axis) or `decoder/layers_i`."""
    decoder = tree["decoder"]
    if "layers" in decoder:
        return [(("decoder", "layers"), decoder["layers"], True)]
    names = sorted((k for k in decoder if k.startswith("layers_")), key=lambda k: int(k[len("layers_") :]))
    return [(("decoder", k), decoder[k], False) for k in names]


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of nested dict `tree` with `path` set (the dicts along the path copied, leaves shared)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set(tree.get(path[0], {}), path[1:], value)
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def adapter_shapes(params, config: LoRAConfig) -> dict:
    """The adapters' shapes and dtypes (`jax.ShapeDtypeStruct`), from params or their shapes."""
    out: dict = {}
    for path, layer, stacked in _layer_dicts(params):
        lead = 1 if stacked else 0
        for target in config.targets:
            module, kernel, n_in = TARGETS[target]
            w = layer[module][kernel]
            in_dims, out_dims = w.shape[lead : lead + n_in], w.shape[lead + n_in :]
            L = w.shape[:lead]
            a = jax.ShapeDtypeStruct((*L, *in_dims, config.rank), w.dtype)
            b = jax.ShapeDtypeStruct((*L, config.rank, *out_dims), w.dtype)
            out = _set(out, (*path, module, kernel), {"a": a, "b": b})
    return out


def logical_axes(param_axes, config: LoRAConfig) -> dict:
    """Logical axes of the adapters from those of the params (`models.param_logical_axes`): A keeps its
    kernel's input axes, B its output axes, and the rank axis is replicated (`lora_rank`)."""
    out: dict = {}
    for path, layer, stacked in _layer_dicts(param_axes):
        lead = 1 if stacked else 0
        for target in config.targets:
            module, kernel, n_in = TARGETS[target]
            axes = tuple(layer[module][kernel])
            L, ins, outs = axes[:lead], axes[lead : lead + n_in], axes[lead + n_in :]
            out = _set(
                out, (*path, module, kernel), {"a": (*L, *ins, RANK_AXIS), "b": (*L, RANK_AXIS, *outs)}
            )
    return out


def shardings(param_axes, config: LoRAConfig, mesh, rules=sharding.LOGICAL_RULES) -> dict:
    """NamedSharding of every adapter under the params' rules table (`lora_rank` replicated)."""
    rules = tuple(rules) if any(n == RANK_AXIS for n, _ in rules) else (*rules, (RANK_AXIS, None))
    axes = logical_axes(param_axes, config)
    return jax.tree.map(
        lambda names: sharding.logical_sharding(mesh, names, rules),
        axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init(params, config: LoRAConfig, rng: jax.Array) -> dict:
    """Fresh adapters for `params` (arrays or shapes): A ~ U(-1/√I, 1/√I) (PEFT's Kaiming-uniform,
    a = √5), B = 0, in the kernels' dtype. Every adapter gets its own key (folded from its path)."""
    shapes = adapter_shapes(params, config)

    def one(path, s):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "b":
            return jnp.zeros(s.shape, s.dtype)
        stacked = "layers" in names
        fan_in = math.prod(s.shape[(1 if stacked else 0) : -1])
        key = jax.random.fold_in(rng, _path_id(names))
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, s.shape, jnp.float32, -bound, bound).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def _path_id(names) -> int:
    """A stable 31-bit id of a path (for folding keys; Python's hash() is salted per process)."""
    h = 0
    for ch in "/".join(names):
        h = (h * 131 + ord(ch)) % (2**31 - 1)
    return h


def attach(base, adapters, config: LoRAConfig, *, rng: jax.Array | None = None) -> dict:
    """The base params with the adapters next to their kernels (B scaled by α / r), for `model.apply`.

    Args:
      base: the frozen params (scanned or unrolled layout).
      adapters: from `init` (the same layout).
      config: the LoRA settings.
      rng: a key for dropout (training); None, or `config.dropout == 0`: no dropout (evaluation,
        sampling).

    Returns:
      A params tree for the unchanged model; its leaves are the base's and the adapters' (no copy but
      the scaled B).
    """
    out = base
    for path, _, stacked in _layer_dicts(adapters):
        modules = {TARGETS[t][0] for t in config.targets}
        for target in config.targets:
            module, kernel, _ = TARGETS[target]
            ad = _get(adapters, (*path, module, kernel))
            out = _set(out, (*path, module, kernel + A_SUFFIX), ad["a"])
            out = _set(
                out, (*path, module, kernel + B_SUFFIX), ad["b"] * jnp.asarray(config.scale, ad["b"].dtype)
            )
        if rng is None or config.dropout == 0:
            continue
        n = _get(adapters, path)
        L = jax.tree.leaves(n)[0].shape[0] if stacked else None
        layer_key = jax.random.fold_in(rng, _path_id(path))
        for module in sorted(modules):
            key = jax.random.fold_in(layer_key, _path_id((module,)))
            if stacked:
                keys = jax.random.key_data(jax.random.split(key, L))
                rate = jnp.full((L,), config.dropout, jnp.float32)
            else:
                keys, rate = jax.random.key_data(key), jnp.asarray(config.dropout, jnp.float32)
            out = _set(out, (*path, module, DROPOUT_KEY), keys)
            out = _set(out, (*path, module, DROPOUT_RATE), rate)
    return out


def merge(base, adapters, config: LoRAConfig) -> dict:
    """A plain params tree: each adapted kernel W + (α / r) A B, computed in float32, stored in W's dtype.

    For export and for the stages after a LoRA stage; the result is a full copy of the adapted kernels.
    """
    out = base
    for path, _, stacked in _layer_dicts(adapters):
        for target in config.targets:
            module, kernel, n_in = TARGETS[target]
            w = _get(base, (*path, module, kernel))
            ad = _get(adapters, (*path, module, kernel))
            out = _set(out, (*path, module, kernel), _merged(w, ad["a"], ad["b"], config.scale, stacked))
    return out


@jax.jit
def _delta(a, b):
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def _merged(w, a, b, scale: float, stacked: bool):
    if stacked:
        delta = jax.vmap(_delta)(a, b)
    else:
        delta = _delta(a, b)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def objective(inner: Callable, config: LoRAConfig) -> Callable:
    """`inner(params, batch, reference_params)` as an objective of the adapters.

    The wrapped objective is `(adapters, batch, base, rng=None) -> inner(attach(base, adapters), batch,
    base)`: the step's read-only input is the frozen base, which is also the reference policy (the
    adapters disabled), so DPO and KL-regularised RL read their reference from the same weights. `rng`
    (the step's key, `rlhf_jax.train.steps.train_step`) drives the adapters' dropout.
    """

    def wrapped(adapters, batch, base, rng=None):
        return inner(attach(base, adapters, config, rng=rng), batch, base)

    wrapped.takes_rng = config.dropout > 0  # `steps.train_step` then passes the step's key
    return wrapped


def trainable_count(adapters) -> int:
    """Number of adapter parameters."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
