"""`bench.tpu_plan`: TPU plans compiled by libtpu on this CPU host; the HLO collectives parser; the
attention kernel chosen by the target devices' platform.

Tests that compile for a TPU topology skip only when the `libtpu` wheel is absent (CI installs it
through the test extra). Compiling the `1b` preset takes minutes on two cores: those are `slow`.
"""

import importlib.util
import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bench import hlo_collectives, tpu_chips, tpu_plan  # noqa: E402
from rlhf_jax import models, sharding  # noqa: E402
from rlhf_jax.models import layers  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the libtpu wheel")

# A hand-written module: an all-gather in a while body whose trip count XLA recorded (7), an all-reduce
# (async start/done) in a loop nested in it whose count comes from its condition's constant (3), and a
# reduce-scatter in the entry whose operand shape is only on the operand's own line.
HLO = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_cond (p: (s32[], f32[16])) -> pred[] {
  %p = (s32[], f32[16]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner_body (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]) parameter(0)
  %x = f32[16]{0} get-tuple-element(%p), index=1
  %ars = f32[16]{0} all-reduce-start(%x), replica_groups={}, to_apply=%add
  %ard = f32[16]{0} all-reduce-done(%ars)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[16]) tuple(%i, %ard)
}

%outer_cond (p: (s32[], bf16[4,8])) -> pred[] {
  %p = (s32[], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(100)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %w = bf16[1,8]{1,0} constant({...})
  %ag = bf16[4,8]{1,0:T(8,128)(2,1)} all-gather(%w), dimensions={0}, replica_groups={}
  %z = (s32[], f32[16]) constant({...})
  %loop = (s32[], f32[16]) while(%z), condition=%inner_cond, body=%inner_body
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], bf16[4,8]) tuple(%i, %ag)
}

