"""LoRA (`rlhf_jax.lora`): the attached forward against the merged weights and a NumPy merge, the frozen
base as the reference, adapters-only optimizer state, sharding by the rules table, exact checkpoint
restore, dropout, PEFT export against `peft` on `transformers`, and the pipelines through the CLI."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from workdirs import stage_dir

from rlhf_jax import lora, models, sharding
from rlhf_jax.pipelines import config as config_lib
from rlhf_jax.pipelines import fingerprints, training
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.train import optim, steps
from rlhf_jax.train.checkpoint import Checkpointer

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _setup(scan_layers=True, targets=ALL, rank=4, alpha=8.0, dropout=0.0, seed=0):
    cfg = models.preset("tiny", scan_layers=scan_layers)
    model = models.Transformer(cfg)
    params = models.init_params(model, jax.random.key(seed))
    lc = lora.LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    adapters = lora.init(params, lc, jax.random.key(seed + 1))
    # Nonzero B (a fresh adapter is the identity), so every product is exercised.
    noise = lambda x, k: x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
    adapters = jax.tree.unflatten(treedef, [noise(x, k) for x, k in zip(leaves, keys, strict=True)])
    return model, params, lc, adapters


TOKENS_BT = (np.arange(2 * 16).reshape(2, 16) * 7 % 250).astype(np.int32)


def _numpy_merge(params, adapters, lc, scan_layers=True):
    """W + α/r · A B for every target, in NumPy, one layer at a time (independent of `lora.merge`)."""
    merged = jax.tree.map(np.asarray, params)
    layers = [("layers", None)] if scan_layers else [(f"layers_{i}", i) for i in range(2)]
    for name, _ in layers:
        for t in lc.targets:
            module, kernel, n_in = lora.TARGETS[t]
            w = merged["decoder"][name][module][kernel]
            ad = adapters["decoder"][name][module][kernel]
            a, b = np.asarray(ad["a"]), np.asarray(ad["b"])
            per_layer = [(w[i], a[i], b[i]) for i in range(w.shape[0])] if scan_layers else [(w, a, b)]
            out = []
            for w_l, a_l, b_l in per_layer:
                a2 = a_l.reshape(-1, lc.rank)
                b2 = b_l.reshape(lc.rank, -1)
                out.append(w_l + lc.alpha / lc.rank * (a2 @ b2).reshape(w_l.shape))
            merged["decoder"][name][module][kernel] = np.stack(out) if scan_layers else out[0]
    return merged


@pytest.mark.parametrize("scan_layers", [True, False])
def test_attached_forward_equals_merged_weights_and_fresh_adapters_are_identity(scan_layers):
    model, params, lc, adapters = _setup(scan_layers=scan_layers)
    base = model.apply({"params": params}, TOKENS_BT)
    attached = model.apply({"params": lora.attach(params, adapters, lc)}, TOKENS_BT)
    merged_np = model.apply({"params": _numpy_merge(params, adapters, lc, scan_layers)}, TOKENS_BT)
    merged = model.apply({"params": lora.merge(params, adapters, lc)}, TOKENS_BT)
    assert float(jnp.max(jnp.abs(attached - base))) > 0.1  # the adapters change the model
    np.testing.assert_allclose(attached, merged_np, atol=2e-5, rtol=0)
    np.testing.assert_allclose(merged, merged_np, atol=2e-5, rtol=0)
    fresh = lora.init(params, lc, jax.random.key(5))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(fresh) if x.shape[-1] != lc.rank)
    np.testing.assert_array_equal(model.apply({"params": lora.attach(params, fresh, lc)}, TOKENS_BT), base)


def test_init_matches_peft_kaiming_uniform_bound():
    _, params, lc, _ = _setup()
    fresh = lora.init(params, lc, jax.random.key(3))
    a_q = np.asarray(fresh["decoder"]["layers"]["attn"]["q_kernel"]["a"])  # [L, D, r], fan-in D = 64
    a_o = np.asarray(fresh["decoder"]["layers"]["attn"]["o_kernel"]["a"])  # [L, H, K, r], fan-in 128
    assert a_q.shape == (2, 64, 4) and a_o.shape == (2, 8, 16, 4)
    assert 0.9 / 8 < np.abs(a_q).max() <= 1 / 8 and 0.9 / 128**0.5 < np.abs(a_o).max() <= 1 / 128**0.5
    assert fresh["decoder"]["layers"]["attn"]["q_kernel"]["b"].shape == (2, 4, 8, 16)


def test_only_targets_are_adapted():
    model, params, lc, adapters = _setup(targets=("q", "down"))
    assert set(adapters["decoder"]["layers"]["attn"]) == {"q_kernel"}
    assert set(adapters["decoder"]["layers"]["mlp"]) == {"down_kernel"}
    merged = lora.merge(params, adapters, lc)
    for module, kernel in (("attn", "k_kernel"), ("attn", "v_kernel"), ("mlp", "up_kernel")):
        assert merged["decoder"]["layers"][module][kernel] is params["decoder"]["layers"][module][kernel]
    np.testing.assert_allclose(
        model.apply({"params": lora.attach(params, adapters, lc)}, TOKENS_BT),
        model.apply({"params": merged}, TOKENS_BT),
        atol=2e-5,
    )


def test_reward_model_and_kv_cache_run_unchanged_on_attached_params():
    model, params, lc, adapters = _setup()
    attached, merged = lora.attach(params, adapters, lc), lora.merge(params, adapters, lc)
    rm = models.RewardModel(model.config)
    head = models.init_params(rm, jax.random.key(9))["reward_head"]
    r_att = rm.apply({"params": {"decoder": attached["decoder"], "reward_head": head}}, TOKENS_BT)
    r_mer = rm.apply({"params": {"decoder": merged["decoder"], "reward_head": head}}, TOKENS_BT)
    np.testing.assert_allclose(r_att, r_mer, atol=2e-5)
    # Prefill + decode on the attached tree equals the full forward of the merged weights.
    full_BTV = model.apply({"params": merged}, TOKENS_BT)
    cache = models.init_cache(model.config, 2, 32)
    logits_BV, cache = models.prefill(model, attached, TOKENS_BT[:, :10], jnp.full((2,), 10), cache)
    np.testing.assert_allclose(logits_BV, full_BTV[:, 9], atol=5e-5)
    for t in range(10, 16):
        logits_BV, cache = models.decode_step(model, attached, TOKENS_BT[:, t], cache)
        np.testing.assert_allclose(logits_BV, full_BTV[:, t], atol=5e-5)


def test_dropout_is_per_element_inverted_and_keyed():
    model, params, _, adapters = _setup()
    lc = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.5)
    plain = model.apply({"params": lora.attach(params, adapters, lc)}, TOKENS_BT)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    d1 = model.apply({"params": lora.attach(params, adapters, lc, rng=k1)}, TOKENS_BT)
    d1b = model.apply({"params": lora.attach(params, adapters, lc, rng=k1)}, TOKENS_BT)
    d2 = model.apply({"params": lora.attach(params, adapters, lc, rng=k2)}, TOKENS_BT)
    np.testing.assert_array_equal(d1, d1b)
    assert float(jnp.max(jnp.abs(d1 - d2))) > 1e-3 and float(jnp.max(jnp.abs(d1 - plain))) > 1e-3
    no_drop = dataclasses.replace(lc, dropout=0.0)
    np.testing.assert_array_equal(
        model.apply({"params": lora.attach(params, adapters, no_drop, rng=k1)}, TOKENS_BT), plain
    )
    # The mask: the adapter's delta of one projection with x = 1 is (1/(1-p))·(mask @ A B); over many
    # elements its mean equals A B's column sums and about half the inputs are dropped.
    from flax import linen as nn

    from rlhf_jax.models.layers import lora_delta

    class Probe(nn.Module):
        config: models.ModelConfig

        @nn.compact
        def __call__(self, x):
            return lora_delta(self, "w", x)

    probe = Probe(model.config)
    a = np.eye(4, dtype=np.float32)[:, :2]  # I = 4 inputs, r = 2: the delta's columns are inputs 0 and 1
    b = np.eye(2, dtype=np.float32)
    tree = {"w_lora_a": a, "w_lora_b": b, "lora_dropout_key": jax.random.key_data(k1),
            "lora_dropout_rate": np.float32(0.25)}  # fmt: skip
    out = np.asarray(probe.apply({"params": tree}, jnp.ones((20_000, 4))))
    np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((out == 0).mean() - 0.25) < 0.01 and abs(out.mean() - 1.0) < 0.02


def test_reference_is_the_base_and_only_adapters_are_trained():
    """The wrapped objective's reference params are the base: reference log-probs with the adapters
    disabled equal the base model's, while the policy's differ; gradients and optimizer state cover
    the adapters alone."""
    model, params, lc, adapters = _setup()
    ones = np.ones_like(TOKENS_BT)
    batch = {"tokens": TOKENS_BT, "targets": np.roll(TOKENS_BT, -1, 1), "loss_mask": ones.astype(np.float32),
             "segment_ids": ones}  # fmt: skip

    def inner(p, b, reference):
        pol = steps.sequence_logps(model, p, b["tokens"], b["targets"], b["loss_mask"], b["segment_ids"])
        ref = steps.sequence_logps(
            model, reference, b["tokens"], b["targets"], b["loss_mask"], b["segment_ids"]
        )
        return -jnp.sum(pol), {"policy": pol, "reference": ref}

    wrapped = lora.objective(inner, lc)
    (_, sums), grads = jax.value_and_grad(wrapped, has_aux=True)(adapters, batch, params)
    base_logps = steps.sequence_logps(model, params, batch["tokens"], batch["targets"], batch["loss_mask"],
                                      batch["segment_ids"])  # fmt: skip
    np.testing.assert_array_equal(sums["reference"], base_logps)
    assert float(jnp.max(jnp.abs(sums["policy"] - base_logps))) > 0.1
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))

    train = config_lib.TrainConfig(steps=3, batch_size=2)
    step_fn, state = training.setup(
        optim.OptimConfig(learning_rate=1e-3), train, seed=0, mesh=sharding.make_mesh(), model=model,
        params=params, objective=functools.partial(steps.sft_objective, model=model),
        weight_fn=steps.sft_weight, lora=lc,
    )  # fmt: skip
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
    opt_numel = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert opt_numel <= 2 * lora.trainable_count(state.params) + 16  # AdamW's two moments (+ counters)
    assert lora.trainable_count(state.params) < models.param_count(model.config) / 5


def _sft_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 250, size=(8, 16)).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((8, 16), np.float32),
            "segment_ids": np.ones((8, 16), np.int32), "weights": np.ones((8,), np.float32)}  # fmt: skip


@pytest.mark.parametrize("accum", [1, 2])
def test_lora_step_on_a_mesh_equals_one_device_and_restores_exactly(tmp_path, accum):
    """Adapters sharded by the params' rules (A's input axes, B's output axes); the sharded step gives
    the single-device result; an Orbax checkpoint of the state restores every adapter bit for bit."""
    cfg = models.preset("tiny")
    lc = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
    train = config_lib.TrainConfig(steps=3, batch_size=8, grad_accum_steps=accum)
    oc = optim.OptimConfig(learning_rate=1e-2)
    results = {}
    for name, mesh_cfg in (
        ("one", sharding.MeshConfig(data=1)),
        ("mesh", sharding.MeshConfig(data=1, fsdp=2, tensor=4)),
    ):
        devices = jax.devices()[:1] if name == "one" else jax.devices()
        mesh = sharding.make_mesh(mesh_cfg, devices)
        model = models.Transformer(cfg, mesh=mesh)
        params = models.init_params(model, jax.random.key(0))
        step_fn, state = training.setup(
            oc, train, seed=0, mesh=mesh, model=model, params=params,
            objective=functools.partial(steps.sft_objective, model=model), weight_fn=steps.sft_weight,
            lora=lc,
        )  # fmt: skip
        if name == "mesh":
            sh = state.params["decoder"]["layers"]["attn"]["q_kernel"]
            assert sh["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
            assert sh["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
        losses_ = []
        for _ in range(3):
            state, m = step_fn(state, sharding.shard_batch(_sft_batch(), mesh), params)
            losses_.append(float(m["loss"]))
        results[name] = (losses_, jax.tree.map(np.asarray, state.params))
        if name == "mesh":
            ckpt = Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=1, async_save=False)
            ckpt.save(3, state, force=True)
            ckpt.wait()
            _, fresh = training.setup(
                oc, train, seed=1, mesh=mesh, model=model, params=params,
                objective=functools.partial(steps.sft_objective, model=model), weight_fn=steps.sft_weight,
                lora=lc,
            )  # fmt: skip
            _, restored = ckpt.restore(None, fresh)
            ckpt.close()
            for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert results["one"][0][0] > results["one"][0][-1]  # it learns
    np.testing.assert_allclose(results["mesh"][0], results["one"][0], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(results["mesh"][1]), jax.tree.leaves(results["one"][1]), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_config_keys_validate_and_enter_the_fingerprint_only_when_set():
    t = config_lib.TrainConfig(lora_rank=8, lora_targets="q,v", lora_alpha=16)
    assert t.lora() == lora.LoRAConfig(rank=8, alpha=16.0, targets=("q", "v"))
    assert config_lib.TrainConfig().lora() is None
    with pytest.raises(ValueError, match="lora_targets"):
        config_lib.TrainConfig(lora_rank=8, lora_targets="q,attn")
    with pytest.raises(ValueError, match="lora_dropout"):
        config_lib.TrainConfig(lora_rank=8, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_rank"):
        config_lib.TrainConfig(lora_rank=-1)

    from launch.train import resolve_config

    config = resolve_config("dpo_tldr:smoke", [])
    full = fingerprints.trainer_spec(config_lib.stage_config(config, "train"), kind="policy", loss=True)
    assert not any(k.startswith("lora") for k in full["train"])  # old fingerprints still match
    config.train.lora_rank = 4
    spec = fingerprints.trainer_spec(config_lib.stage_config(config, "train"), kind="policy", loss=True)
    assert spec["train"]["lora_rank"] == 4 and spec["train"]["lora_targets"] == list(ALL)
    config.rm = config.train
    with pytest.raises(ValueError, match="config.rm.lora_rank"):
        config_lib.stage_config(config, "rm")


# ----------------------------------------------------------------------------------------------------
# PEFT export, against `peft` on `transformers`.

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_export_loads_in_peft_with_matching_logits(tmp_path, family):
    peft = pytest.importorskip("peft")
    from rlhf_jax import interop

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    make = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(make(**shape), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 0.2 if p.ndim == 2 else 0.1)
            if "norm" in name:
                p.add_(1.0)
    base_dir = str(tmp_path / "base")
    hf.save_pretrained(base_dir)
    config = interop.load_config(base_dir)
    model = models.Transformer(config)
    params = interop.import_params(base_dir, model)
    lc = lora.LoRAConfig(rank=4, alpha=12.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    adapters = lora.init(params, lc, jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    ours = np.asarray(model.apply({"params": lora.attach(params, adapters, lc)}, TOKENS_BT[:, :12] % 128))

    out = str(tmp_path / "adapters")
    interop.export_peft(adapters, lc, config, out, base_model=base_dir)
    saved = json.load(open(os.path.join(out, "adapter_config.json")))
    assert saved["r"] == 4 and saved["lora_alpha"] == 12.0 and saved["peft_type"] == "LORA"
    peft_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"), out
    ).eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy((TOKENS_BT[:, :12] % 128).astype(np.int64))).logits.numpy()
        base_logits = hf(torch.from_numpy((TOKENS_BT[:, :12] % 128).astype(np.int64))).logits.numpy()
    assert np.abs(theirs - base_logits).max() > 0.1  # the adapters were loaded and change the model
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # The merged weights, exported as a plain checkpoint, give the same logits in transformers.
    merged_dir = str(tmp_path / "merged")
    interop.export_params(lora.merge(params, adapters, lc), config, merged_dir, source=base_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        merged = reloaded(torch.from_numpy((TOKENS_BT[:, :12] % 128).astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(merged, theirs, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sft_then_lora_dpo_through_the_cli_then_peft_export(tmp_path):
    """SFT (full) → DPO with LoRA at smoke size: the policy stage keeps adapters + lora.json and merged
    params; its held-out reference log-probs are the SFT policy's (the frozen base); `export --peft`
    writes the adapters, and the adapters on the SFT weights equal the merged params."""
    import subprocess
    import sys

    from rlhf_jax.interop import __main__ as cli

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "launch.train", "--experiment=dpo_tldr:smoke", f"--workdir={workdir}",
           "--config.train.lora_rank=4", "--config.train.lora_dropout=0.1",
           "--config.train.lora_targets=q,v,down",
           "--config.train.learning_rate=1e-2", "--config.progress=false"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LoRA rank 4" in out.stdout
    policy_dir, sft_dir = stage_dir(workdir, "policy"), stage_dir(workdir, "sft")
    assert json.load(open(os.path.join(policy_dir, "lora.json")))["targets"] == ["q", "v", "down"]
    model, merged = workdir_io.load_lm(policy_dir, None)
    _, sft_params = workdir_io.load_lm(sft_dir, None)
    adapters, lc = workdir_io.load_adapters(policy_dir, sft_params)
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(adapters))
    tokens = TOKENS_BT % model.config.vocab_size
    np.testing.assert_allclose(
        model.apply({"params": lora.attach(sft_params, adapters, lc)}, tokens),
        model.apply({"params": merged}, tokens),
        atol=2e-5,
    )
    # Only the adapted kernels moved.
    for path, x in jax.tree_util.tree_flatten_with_path(merged)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        y = sft_params
        for k in keys:
            y = y[k]
        changed = not np.array_equal(np.asarray(x), np.asarray(y))
        assert changed == (keys[-1] in ("q_kernel", "v_kernel", "down_kernel")), keys
    assert np.isfinite(workdir_io.read_results(policy_dir)["eval_loss"])
    peft_dir = str(tmp_path / "peft")
    assert cli.main(["export", "--workdir", workdir, "--out", peft_dir, "--peft"]) == 0
    assert os.path.exists(os.path.join(peft_dir, "adapter_model.safetensors"))
    assert json.load(open(os.path.join(peft_dir, "adapter_config.json")))["target_modules"] == [
        "down_proj", "q_proj", "v_proj"
    ]  # fmt: skip


@pytest.mark.slow
def test_grpo_with_lora_reads_its_kl_reference_from_the_base(tmp_path):
    """`grpo_arith:smoke` with LoRA and β > 0: the KL term is against the frozen base (the SFT policy, no
    second copy), the update moves the policy (KL > 0 after the first iteration), and only the adapted
    kernels of the saved policy differ from the SFT policy's."""
    import subprocess
    import sys

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "launch.train", "--experiment=grpo_arith:smoke", f"--workdir={workdir}",
           "--config.train.lora_rank=4", "--config.train.lora_targets=q,o,up", "--config.grpo.beta=0.5",
           "--config.grpo.iterations=3", "--config.train.learning_rate=3e-2",
           "--config.progress=false"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    policy_dir, sft_dir = stage_dir(workdir, "policy"), stage_dir(workdir, "sft")
    records = [json.loads(line) for line in open(os.path.join(policy_dir, "metrics.jsonl"))]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first samples come from the base itself
    assert records[-1]["kl"] > 0.0
    _, merged = workdir_io.load_lm(policy_dir, None)
    _, sft_params = workdir_io.load_lm(sft_dir, None)
    for name, module in (
        ("q_kernel", "attn"),
        ("o_kernel", "attn"),
        ("up_kernel", "mlp"),
        ("k_kernel", "attn"),
    ):
        moved = not np.array_equal(
            merged["decoder"]["layers"][module][name], sft_params["decoder"]["layers"][module][name]
        )
        assert moved == (name != "k_kernel"), name
