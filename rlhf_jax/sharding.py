"""Device mesh, logical-axis rules, and placement of parameters, optimizer state and batches.

Layers only name logical axes (``("embed", "mlp")``); this module owns the one table that maps them to
the mesh axes ``data``, ``fsdp`` and ``tensor``, and every placement goes through it. The same code runs
on one CPU, on 8 simulated CPU devices, and on a multi-host TPU pod (the mesh spans all devices of all
processes; `shard_batch` takes each process's share of the batch).

A mesh and a sharded model in five lines::

    from rlhf_jax import models, sharding
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=4, tensor=1))
    model = models.Transformer(models.preset("1b"), mesh=mesh)
    params = models.init_params(model, jax.random.key(0))  # born sharded, never whole on one device
    logits_BTV = jax.jit(model.apply)({"params": params}, sharding.shard_batch(tokens_BT, mesh))

The axes: ``data`` is pure data parallelism (parameters replicated), ``fsdp`` splits the batch *and*
the parameters' ``embed`` dimension (ZeRO-3 style: weights are all-gathered per layer), ``tensor`` splits
heads, MLP width and vocabulary (Megatron style). The mesh uses `AxisType.Auto` axes: steps are
`jax.jit` with `NamedSharding` in/out shardings plus sharding constraints at block boundaries, and the
compiler (GSPMD/Shardy) propagates the rest.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters use the first block, activations the second (`act_*` names keep
# the residual stream's width unsharded, so `batch` may use `fsdp` in the same array).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1, meaning all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Returns (data, fsdp, tensor) with -1 replaced; raises ValueError unless they use every device."""
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig{sizes}: sizes must be positive, with at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"MeshConfig(data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}): the fixed axes "
                    f"use {known} devices, which does not divide the {num_devices} devices available"
                )
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"MeshConfig(data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}) needs "
                f"{math.prod(sizes)} devices, but {num_devices} are available"
            )
        return sizes


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

    Args:
      config: axis sizes (-1 = the rest).
      devices: the devices to use; default `jax.devices()`.

    Returns:
      A Mesh with Auto axis types (sharding decided by the compiler from in/out shardings and
      constraints).
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = config.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def _mesh_axes(logical: str | None, rules) -> tuple[str, ...]:
    """The mesh axes one logical axis maps to (empty = replicated)."""
    if logical is None:
        return ()
    for name, target in rules:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    raise ValueError(f"logical axis {logical!r} has no rule in {[name for name, _ in rules]}")


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> PartitionSpec:
    """Resolves logical axis names to a PartitionSpec through the rules table."""
    spec, used = [], set()
    for logical in logical_axes:
        axes = _mesh_axes(logical, rules)
        if used.intersection(axes):
            raise ValueError(f"logical axes {tuple(logical_axes)} map mesh axis {used & set(axes)} twice")
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str = "array") -> None:
    """Raises ValueError, with the numbers, if a dimension does not divide the mesh axes it is split over."""
    if len(spec) > len(shape):
        raise ValueError(f"{what}: spec {spec} has more entries than the shape {tuple(shape)} has dimensions")
    for dim, (size, axes) in enumerate(zip(shape, spec, strict=False)):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise ValueError(
                f"{what}: dimension {dim} has size {size}, which does not divide into {parts} shards "
                f"over mesh axes {sizes} (shape {tuple(shape)}, spec {spec})"
            )


def logical_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    rules=LOGICAL_RULES,
    *,
    shape: Sequence[int] | None = None,
    what: str = "array",
) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry `logical_axes`; checks `shape` if given."""
    spec = logical_to_spec(logical_axes, rules)
    if shape is not None:
        check_divisible(shape, spec, mesh, what)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh | None, rules=LOGICAL_RULES) -> int:
    """How many pieces the batch dimension is split into on `mesh` (data x fsdp; 1 without a mesh)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in _mesh_axes("batch", rules))


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    """Sharding for [B, ...] arrays: B split over the mesh axes of logical `batch` (data x fsdp)."""
    return logical_sharding(mesh, ("batch",), rules)