ENTRY %main (x: f32[64,32]) -> f32[16,32] {
  %x = f32[64,32]{1,0} parameter(0)
  %rs = f32[16,32]{1,0} reduce-scatter(%x), dimensions={0}, replica_groups={}, to_apply=%add
  %init = (s32[], bf16[4,8]) constant({...})
  %w = (s32[], bf16[4,8]) while(%init), condition=%outer_cond, body=%outer_body, TRIPS
  ROOT %r = f32[16,32]{1,0} copy(%rs)
}
""".replace("TRIPS", 'backend_config={"known_trip_count":{"n":"7"}}')


def test_collectives_parser_counts_loop_bodies_by_trip_count():
    s = hlo_collectives.summary(HLO)
    assert s["all-gather"] == {"count": 7, "bytes": 7 * 4 * 8 * 2, "ici_bytes": 7 * 64}
    assert s["all-reduce"]["count"] == 7 * 3  # start counted, done not; nested trip counts multiply
    assert s["all-reduce"]["bytes"] == 21 * 64 and s["all-reduce"]["ici_bytes"] == 2 * 21 * 64
    assert s["reduce-scatter"] == {"count": 1, "bytes": 64 * 32 * 4, "ici_bytes": 64 * 32 * 4}
    assert s["all-to-all"]["count"] == s["collective-permute"]["count"] == 0


def test_chip_table():
    assert tpu_chips.chip("v5e:4x4").hbm_bytes == 16 * 2**30
    assert tpu_chips.chip("v5p:4x4x2").hbm_bytes == 95 * 2**30
    assert tpu_chips.chip("v4:2x2x1").hbm_bytes == tpu_chips.chip("v6e:4x4").hbm_bytes == 32 * 2**30
    with pytest.raises(ValueError, match="known"):
        tpu_chips.chip("v9:2x2")


def test_does_not_fit_names_what_to_change():
    from launch import train

    config = train.resolve_config("dpo_tldr", ["--config.mesh.fsdp=4", "--config.model.remat=none"])
    row = {
        "step": "preference",
        "fits": False,
        "peak_GiB": 20.0,
        "arguments_GiB": 12.0,
        "temp_GiB": 8.0,
        "hbm_GiB": 16.0,
    }
    with pytest.raises(tpu_plan.DoesNotFitError) as e:
        tpu_plan.check_fits([row, {**row, "step": "decode", "fits": True}], config, "v5e:2x2")
    msg = str(e.value)
    assert "preference needs 20.0 GiB" in msg and "decode" not in msg
    for hint in ("--config.mesh.fsdp", "now 4", "remat=full", "now 'none'", "--config.train.batch_size"):
        assert hint in msg
    tpu_plan.check_fits([{**row, "fits": True}], config, "v5e:2x2")  # fits: no error


@needs_libtpu
def test_cli_exits_nonzero_when_a_step_does_not_fit(capsys):
    # The decode step of 2^16 prompts x 2 samples holds a ~35 GiB cache per v5e chip (tiny: 2 layers, f32).
    rc = tpu_plan.main(
        [
            "--experiment=dpo_tldr",
            "--preset=tiny",
            "--topology=v5e:2x2",
            "--steps=decode",
            "--config.mesh.data=4",
            "--config.eval.num_prompts=65536",
            "--config.data.max_len=1024",
            "--config.data.max_prompt_len=1000",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "decode needs" in err and "--config.mesh.fsdp" in err


def _tiny_forward_text(mesh) -> str:
    c = models.preset("tiny")
    model = models.Transformer(c, mesh=mesh)
    params = models.param_shapes(models.Transformer(c))
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    return str(jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(params, tokens))


@needs_libtpu
def test_attention_kernel_follows_the_mesh_platform():
    tpu = tpu_plan.topology_devices("v5e:2x2")
    tpu_mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=1), tpu)
    cpu_mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=1), jax.devices()[:4])
    assert layers.target_platform(tpu_mesh) == "tpu"
    assert layers.target_platform(cpu_mesh) == "cpu"
    assert layers.target_platform(None) == jax.default_backend()
    # The CPU kernel (`causal_attention`, a blockwise custom VJP) is traced only for the CPU.
    assert "causal_attention" in _tiny_forward_text(cpu_mesh)
    assert "causal_attention" not in _tiny_forward_text(tpu_mesh)


@needs_libtpu
def test_fused_head_logps_keeps_rows_on_their_shard_for_tpu():
    """Compiled for 4 TPU chips with the batch split over them, the fused LM-head log-probs
    (`losses.sequence_logps_from_hidden`, forward and gradient) communicate only the head's gradient
    (one all-reduce of [D, V]) when each shard compacts its own rows; one global compaction (shards=1)
    all-reduces partial [C, V] logits blocks at every chunk."""
    from rlhf_jax import losses

    devices = tpu_plan.topology_devices("v5e:2x2")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=1), devices)
    b, t, d, v = 16, 128, 64, 4096
    bs, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=bs),
            jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=bs),
            jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=bs))  # fmt: skip

    def moved(shards):
        def f(h, w, y, m):
            kw = dict(hidden=h, kernel=w, targets=y, mask=m, shards=shards, platform="tpu")
            return jnp.sum(losses.sequence_logps_from_hidden(**kw))

        hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile().as_text()
        return sum(row["bytes"] for row in hlo_collectives.summary(hlo).values())

    head_grad = d * v * 4
    assert moved(sharding.batch_shards(mesh)) <= 1.1 * head_grad
    assert moved(1) > 4 * head_grad  # the check can fail: the global compaction's traffic


def _state_bytes_check(preset: str, pairs: int, max_len: int, *extra: str):
    from launch import train

    config = train.resolve_config(
        "dpo_tldr",
        [
            f"--config.model.preset={preset}",
            "--config.model.dtype=bfloat16",
            "--config.model.remat=full",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=4",
            "--config.train.reference=precomputed",
            f"--config.train.batch_size={pairs}",
            f"--config.data.max_len={max_len}",
            f"--config.data.max_prompt_len={max_len // 2}",
            *extra,
        ],
    )
    from bench import tpu_steps

    mesh = sharding.make_mesh(
        sharding.MeshConfig(data=1, fsdp=4, tensor=1), tpu_plan.topology_devices("v5e:2x2")
    )
    step = tpu_steps.build("preference", config, mesh)
    row = tpu_plan.analyse(step, tpu_chips.chip("v5e:2x2"), 4)
    assert row["fits"], row
    # Arguments per chip: the train state (params + AdamW moments) split four ways, plus the batch.
    expected = step.param_bytes / 4
    np.testing.assert_allclose(row["arguments_GiB"] * 2**30, expected, rtol=0.05)
    assert row["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the weights


@needs_libtpu
@pytest.mark.slow
def test_small_preset_compiles_for_v5e_with_fsdp():
    # TPU layouts tile an array's two minor dimensions to (8 or 16, 128): `small`'s 64-wide heads and
    # 704-wide MLP would be padded (+24% argument bytes, measured), so its widths are set to multiples
    # of 128 here, as `1b`'s and `7b`'s are.
    _state_bytes_check("small", 8, 256, "--config.model.head_dim=128", "--config.model.mlp_dim=768")


@needs_libtpu
@pytest.mark.slow
def test_1b_preset_compiles_for_v5e_with_fsdp():
    _state_bytes_check("1b", 8, 512)
