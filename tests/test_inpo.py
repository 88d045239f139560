"""INPO's online loop: iteration 1 is IPO with β = η; the previous-iterate log-probs are π_t's."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from workdirs import stage_dir

from experiments import inpo_tldr
from launch import overrides, train
from rlhf_jax import losses, sharding
from rlhf_jax.data import pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.pipelines import preference
from rlhf_jax.pipelines import workdir as workdir_io
from rlhf_jax.pipelines.inpo import _tournament
from rlhf_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inpo_loss_with_previous_equal_reference_is_ipo_with_beta_eta():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-30, 5, 16).astype(np.float32) for _ in range(4))
    kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
              reference_rejected_logps=rr)  # fmt: skip
    np.testing.assert_allclose(
        losses.inpo(**kw, previous_chosen_logps=rc, previous_rejected_logps=rr, eta=0.005),
        losses.ipo(**kw, beta=0.005),
        rtol=1e-5,
    )


def test_tournament_finds_the_best_and_the_worst():
    strength = np.array([[3.0, 1.0, 4.0, 1.5, 9.0, 2.0, 6.0, 5.0], [0.0, -1.0, 2.0, 8.0, 1.0, 7.0, 3.0, 2.5]])
    logit_fn = lambda a, b: np.take_along_axis(strength, a, 1) - np.take_along_axis(strength, b, 1)
    np.testing.assert_array_equal(_tournament(logit_fn, 8, 2, best=True), strength.argmax(1))
    np.testing.assert_array_equal(_tournament(logit_fn, 8, 2, best=False), strength.argmin(1))


@pytest.fixture(scope="module")
def inpo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("inpo")
    out = subprocess.run(
        [sys.executable, "-m", "launch.train", "--experiment=inpo_tldr:smoke", f"--workdir={workdir}",
         "--config.progress=false", "--config.mesh.data=8"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, out


def _pairs(workdir, t, pad_id, max_len):
    cand = dict(np.load(os.path.join(stage_dir(workdir, f"iter_{t}/samples"), "samples.npz")))
    idx = np.nonzero(cand["keep"])[0]
    tok = lambda p, i: cand["tokens"][p, i, : cand["lengths"][p, i]]
    return pipeline.TokenizedPreference(
        [cand["prompt_tokens"][p, : cand["prompt_lengths"][p]] for p in idx],
        [tok(p, cand["chosen"][p]) for p in idx], [tok(p, cand["rejected"][p]) for p in idx],
        np.ones(len(idx), np.float32), pad_id, max_len,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.xdist_group("inpo")
def test_inpo_results_hold_every_iteration(inpo_run):
    workdir, out = inpo_run
    results = json.loads((workdir / "results.json").read_text())
    assert [it["iteration"] for it in results["iterations"]] == [1, 2]
    for key in ("win_rate_vs_sft_gold", "win_rate_vs_sft_proxy", "kl_to_sft", "mean_response_length"):
        assert results[key] == results["iterations"][-1][key]
        assert all(it[key] is not None for it in results["iterations"])
    assert "iteration 2:" in out.stdout
    # Each iteration's policy learns its pairs: the INPO loss falls from its starting value (1/(2η))² =
    # 10⁴ (to about 8,990 over the six steps) and the reward accuracy rises (0.25 to 1.0).
    for t in (1, 2):
        [path] = [p for p in glob.glob(str(workdir / "**" / "metrics.jsonl"), recursive=True)
                  if f"iter_{t}" in p.split(os.sep) and "policy" in p.split(os.sep)]  # fmt: skip
        records = read_metrics(os.path.dirname(path))
        first, last = records[0], records[-1]
        assert last["loss"] < 0.95 * first["loss"], (t, first, last)
        assert last["reward_accuracy"] > first["reward_accuracy"], (t, first, last)


@pytest.mark.slow
@pytest.mark.xdist_group("inpo")
def test_iteration_one_equals_ipo_with_beta_eta_on_the_same_pairs(inpo_run, tmp_path):
    workdir, _ = inpo_run
    config = overrides.apply_overrides(inpo_tldr.get_config("smoke"), ["--config.mesh.data=8"])
    stages = {"main": train.build_plan(config).main}
    tok = Tokenizer.load(os.path.join(stage_dir(workdir, "sft"), "tokenizer.model"))
    pairs = _pairs(workdir, 1, tok.pad_id, stages["main"].data.max_len)
    eta = losses.hyperparameters("inpo")["eta"] if "eta" not in config.loss else config.loss.eta
    ipo_cfg = dataclasses.replace(
        stages["main"], init_from=stage_dir(workdir, "sft"), loss=dataclasses.replace(
            stages["main"].loss, name="ipo", hparams=(("beta", eta),)),
    )  # fmt: skip
    preference.run(ipo_cfg, str(tmp_path / "ipo"), train_data=pairs)
    inpo_losses = [(r["step"], r["loss"]) for r in read_metrics(stage_dir(workdir, "iter_1/policy"))]
    ipo_losses = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "ipo"))]
    assert [s for s, _ in inpo_losses] == [s for s, _ in ipo_losses]
    for (_, a), (_, b) in zip(inpo_losses, ipo_losses, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.slow
@pytest.mark.xdist_group("inpo")
def test_previous_logps_are_those_of_the_previous_iterate(inpo_run):
    workdir, _ = inpo_run
    config = overrides.apply_overrides(inpo_tldr.get_config("smoke"), ["--config.mesh.data=8"])
    stages = {"main": train.build_plan(config).main}
    tok = Tokenizer.load(os.path.join(stage_dir(workdir, "sft"), "tokenizer.model"))
    pairs = _pairs(workdir, 2, tok.pad_id, stages["main"].data.max_len)
    saved = np.load(os.path.join(stage_dir(workdir, "iter_2/policy"), "previous_logps.npz"))
    mesh = sharding.make_mesh(stages["main"].mesh)
    for source, should_match in (("iter_1/policy", True), ("iter_2/policy", False), ("sft", False)):
        model, params = workdir_io.load_lm(stage_dir(workdir, source), mesh)
        c, r = preference.compute_pair_logps(model, params, pairs, mesh=mesh, batch_size=16)
        close = np.allclose(c, saved["chosen"], rtol=1e-5, atol=1e-4) and np.allclose(
            r, saved["rejected"], rtol=1e-5, atol=1e-4
        )
        assert close == should_match, source


@pytest.mark.slow
@pytest.mark.xdist_group("inpo")
def test_iterative_dpo_is_evaluated_against_the_sft_policy(inpo_run, tmp_path):
    """Iterative DPO trains against π_t but, like INPO, is evaluated against π_sft: at every iteration
    both compare with the very same SFT samples (same prompts and keys), so the SFT side of the
    evaluation is identical. Evaluating against the training reference π_t would change it from
    iteration 2 on. Run in a copy of the INPO workdir: SFT, oracle and iteration 1's samples are reused."""
    workdir, _ = inpo_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    out = subprocess.run(
        [sys.executable, "-m", "launch.train", "--experiment=inpo_tldr:smoke", f"--workdir={copy}",
         "--config.progress=false", "--config.mesh.data=8", "--config.loss.name=dpo",
         "--config.inpo.reference=previous"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("sft", "rm", "iter_1/samples"):
        assert f"reused {stage}/" in out.stdout, stage
    inpo = json.loads((workdir / "results.json").read_text())["iterations"]
    dpo = json.loads((copy / "results.json").read_text())["iterations"]
    assert [it["iteration"] for it in dpo] == [1, 2]
    for key in ("gold_reward_sft", "mean_response_length_sft"):
        values = [it[key] for it in inpo + dpo]
        assert None not in values and len(set(values)) == 1, (key, values)
