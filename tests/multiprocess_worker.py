"""One process of the multi-process test: a DPO loss and gradient norm on a mesh spanning all processes.

Run by tests/test_multiprocess.py as ``python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT``
with XLA_FLAGS=--xla_force_host_platform_device_count=4 in its environment; `loss_and_grad_norm` is
also called in-process by that test for the one-process reference.
"""

import json
import sys

import jax
import numpy as np
import optax

from rlhf_jax import losses, models, sharding

MESH = sharding.MeshConfig(data=2, fsdp=2, tensor=2)
PAIRS, T = 4, 16


def global_batch() -> dict[str, np.ndarray]:
    """The same host batch in every process: chosen rows then rejected rows, right-padded."""
    rng = np.random.default_rng(0)
    tokens_BT = rng.integers(1, models.preset("tiny").vocab_size, size=(2 * PAIRS, T)).astype(np.int32)
    segment_ids_BT = (np.arange(T)[None] < rng.integers(8, T + 1, size=(2 * PAIRS, 1))).astype(np.int32)
    return {
        "tokens": tokens_BT * segment_ids_BT,
        "segment_ids": segment_ids_BT,
        "loss_mask": segment_ids_BT * (np.arange(T)[None] >= 4),
        "reference_logps": rng.normal(-40.0, 3.0, size=2 * PAIRS).astype(np.float32),
    }


def loss_and_grad_norm(mesh) -> tuple[float, float]:
    """Initialises the tiny model on `mesh`, loads this process's rows, returns (DPO loss, gradient norm)."""
    model = models.Transformer(models.preset("tiny"), mesh=mesh)
    params = models.init_params(model, jax.random.key(0))
    host = global_batch()
    rows = sharding.process_rows(mesh, 2 * PAIRS)
    batch = sharding.shard_batch({k: v[rows] for k, v in host.items()}, mesh)

    def loss_fn(params, batch):
        logits_BTV = model.apply({"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"])
        logps_B = losses.sequence_logps(
            logits=logits_BTV[:, :-1], targets=batch["tokens"][:, 1:], mask=batch["loss_mask"][:, 1:]
        )
        ref_B = batch["reference_logps"]
        return losses.dpo(
            policy_chosen_logps=logps_B[:PAIRS],
            policy_rejected_logps=logps_B[PAIRS:],
            reference_chosen_logps=ref_B[:PAIRS],
            reference_rejected_logps=ref_B[PAIRS:],
        ).mean()

    def step(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        return loss, optax.tree.norm(grads)

    replicated = sharding.replicated(mesh)
    step = jax.jit(
        step,
        in_shardings=(models.param_shardings(model), sharding.batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
    )
    loss, grad_norm = step(params, batch)
    return float(loss), float(grad_norm)


def main(port: str, num_processes: str, process_id: str, out_path: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=120,
    )
    assert jax.process_count() == int(num_processes) and jax.local_device_count() == 4, jax.devices()
    loss, grad_norm = loss_and_grad_norm(sharding.make_mesh(MESH))
    with open(out_path, "w") as f:
        json.dump({"loss": loss, "grad_norm": grad_norm, "devices": jax.device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
