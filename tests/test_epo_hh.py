"""EPO on multi-turn dialogues: the per-turn reward, the turn layout (turn ids on each reply's tokens,
truncation counted), the objective against a NumPy reference, and `epo_hh:smoke` end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.data import records as rec
from rlhf_jax.data import synthetic_dialogue as sd
from rlhf_jax.data import tokenizer, turns
from rlhf_jax.train import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = sd.DialogueConfig(min_turns=4, max_turns=4, error_rate=0.3)


@pytest.fixture(scope="module")
def tok():
    texts = [d.text() for d in sd.generate(300, seed=1)]
    return tokenizer.train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def dialogues():
    return sd.generate(6, seed=5, config=CONFIG)


def test_turn_reward_reads_the_first_integer_of_the_first_line():
    assert sd.turn_reward(" The total is 12.", 12) == 1.0
    assert sd.turn_reward(" The total is -3.", -3) == 1.0
    assert sd.turn_reward(" The total is 3.", -3) == -1.0
    assert sd.turn_reward(" The total is 13.", 12) == -1.0
    assert sd.turn_reward(" I am not sure.", 12) == -1.0
    assert sd.turn_reward(" Hmm.\n\nHuman: 12", 12) == -1.0  # only the reply's first line counts
    assert sd.turn_reward(" 12, not 14.", 12) == 1.0


def test_generated_rewards_follow_the_rule():
    for d in sd.generate(50, seed=2, config=CONFIG):
        replies = [t for t, u in d.pieces if u >= 0]
        want = tuple(sd.turn_reward(r, t) for r, t in zip(replies, d.meta["totals"], strict=True))
        assert d.turn_rewards == want
    clean = sd.generate(50, seed=2, config=CONFIG, slips=False)
    assert all(r == 1.0 for d in clean for r in d.turn_rewards)
    slipped = [r for d in sd.generate(200, seed=3, config=CONFIG) for r in d.turn_rewards]
    assert 0.2 < np.mean(np.array(slipped) < 0) < 0.9  # slips happen, and carry forward


def test_turn_ids_line_up_with_each_replys_tokens(tok, dialogues):
    data = turns.tokenize_dialogues(dialogues, tok, max_len=256, max_turns=5)
    batch = data.batch(np.arange(len(dialogues)), 256)
    for b, d in enumerate(dialogues):
        turn_ids, targets = batch["turn_ids"][b], batch["targets"][b]
        n = int(batch["segment_ids"][b].sum())
        ids = [tok.bos_id] + [i for t, _ in d.pieces for i in tok.encode(t)]
        np.testing.assert_array_equal(batch["tokens"][b, :n], ids)
        for u, reply in enumerate(t for t, v in d.pieces if v >= 0):
            positions = np.flatnonzero(turn_ids == u)
            assert len(positions) and np.all(np.diff(positions) == 1)  # one contiguous run per reply
            np.testing.assert_array_equal(targets[positions], tok.encode(reply))  # exactly its ids
            assert tok.decode(targets[positions]) == reply
        assert set(np.unique(turn_ids)) == {-1, 0, 1, 2, 3}  # turn 4 (U = 5) is padding
        np.testing.assert_array_equal(batch["loss_mask"][b], (turn_ids >= 0).astype(np.float32))
        np.testing.assert_array_equal(batch["turn_rewards"][b], [*d.turn_rewards, 0.0])
        np.testing.assert_array_equal(batch["turn_mask"][b], [1, 1, 1, 1, 0])
    assert (batch["turn_ids"][:, -1] == -1).all()


def test_truncation_keeps_a_prefix_of_turns_and_counts_the_cut(tok, dialogues):
    d = dialogues[0]
    lengths = [len(tok.encode(t)) for t, _ in d.pieces]
    assert lengths[3] >= 2
    # Cut inside reply 1 (pieces: h0 a0 h1 a1 h2 a2 h3 a3): BOS + h0 a0 h1 + all but the last token of a1.
    max_len = 1 + sum(lengths[:3]) + lengths[3] - 1
    stats = rec.LoadStats()
    data = turns.tokenize_dialogues([d, dialogues[1]], tok, max_len=max_len, max_turns=4, stats=stats)
    batch = data.batch(np.array([0]), max_len)
    turn_ids = batch["turn_ids"][0]
    assert (turn_ids == 0).sum() == lengths[1]
    assert (turn_ids == 1).sum() == lengths[3] - 1  # its last token cut
    assert not np.isin(turn_ids, [2, 3]).any()
    np.testing.assert_array_equal(batch["turn_mask"][0], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch["turn_rewards"][0], [*d.turn_rewards[:2], 0, 0])
    assert stats.truncated["dialogue"] == 2  # the second dialogue is longer than max_len too
    assert stats.truncated["dialogue_turns_cut"] >= 1 and stats.truncated["dialogue_turns_dropped"] >= 2
    one = rec.LoadStats()
    turns.tokenize_dialogues([d], tok, max_len=max_len, max_turns=4, stats=one)
    assert dict(one.truncated) == {"dialogue": 1, "dialogue_turns_cut": 1, "dialogue_turns_dropped": 2}


def test_too_many_turns_is_an_error(tok, dialogues):
    with pytest.raises(ValueError, match="4 assistant turns, more than max_turns=3"):
        turns.tokenize_dialogues(dialogues[:1], tok, max_len=256, max_turns=3)


def test_turn_prompts_are_the_training_rows_prefixes(tok, dialogues):
    keys, prompts = turns.turn_prompts(dialogues, tok, max_prompt_len=200)
    assert keys == [(x, u) for x in range(len(dialogues)) for u in range(4)]
    data = turns.tokenize_dialogues(dialogues, tok, max_len=256, max_turns=4)
    for p, (x, u) in enumerate(keys):
        row, n = data.ids[x], prompts["prompt_lengths"][p]
        np.testing.assert_array_equal(prompts["prompt_tokens"][p, :n], row[:n])
        assert data.token_turns[x][n] == u and data.token_turns[x][n - 1] == -1  # the reply starts next
        assert tok.decode(row[1:n]) == dialogues[x].turn_prompts()[u]
    stats = rec.LoadStats()
    _, short = turns.turn_prompts(dialogues, tok, max_prompt_len=12, stats=stats)
    assert short["prompt_lengths"].max() == 12 and stats.truncated["prompt"] > 0
    assert (short["prompt_tokens"][:, 0] == tok.bos_id).all()


@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_epo_objective_matches_a_numpy_reference(tok, dialogues, shift):
    """The objective against NumPy, with the rewards shifted by `EPOConfig.reward_shift` (1: the ±1
    rewards become {0, 2}, every return ≥ 0); the logged turn reward stays the data's."""
    cfg = models.preset("tiny", vocab_size=tok.vocab_size, max_len=256)
    model = models.Transformer(cfg)
    params = models.init_params(model, jax.random.key(0))
    batch = turns.tokenize_dialogues(dialogues, tok, max_len=160, max_turns=5).batch(np.arange(6), 160)
    batch["weights"][2] = 0.0
    total, sums = steps.epo_objective(
        params, batch, None, model=model, gamma=0.9, normalize=True, reward_shift=shift
    )
    logits = model.apply({"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"])
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)), np.float64)
    token_logp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    want, mean_reward = 0.0, 0.0
    for b, d in enumerate(dialogues):
        r = np.array(d.turn_rewards, np.float64)
        g = np.array([sum(0.9 ** (k - u) * (r[k] + shift) for k in range(u, len(r))) for u in range(len(r))])
        assert shift == 0.0 or (g >= 0).all()
        g = g / max(np.abs(g).max(), 1e-8)
        means = [token_logp[b][batch["turn_ids"][b] == u].mean() for u in range(len(r))]
        want += batch["weights"][b] * -(g * means).sum() / len(r)
        mean_reward += batch["weights"][b] * r.mean()
    assert {-1.0, 1.0} <= {r for d in dialogues for r in d.turn_rewards}  # both signs: the shift matters
    np.testing.assert_allclose(float(total), want, rtol=2e-5)
    np.testing.assert_allclose(float(sums["turn_reward"]), mean_reward, rtol=1e-6)
    assert float(sums["weight"]) == 5.0


