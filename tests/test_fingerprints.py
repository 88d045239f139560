"""Stage fingerprints: what changes a stage's fingerprint, reuse only on a match, and the README's RSO
variants run in sequence in one workdir, each reporting its own config's results."""

import dataclasses
import json
import os

import pytest
from workdirs import stage_dir

from experiments import rso_tldr
from launch import overrides, train
from rlhf_jax.pipelines import fingerprints, preference, reward, rso, sft
from rlhf_jax.pipelines import workdir as workdir_io


def _stages(*args):
    plan = train.build_plan(overrides.apply_overrides(rso_tldr.get_config("smoke"), list(args)))
    return {"sft": plan.sft, "rm": plan.rm, "main": plan.main, "rso": plan.rso, "eval": plan.eval,
            "rm_kind": plan.rm_kind}  # fmt: skip


def _fake_stage(path, spec, *, done=True):
    """A stage directory claimed for `spec` (with params/ when `done`), as a stage run would leave it."""
    fingerprints.claim(str(path), spec)
    if done:
        os.makedirs(os.path.join(path, "params"), exist_ok=True)
    return str(path)


def _fps(tmp_path, *args) -> dict[str, str]:
    """The fingerprints of rso_tldr:smoke's stages with `args` as overrides, upstream fingerprints
    flowing from stage to stage through claimed directories (as in `rso.run`)."""
    st = _stages(*args)
    out = {"sft": fingerprints.fingerprint(sft.spec(st["sft"]))}
    sft_dir = _fake_stage(tmp_path / "sft" / out["sft"][:12], sft.spec(st["sft"]))
    rm_cfg = dataclasses.replace(st["rm"], init_from=sft_dir)
    rm_spec = reward.spec(rm_cfg, st["rm_kind"])
    out["rm"] = fingerprints.fingerprint(rm_spec)
    rm_dir = _fake_stage(tmp_path / "rm" / out["rm"][:12], rm_spec)
    samples_spec = rso.samples_spec(
        st["main"], st["rso"], rm_kind=st["rm_kind"], sft_dir=sft_dir, rm_dir=rm_dir
    )
    out["samples"] = fingerprints.fingerprint(samples_spec)
    samples_dir = _fake_stage(tmp_path / "samples" / out["samples"][:12], samples_spec)
    out["pairs"] = fingerprints.fingerprint(rso.pairs_spec(st["main"], st["rso"], samples_dir=samples_dir))
    policy_cfg = dataclasses.replace(st["main"], init_from=sft_dir)
    policy_spec = preference.spec(policy_cfg, eval_config=st["eval"], proxy_dir=rm_dir)
    # In rso.run the pairs enter the policy's spec by content (`preference.pairs_digest`), a function of
    # the pairs stage's spec; stand in for them with that spec's fingerprint.
    out["policy"] = fingerprints.fingerprint({**policy_spec, "train_pairs": out["pairs"]})
    return out


def test_fingerprints_change_with_what_a_stage_depends_on_and_nothing_else(tmp_path):
    base = _fps(tmp_path / "base")
    changed = lambda *args: {k for k, v in _fps(tmp_path / str(len(os.listdir(tmp_path))), *args).items()
                             if v != base[k]}  # fmt: skip
    assert changed() == set()  # deterministic
    # Loss variants share SFT, reward model, samples and pairs (the README's hinge-norm variant).
    assert changed("--config.loss.name=hinge_norm", "--config.loss.gamma=0.05") == {"policy"}
    assert changed("--config.train.learning_rate=1e-5") == {"policy"}
    # Pairing and rejection settings change the pairs, not the samples.
    assert changed("--config.rso.pairs=sft_sample_rank") == {"pairs", "policy"}
    assert changed("--config.rso.beta=1.0") == {"pairs", "policy"}
    # Sampling settings change the samples and everything after them.
    assert changed("--config.rso.temperature=1.0") == {"samples", "pairs", "policy"}
    # A pairwise ranking model is another reward model.
    assert changed("--config.rm.kind=pairwise") == {"rm", "samples", "pairs", "policy"}
    assert _fps(tmp_path / "renamed", "--config.rso.reward_kind=pairwise") == _fps(  # the old key still works
        tmp_path / "new", "--config.rm.kind=pairwise"
    )
    assert changed("--config.rm.steps=7") == {"rm", "samples", "pairs", "policy"}
    # Upstream changes flow down through the fingerprints of the inputs.
    assert changed("--config.sft.learning_rate=1e-4") == set(base)
    assert changed("--config.seed=1") == set(base)
    assert changed("--config.data.num_sft=32") == set(base)
    assert changed("--config.model.d_model=32", "--config.model.mlp_dim=96") == set(base)
    # What the outputs do not depend on: the mesh, checkpoint and logging cadence, progress bars.
    assert changed("--config.mesh.data=2", "--config.mesh.fsdp=4") == set()
    assert changed("--config.checkpoint.every_steps=1", "--config.checkpoint.keep=5") == set()
    assert (
        changed("--config.sft.log_every=1", "--config.train.log_every=1", "--config.progress=false") == set()
    )