def constrain(x: jax.Array, mesh: Mesh | None, logical_axes: Sequence[str | None], rules=LOGICAL_RULES):
    """Sharding constraint on an activation inside a jitted step; a no-op without a mesh."""
    if mesh is None:
        return x
    sharding = logical_sharding(mesh, logical_axes, rules, shape=x.shape, what="activation")
    return jax.lax.with_sharding_constraint(x, sharding)


def shard_batch(batch, mesh: Mesh, rules=LOGICAL_RULES):
    """Places a pytree of host arrays, each [B_local, ...], as global arrays split over the batch axes.

    In a multi-process run each process passes its own share of the batch (its rows, in process
    order); on one process `B_local` is the global batch.

    Args:
      batch: pytree of numpy (or array-like) leaves with a leading batch dimension.
      mesh: the mesh.
      rules: logical-axis rules.

    Returns:
      The same pytree of global `jax.Array`s sharded with `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh, rules)
    num_shards = math.prod(mesh.shape[a] for a in _mesh_axes("batch", rules))
    # How many distinct batch shards this process's devices hold; the global batch is B_local times
    # the number of such groups.
    starts = {idx[0].start for idx in sharding.addressable_devices_indices_map((num_shards,)).values()}
    groups = num_shards // len(starts)

    def place(path, x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * groups, *x.shape[1:])
        check_divisible(global_shape, sharding.spec, mesh, f"batch{jax.tree_util.keystr(path)}")
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(place, batch)


def process_rows(mesh: Mesh, global_batch_size: int, rules=LOGICAL_RULES) -> slice:
    """The rows of a global batch that this process must load for `shard_batch` (all rows on one process).

    Args:
      mesh: the mesh.
      global_batch_size: B, the global batch.
      rules: logical-axis rules.

    Returns:
      A slice of [0, B): the contiguous block of rows whose shards live on this process's devices.
    """
    sharding = batch_sharding(mesh, rules)
    check_divisible((global_batch_size,), sharding.spec, mesh, "global batch")
    indices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
    bounds = sorted(
        {(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop) for idx in indices}
    )
    if any(stop != start for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"this process's batch shards {bounds} are not contiguous; reorder the mesh devices")
    return slice(bounds[0][0], bounds[-1][1])


def shardings_like(tree, params, param_shardings, mesh: Mesh):
    """Shardings for a pytree (e.g. optimizer state) whose parameter-shaped parts mirror `params`.

    Every subtree with the structure of `params` (Adam's mu and nu, ...) gets the parameters' shardings
    where the leaf shape matches the parameter's (factored statistics that do not match are replicated);
    everything else (step counts, scalars) is replicated.

    Args:
      tree: the pytree to place, of arrays or `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(tx.init,
        params)`).
      params: the parameters (arrays or shape structs).
      param_shardings: the parameters' shardings, same structure as `params`.
      mesh: the mesh (for the replicated leaves).

    Returns:
      A pytree of NamedSharding with the structure of `tree`.
    """
    params_def = jax.tree.structure(params)
    is_params_like = lambda x: jax.tree.structure(x) == params_def and params_def.num_leaves > 1

    def for_subtree(sub):
        if not is_params_like(sub):
            return replicated(mesh)
        return jax.tree.map(
            lambda leaf, p, s: s if np.shape(leaf) == np.shape(p) else replicated(mesh),
            sub,
            params,
            param_shardings,
        )

    return jax.tree.map(for_subtree, tree, is_leaf=is_params_like)


def put(tree, sharding: NamedSharding):
    """Places host values that every process holds in full (prompts, PRNG keys) as global arrays.

    Unlike `jax.device_put`, it works when `sharding` spans devices of other processes: each process
    fills only its own shards (`jax.make_array_from_callback`). PRNG key arrays keep their type.
    """

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)
