"""The `direct_advantage_po` pipeline (arXiv 2412.18279): its pure pieces against hand values (token-level
steps, states of rollouts, MC targets, next-state values, advantage rows, the critic's held-out split),
its two objectives against the losses, and `direct_advantage_po_arith:smoke` end to end (slow)."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, models
from rlhf_jax.data import pipeline
from rlhf_jax.data.steps import split_steps, token_step_ends
from rlhf_jax.pipelines import direct_advantage_po as dapo
from rlhf_jax.train import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NL = 10  # the newline "token" of the character tokenizer below: ids are code points


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def _decode(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


class TestTokenSteps:
    @pytest.mark.parametrize(
        "text",
        [
            "",
            "\n\n",
            " a = 1\n b = 2\n#### 2",
            "a\nb\n",  # trailing newline stays with the last step
            "a\n\n\nb",  # empty lines join the step before
            "\n  \na\nb",  # leading blanks join the first step
            "a\n \n",
            "x",
        ],
    )
    def test_equals_split_steps_on_text(self, text):
        ids = _ids(text)
        ends = token_step_ends(ids, newline_ids=[NL], decode=_decode)
        assert [_decode(ids[a:b]) for a, b in zip([0, *ends][:-1], ends, strict=True)] == split_steps(text)

    def test_hand_values(self):
        assert token_step_ends(_ids("ab\n\ncd\nef"), newline_ids=[NL], decode=_decode) == [4, 7, 9]
        assert token_step_ends(_ids("\n \n"), newline_ids=[NL], decode=_decode) == []
        # A final token that decodes to nothing (EOS) joins the last step.
        eos = lambda ids: _decode(i for i in ids if i != 0)  # noqa: E731
        assert token_step_ends([*_ids("a\n"), 0], newline_ids=[NL], decode=eos) == [3]


def test_rollout_states_are_distinct_prefixes_before_each_step():
    r1, r2 = _ids(" a\n b\n#### 3"), _ids(" a\n c\n#### 4")
    states = dapo.rollout_states([np.asarray(r1), np.asarray(r2)], newline_ids=[NL], decode=_decode)
    # The prompt alone, then after " a\n" (shared by both rollouts), then after " a\n b\n" / " a\n c\n".
    assert [_decode(s) for s in states] == ["", " a\n", " a\n b\n", " a\n c\n"]
    # Blank lines: "x\n\n" is one step, so its only state is the prompt; an all-blank rollout gives it too.
    assert dapo.rollout_states([np.asarray(_ids("x\n\n"))], newline_ids=[NL], decode=_decode) == [()]
    assert dapo.rollout_states([np.asarray(_ids("\n\n"))], newline_ids=[NL], decode=_decode) == [()]


def test_mc_targets_next_state_values_and_advantage_rows():
    np.testing.assert_allclose(dapo.mc_targets([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]), [0.5, 0.0, 0.75])
    with pytest.raises(ValueError, match="correct_SN must be"):
        dapo.mc_targets(np.zeros(3))
    critic = np.array([[0.2, 0.6, 0.4], [0.5, 0.5, 0.9]])
    terminal = np.array([[False, True, False], [True, False, False]])
    correct = np.array([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    values = dapo.next_state_values(critic, terminal, correct)
    np.testing.assert_allclose(values, [[0.2, 0.0, 0.4], [1.0, 0.5, 0.9]], rtol=1e-6)
    adv = np.asarray(losses.step_advantages(values))
    np.testing.assert_allclose(adv, [[0.0, -0.2, 0.2], [0.2, -0.3, 0.1]], atol=1e-6)
    states = [np.array([1, 2]), np.array([1, 2, 3])]
    steps_SM = [
        [np.array([5]), np.array([], np.int32), np.array([6, 7])],
        [np.array([8]), np.array([9]), np.array([4])],
    ]
    rows = dapo.advantage_rows(states, steps_SM, adv)
    assert len(rows) == 5  # the empty step of state 0 is dropped
    assert [r[1].tolist() for r in rows] == [[5], [6, 7], [8], [9], [4]]
    np.testing.assert_allclose([r[2] for r in rows], [0.0, 0.2, 0.2, -0.3, 0.1], atol=1e-6)
    assert rows[3][0].tolist() == [1, 2, 3]


def test_critic_split_holds_out_the_last_problems_states():
    chosen = [7, 3, 9, 1]
    held = dapo.critic_split(np.array([7, 7, 3, 9, 1, 1]), chosen, 0.25)
    assert held.tolist() == [False, False, False, False, True, True]
    assert dapo.critic_split(np.array([7, 1]), chosen, 0.01).tolist() == [False, True]  # at least one


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="direct_advantage_po.next_steps"):
        dapo.DirectAdvantagePOConfig(next_steps=1)
    with pytest.raises(ValueError, match="direct_advantage_po.beta"):
        dapo.DirectAdvantagePOConfig(beta=0.0)


def _state_step_rows():
    """Two (state, step) rows in the pipeline's layout: the loss mask covers the step tokens only."""
    data = pipeline.TokenizedSFT(
        [np.array([1, 5, 6, 7]), np.array([1, 9])], [np.array([11, 12]), np.array([13, 14, 15])],
        np.ones(2, np.float32), 0, 8,
    )  # fmt: skip
    batch = data.batch(np.arange(2), 8)
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]]
    return batch