def test_bad_dialogue_and_epo_settings_name_the_field():
    from rlhf_jax.pipelines import config, epo

    with pytest.raises(ValueError, match="data.dialogue_max_turns"):
        config.DataConfig(task="dialogue", dialogue_max_turns=1)
    with pytest.raises(ValueError, match="dialogue_error_rate"):
        config.DataConfig(task="dialogue", dialogue_error_rate=1.5)
    with pytest.raises(ValueError, match="gamma must be in"):
        epo.EPOConfig(gamma=1.5)
    with pytest.raises(ValueError, match="reward_shift must be finite"):
        epo.EPOConfig(reward_shift=float("nan"))


@pytest.mark.slow
def test_epo_hh_smoke_end_to_end(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "launch.train", "--experiment=epo_hh:smoke", f"--workdir={run}",
         "--config.progress=false"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.load(open(run / "results.json"))
    assert set(results["stages"]) == {"sft", "epo"}
    assert results["eval_dialogues"] == 8 and results["samples_per_turn"] == 2
    assert 16 <= results["eval_turns"] <= 32  # 2 to 4 turns per dialogue
    for name in ("sft", "epo"):
        assert -1.0 <= results[f"turn_reward_{name}"] <= 1.0
        # Rewards are ±1, so the mean reward and the accuracy determine each other.
        assert results[f"turn_reward_{name}"] == pytest.approx(2 * results[f"turn_accuracy_{name}"] - 1)
        assert len(results[f"turn_reward_by_turn_{name}"]) == 4
    low, high = results["turn_reward_gain_ci95"]
    assert low <= results["turn_reward_gain"] <= high
    assert results["nonfinite_steps"] == 0 and results["truncated"] == {}
    assert -1.0 < results["train_turn_reward"] < 1.0  # the demonstrations' slips give mixed rewards
    metrics_path = os.path.join(run, results["stages"]["epo"]["dir"], "metrics.jsonl")
    records = [json.loads(line) for line in open(metrics_path)]
    assert records and all(np.isfinite(r["loss"]) for r in records)