def test_data_files_enter_by_content(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    row = {"prompt": "p", "chosen": "c", "rejected": "r"}
    a.write_text(json.dumps(row) + "\n")
    b.write_text(json.dumps(row) + "\n")  # the same content elsewhere
    spec = lambda path: fingerprints.data_spec(_stages(f"--config.data.path={path}")["main"].data)
    assert fingerprints.fingerprint(spec(a)) == fingerprints.fingerprint(spec(b))
    a.write_text(json.dumps({**row, "chosen": "c2"}) + "\n")
    assert fingerprints.fingerprint(spec(a)) != fingerprints.fingerprint(spec(b))


def test_a_stage_directory_of_another_config_is_refused(tmp_path):
    st = _stages()
    fingerprints.claim(str(tmp_path), sft.spec(st["sft"]))
    fingerprints.claim(str(tmp_path), sft.spec(st["sft"]))  # the same config: fine (resume)
    other = dataclasses.replace(st["sft"], seed=5)
    with pytest.raises(ValueError, match="another configuration"):
        sft.run(other, str(tmp_path))


def test_locate_reuses_only_finished_stages_with_the_same_fingerprint(tmp_path, capsys):
    spec = sft.spec(_stages()["sft"])
    fp = fingerprints.fingerprint(spec)
    elsewhere = tmp_path / "other_run"
    # Unfinished elsewhere: not reused.
    _fake_stage(elsewhere / "sft" / fp[:12], spec, done=False)
    stage = fingerprints.locate(str(tmp_path / "run"), "sft", spec, done=workdir_io.stage_done,
                                reuse_from=(str(elsewhere),))  # fmt: skip
    assert not stage.reused and not os.path.exists(os.path.join(stage.dir, "params"))
    assert "computing sft/" in capsys.readouterr().out
    # Finished elsewhere under another spec whose short name collides: not reused.
    other_spec = {**spec, "seed": 99}
    collide = elsewhere / "x" / "sft" / fp[:12]
    os.makedirs(collide / "params")
    (collide / fingerprints.FINGERPRINT_FILE).write_text(
        json.dumps({"fingerprint": fingerprints.fingerprint(other_spec), "spec": other_spec})
    )
    stage = fingerprints.locate(str(tmp_path / "run2"), "sft", spec, done=workdir_io.stage_done,
                                reuse_from=(str(elsewhere),))  # fmt: skip
    assert not stage.reused
    # Finished elsewhere with the same fingerprint: copied in and reported.
    _fake_stage(elsewhere / "sft" / fp[:12], spec)
    stage = fingerprints.locate(str(tmp_path / "run3"), "sft", spec, done=workdir_io.stage_done,
                                reuse_from=(str(elsewhere),))  # fmt: skip
    assert stage.reused and os.path.isdir(os.path.join(stage.dir, "params"))
    assert stage.dir == str(tmp_path / "run3" / "sft" / fp[:12])
    assert f"reused sft/ (fingerprint {fp[:12]}, copied from" in capsys.readouterr().out


def test_init_from_a_run_workdir_means_its_final_stage(tmp_path):
    spec = sft.spec(_stages()["sft"])
    stage = fingerprints.locate(str(tmp_path), "sft", spec, done=workdir_io.stage_done)
    fingerprints.write_stages(str(tmp_path), [stage], final="sft")
    assert fingerprints.resolve_init_from(str(tmp_path)) == stage.dir
    os.makedirs(os.path.join(stage.dir, "params"))
    assert fingerprints.resolve_init_from(stage.dir) == stage.dir


# The README's RSO commands (section "RSO: the main job"), in order, at smoke size.
README_VARIANTS = [
    ("sigmoid_norm", [], "rso/first_round/sigmoid_norm"),
    (
        "hinge_norm",
        ["--config.loss.name=hinge_norm", "--config.loss.gamma=0.05"],
        "rso/first_round/hinge_norm",
    ),
    ("sft_sample_rank", ["--config.rso.pairs=sft_sample_rank"], "sft_sample_rank/first_round/sigmoid_norm"),
    ("direct", ["--config.rso.pairs=direct"], "direct/first_round/sigmoid_norm"),
    ("pairwise", ["--config.rm.kind=pairwise"], "rso/first_round/sigmoid_norm"),
    ("corrected", ["--config.rso.proposal_correction=true"], "rso/first_round/sigmoid_norm"),
]


def _pairs_text(wd, results):
    return open(os.path.join(wd, results["stages"]["pairs"]["dir"], "pairs.jsonl")).read()


@pytest.mark.slow
def test_readme_variants_in_one_workdir_each_report_their_own_config(tmp_path, capsys):
    wd = str(tmp_path / "run")
    seen, policies, first = {}, {}, {}
    for name, args, method in README_VARIANTS:
        argv = ["--experiment=rso_tldr:smoke", f"--workdir={wd}", "--config.progress=false", *args]
        assert train.main(argv) == 0, name
        out = capsys.readouterr().out
        results = json.load(open(os.path.join(wd, "results.json")))
        config = json.load(open(os.path.join(wd, "config.json")))
        # The printed table and results.json are this config's.
        assert f"RSO on tldr: {method}\n" in out, name
        assert results["method"] == method and results["loss_name"] == config["loss"]["name"], name
        assert results["rso"]["pairs"] == config["rso"]["pairs"], name
        assert results["reward_model"]["kind"] == results["rm_kind"] == config["rm"]["kind"], name
        # ... and are those of the policy stage this config trained (no substitution).
        policy = results["stages"]["policy"]
        stage_results = json.load(open(os.path.join(wd, policy["dir"], "results.json")))
        for key in ("win_rate_vs_sft_gold", "kl_to_sft", "loss_name", "eval_loss"):
            assert results[key] == stage_results[key], (name, key)
        assert results["rso"]["proposal_correction"] == config["rso"]["proposal_correction"], name
        # A new policy for every variant: the pairs' contents are part of its fingerprint (the corrected
        # acceptance could, by chance at smoke size, pick the very same pairs: then reusing is right).
        same_pairs = name == "corrected" and _pairs_text(wd, results) == _pairs_text(wd, first)
        if not same_pairs:
            assert not policy["reused"] and policy["fingerprint"] not in policies.values(), name
        first = first or results
        policies[name] = policy["fingerprint"]
        seen[name] = results["stages"]
        if name != "sigmoid_norm":  # one SFT policy for every variant
            assert "[stages] reused sft/" in out and results["stages"]["sft"]["reused"], name
            assert results["stages"]["sft"]["fingerprint"] == seen["sigmoid_norm"]["sft"]["fingerprint"]
    # The pointwise reward model is shared by the first four; the pairwise ranking model is another.
    assert all(seen[n]["rm"]["reused"] for n in ("hinge_norm", "sft_sample_rank", "direct"))
    assert not seen["pairwise"]["rm"]["reused"]
    assert seen["pairwise"]["rm"]["fingerprint"] != seen["sigmoid_norm"]["rm"]["fingerprint"]
    # Samples: shared by the loss and pairing variants; none for "direct"; new for the ranking model.
    assert seen["hinge_norm"]["samples"]["reused"] and seen["sft_sample_rank"]["samples"]["reused"]
    assert "samples" not in seen["direct"] and not seen["pairwise"]["samples"]["reused"]
    assert not seen["sft_sample_rank"]["pairs"]["reused"] and seen["hinge_norm"]["pairs"]["reused"]
    # The proposal correction reuses the pointwise model's samples and changes only pairs and policy.
    assert seen["corrected"]["samples"]["fingerprint"] == seen["sigmoid_norm"]["samples"]["fingerprint"]
    assert seen["corrected"]["pairs"]["fingerprint"] != seen["sigmoid_norm"]["pairs"]["fingerprint"]
    # Earlier variants stay on disk for comparison.
    for fp in set(policies.values()):
        assert os.path.isdir(os.path.join(wd, "policy", fp[:12], "params"))
    # Back to the first command: everything is reused and its own numbers are reported again.
    assert train.main(["--experiment=rso_tldr:smoke", f"--workdir={wd}", "--config.progress=false"]) == 0
    out = capsys.readouterr().out
    results = json.load(open(os.path.join(wd, "results.json")))
    assert results["stages"]["policy"]["fingerprint"] == policies["sigmoid_norm"]
    assert all(s["reused"] for s in results["stages"].values())
    assert "RSO on tldr: rso/first_round/sigmoid_norm\n" in out
    assert (
        results["win_rate_vs_sft_gold"]
        == json.load(open(os.path.join(wd, "policy", policies["sigmoid_norm"][:12], "results.json")))[
            "win_rate_vs_sft_gold"
        ]
    )
    assert stage_dir(wd, "policy") == os.path.join(wd, "policy", policies["sigmoid_norm"][:12])


def test_each_stage_claims_the_spec_its_pipeline_located_it_by(tmp_path):
    """A stage's `run` checks its directory against the same spec the pipeline located it by: a
    ranking model's layout room (RSO passes its max_new_tokens, here more than data's response room)
    must enter both, or the stage refuses its own directory."""
    st = _stages("--config.rm.kind=pairwise", "--config.rso.max_new_tokens=40")
    rm_cfg = dataclasses.replace(st["rm"], init_from=str(tmp_path / "sft"))
    response_len = max(st["rso"].max_new_tokens, st["eval"].max_new_tokens)
    assert response_len > st["rm"].data.max_len - st["rm"].data.max_prompt_len
    stage = _fake_stage(tmp_path / "rm", reward.spec(rm_cfg, "pairwise", response_len))
    assert reward.run(rm_cfg, stage, kind="pairwise", ranking_response_len=response_len) == {}
    with pytest.raises(ValueError, match="another configuration"):  # a different room is another stage
        reward.run(rm_cfg, stage, kind="pairwise", ranking_response_len=response_len + 1)
    st = _stages()
    stage = _fake_stage(tmp_path / "sft2", sft.spec(st["sft"]))
    assert sft.run(st["sft"], stage) == {}
    policy_cfg = dataclasses.replace(st["main"], init_from=stage)
    kw = dict(eval_config=st["eval"], proxy_dir=stage, sft_from=stage)
    stage = _fake_stage(tmp_path / "policy", preference.spec(policy_cfg, **kw))
    assert preference.run(policy_cfg, stage, **kw) == {}


def test_inpo_samples_depend_on_the_oracle_model_and_its_kind(tmp_path):
    """An iteration's samples are labelled by the oracle: another reward model (here: other rm steps) or
    another kind must give another samples stage (an earlier version let the kind's name overwrite the
    oracle's fingerprint in the spec, so a retrained oracle reused stale labels)."""
    from experiments import inpo_tldr
    from rlhf_jax.pipelines import inpo

    plan = train.build_plan(overrides.apply_overrides(inpo_tldr.get_config("smoke"), []))
    prev = _fake_stage(tmp_path / "sft", sft.spec(plan.sft))
    rm_a = _fake_stage(tmp_path / "rm_a", reward.spec(plan.rm, "pointwise"))
    rm_b = _fake_stage(tmp_path / "rm_b", reward.spec(dataclasses.replace(
        plan.rm, train=dataclasses.replace(plan.rm.train, steps=7)), "pointwise"))  # fmt: skip
    fp = lambda rm_dir, kind="pointwise": fingerprints.fingerprint(
        inpo.samples_spec(plan.main, plan.inpo, 1, rm_kind=kind, prev_dir=prev, rm_dir=rm_dir)
    )
    assert fp(rm_a) == fp(rm_a)
    assert fp(rm_a) != fp(rm_b)
    assert fp(rm_a) != fp(rm_a, "pairwise")