def test_policy_objective_is_the_loss_on_step_logps():
    model = models.Transformer(models.preset("tiny", vocab_size=32, max_len=16))
    params = models.init_params(model, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in _state_step_rows().items()}
    logps = np.asarray(
        steps.sequence_logps(
            model, params, *(batch[k] for k in ("tokens", "targets", "loss_mask", "segment_ids"))
        )
    )
    # By hand: the step's summed token log-probs.
    logits = np.asarray(model.apply({"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"]))
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp_all, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    np.testing.assert_allclose(logps, (picked * np.asarray(batch["loss_mask"])).sum(1), rtol=1e-4)
    ref, adv = logps - np.array([0.3, -0.1]), np.array([0.2, -0.4], np.float32)
    batch.update(reference_logps=jnp.asarray(ref), advantages=jnp.asarray(adv))
    loss, sums = steps.direct_advantage_po_objective(params, batch, None, model=model, beta=0.5)
    want = 0.5 * (adv / 0.5 - np.array([0.3, -0.1])) ** 2
    np.testing.assert_allclose(float(loss), want.sum(), rtol=1e-4)
    np.testing.assert_allclose(float(sums["log_ratio"]), 0.2, rtol=1e-4)
    np.testing.assert_allclose(float(sums["target_log_ratio"]), (adv / 0.5).sum(), rtol=1e-5)
    assert float(sums["weight"]) == 2.0


def test_critic_objective_is_the_bce_on_the_states_last_token():
    cfg = models.preset("tiny", vocab_size=32, max_len=16)
    model = models.RewardModel(cfg)
    params = models.init_params(model, jax.random.key(1))
    empty = [np.zeros(0, np.int32)] * 2
    batch = pipeline.TokenizedSFT(
        [np.array([1, 5, 6]), np.array([1, 9, 4, 3])], empty, np.ones(2, np.float32), 0, 8
    )
    batch = {k: jnp.asarray(v) for k, v in batch.batch(np.arange(2), 8).items()}
    batch["mc_targets"] = jnp.asarray([0.25, 1.0])
    loss, sums = steps.critic_objective(params, batch, None, model=model)
    v = np.asarray(model.apply({"params": params}, batch["tokens"], batch["segment_ids"]))
    # The head reads the last real token: the same value as the state alone, unpadded.
    alone = np.asarray(model.apply({"params": params}, jnp.asarray([[1, 5, 6]]), jnp.ones((1, 3), jnp.int32)))
    np.testing.assert_allclose(v[0], alone[0], rtol=1e-4, atol=1e-5)
    want = np.asarray(losses.critic_bce(value_logits=v, targets=np.array([0.25, 1.0]))).sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(sums["weight"]) == 2.0


# ----------------------------------------------------------------------------------------------------
# End to end (slow).


def _launch(workdir, *extra):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["--experiment=direct_advantage_po_arith:smoke", "--config.progress=false", f"--workdir={workdir}"]
    cmd = [sys.executable, "-m", "launch.train", *args, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, json.load(open(os.path.join(workdir, "results.json")))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dapo")
    out, results = _launch(workdir)
    return workdir, out, results


@pytest.mark.slow
@pytest.mark.xdist_group("direct_advantage_po_smoke")
def test_smoke_results_and_stage_reuse(smoke_run, tmp_path):
    """`direct_advantage_po_arith:smoke` (~75 s): the results' keys; a rerun recomputes nothing; a run
    interrupted inside the MC stage (its last part file and the stages after it gone) resumes from the
    parts it finished and recomputes the rest (~20 s more)."""
    workdir, out, results = smoke_run
    keys = ("accuracy", "accuracy_sft", "accuracy_vs_sft", "accuracy_vs_sft_ci95", "accuracy_round1",
            "samples_generated", "sampled_tokens", "critic_eval_bce", "critic_eval_corr")  # fmt: skip
    for key in (*keys, "rounds"):
        assert key in results, key
    assert results["method"] == "direct_advantage_po x1" and "Direct Advantage PO on arith" in out.stdout
    assert results["accuracy_vs_sft"] == pytest.approx(results["accuracy"] - results["accuracy_sft"])
    lo, hi = results["accuracy_vs_sft_ci95"]
    assert lo <= results["accuracy_vs_sft"] <= hi
    # Smoke: 8 problems × 1 rollout, N = 2 completions and M = 2 steps per state.
    states = results["rounds"][0]["states"]
    assert states >= 8 and results["samples_generated"] == 8 + states * (2 + 2)
    assert results["sampled_tokens"] > results["samples_generated"]
    policy = results["rounds"][0]["policy"]
    assert policy["final_loss"] < policy["initial_loss"]  # the updates move log π/π_ref towards Â/β
    assert results["stages"]["sft"]["dir"].startswith("sft/")

    # A rerun: every stage reused, the same numbers.
    again, results2 = _launch(workdir)
    assert "computing" not in again.stdout and all(s["reused"] for s in results2["stages"].values())
    assert (
        results2["accuracy"] == results["accuracy"]
        and results2["samples_generated"] == results["samples_generated"]
    )

    # Interrupted in the MC stage: part 0 kept, part 1, mc.npz and every later stage gone.
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    mc_dir = copy / results["stages"]["round_1/mc"]["dir"]
    before = dict(np.load(mc_dir / "mc.npz"))
    part0 = os.stat(mc_dir / "part_0000.npz").st_mtime_ns
    os.remove(mc_dir / "mc.npz")
    os.remove(mc_dir / "part_0001.npz")
    for name in ("round_1/critic", "round_1/advantages", "round_1/policy"):
        shutil.rmtree(copy / results["stages"][name]["dir"])
    resumed, results3 = _launch(copy)
    assert "reused sft/" in resumed.stdout and "computing round_1/mc/" in resumed.stdout
    assert os.stat(mc_dir / "part_0000.npz").st_mtime_ns == part0  # the finished part was not redone
    after = dict(np.load(mc_dir / "mc.npz"))
    for k, v in before.items():  # the same seeds give the same data
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert results3["accuracy"] == results["accuracy"]
    assert (
        results3["stages"]["round_1/policy"]["fingerprint"]
        == results["stages"]["round_1/policy"]["fingerprint"]
    )


@pytest.mark.slow
@pytest.mark.xdist_group("direct_advantage_po_smoke")
def test_smoke_second_round_reuses_the_first(smoke_run, tmp_path):
    """`rounds=2` on the one-round run's workdir (copied): round 1 reused, round 2 computed from round 1's
    policy, per-round accuracies reported (~35 s)."""
    workdir, _, results = smoke_run
    copy = tmp_path / "two"
    shutil.copytree(workdir, copy)
    out, two = _launch(copy, "--config.direct_advantage_po.rounds=2")
    for name in ("sft", "round_1/mc", "round_1/critic", "round_1/advantages", "round_1/policy"):
        assert two["stages"][name]["reused"], name
        assert two["stages"][name]["fingerprint"] == results["stages"][name]["fingerprint"], name
    for name in ("round_2/mc", "round_2/critic", "round_2/advantages", "round_2/policy"):
        assert not two["stages"][name]["reused"], name
    assert two["accuracy_round1"] == results["accuracy_round1"]
    assert two["accuracy_round2"] == two["accuracy"] and [r["round"] for r in two["rounds"]] == [1, 2]
    assert two["samples_generated"] > results["samples_generated"]
    spec = json.load(open(copy / two["stages"]["round_2/mc"]["dir"] / "fingerprint.json"))["spec"]
    assert spec["reference"] == results["stages"]["round_1/policy"]["fingerprint"]  # π_ref ← π_1
