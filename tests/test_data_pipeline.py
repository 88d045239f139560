"""Tokenised batch layout, truncation, grain batching: exact resume and disjoint multi-process coverage."""

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import data
from rlhf_jax.data import packing, pipeline, tokenizer

WORDS = "my boss cat dog ate food read texts should quit talk to them for two three years".split()


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        post = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        prompt = f"SUBREDDIT: r/cats\nTITLE: post {i}\nPOST: {post}\nTL;DR:"
        chosen = " " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        out.append(data.PreferenceExample(prompt, chosen, chosen + " quit", weight=1.0 + i % 2))
    return out


@pytest.fixture(scope="module")
def tok():
    texts = [t for p in _pairs(200) for t in (p.prompt, p.chosen, p.rejected)]
    return tokenizer.train_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def tokenized(tok):
    return pipeline.tokenize_preference(_pairs(48), tok, pipeline.SequenceLayout(64, 48))


def test_layout_convention(tok):
    example = data.PreferenceExample("TITLE: x\nTL;DR:", " my boss ate", " my cat")
    tokenized = pipeline.tokenize_preference([example], tok, pipeline.SequenceLayout(32, 16))
    batch = tokenized.batch(np.array([0]), 32)
    prompt_ids, chosen_ids = tok.encode(example.prompt), tok.encode(example.chosen)
    prompt_len, response_len = 1 + len(prompt_ids), len(chosen_ids) + 1
    expected = [tok.bos_id, *prompt_ids, *chosen_ids, tok.eos_id]
    tokens, targets = batch["chosen_tokens"][0], batch["chosen_targets"][0]
    np.testing.assert_array_equal(tokens[: prompt_len + response_len], expected)
    assert (tokens[prompt_len + response_len :] == tok.pad_id).all()
    np.testing.assert_array_equal(targets[:-1], tokens[1:])  # targets[t] = tokens[t + 1]
    assert targets[-1] == tok.pad_id
    mask = batch["chosen_loss_mask"][0]
    np.testing.assert_array_equal(
        np.nonzero(mask)[0], np.arange(prompt_len - 1, prompt_len - 1 + response_len)
    )
    assert tok.decode(targets[mask > 0]) == example.chosen  # Response + EOS (EOS decodes to nothing).
    assert targets[mask > 0][-1] == tok.eos_id
    np.testing.assert_array_equal(
        batch["chosen_segment_ids"][0], (np.arange(32) < prompt_len + response_len).astype(np.int32)
    )
    assert (batch["prompt_lengths"][0], batch["chosen_lengths"][0]) == (prompt_len, response_len)
    assert batch["rejected_lengths"][0] == len(tok.encode(example.rejected)) + 1
    assert batch["chosen_tokens"].dtype == np.int32 and mask.dtype == np.float32


def test_truncation_policy_and_counts(tok):
    long_prompt = "SUBREDDIT: r/cats\nPOST: " + "my boss ate food " * 20 + "\nTL;DR:"
    examples = [
        data.PreferenceExample(long_prompt, " my cat", " my dog"),
        data.PreferenceExample("TL;DR:", " " + "my cat ate food " * 10, " my dog"),
        data.PreferenceExample("TL;DR:", " my cat ate food" * 10 + " a", " my cat ate food" * 10 + " b"),
    ]
    stats = data.LoadStats()
    layout = pipeline.SequenceLayout(24, 12)
    tokenized = pipeline.tokenize_preference(examples, tok, layout, stats)
    assert stats.truncated == {"prompt": 1, "chosen": 2, "rejected": 1, "identical_after_truncation": 1}
    batch = tokenized.batch(np.arange(3), 24)
    first = batch["chosen_tokens"][0]
    assert batch["prompt_lengths"][0] == 12 and first[0] == tok.bos_id
    assert tok.decode(first[1:12]).endswith("\nTL;DR:")  # The prompt keeps its end.
    second = batch["chosen_tokens"][1]
    assert (batch["chosen_segment_ids"][1] == 1).all() and second[-1] != tok.eos_id  # Cut: no EOS.
    assert tok.decode(second[batch["prompt_lengths"][1] :]).startswith(" my cat ate food")
    assert batch["chosen_loss_mask"][1].sum() == batch["chosen_lengths"][1] == 24 - batch["prompt_lengths"][1]
    with pytest.raises(ValueError, match="max_prompt_len"):
        pipeline.SequenceLayout(16, 16)


def test_sft_and_prompt_batches(tok):
    sft = [data.SFTExample("TITLE: a\nTL;DR:", " my cat"), data.SFTExample("TL;DR:", " quit")]
    stats = data.LoadStats()
    tokenized = pipeline.tokenize_sft(sft, tok, pipeline.SequenceLayout(16, 8), stats)
    batch = next(iter(pipeline.batches(tokenized, global_batch_size=2, shuffle=False)))
    assert set(batch) == {
        "tokens", "targets", "loss_mask", "segment_ids", "prompt_lengths", "lengths", "weights", "example_ids"
    }  # fmt: skip
    assert batch["tokens"].shape == (2, 16) and batch["loss_mask"].sum() == batch["lengths"].sum()
    prompts = pipeline.tokenize_prompts([s.prompt for s in sft], tok, max_prompt_len=8)
    batch = prompts.batch(np.array([1, 0, -1]), 8)
    assert batch["prompt_tokens"].shape == (3, 8)
    assert tok.decode(batch["prompt_tokens"][0][: batch["prompt_lengths"][0]]) == "TL;DR:"
    np.testing.assert_array_equal(batch["weights"], [1, 1, 0])
    np.testing.assert_array_equal(batch["example_ids"], [1, 0, -1])


def _collect(it, n):
    return [next(it) for _ in range(n)]


def test_exact_resume_from_state(tokenized):
    ds = pipeline.batches(tokenized, global_batch_size=8, seed=3)
    it = iter(ds)
    _collect(it, 5)  # Past the first epoch (48 / 8 = 6 steps) on resume.
    state = it.get_state()
    expected = _collect(it, 4)
    resumed = iter(pipeline.batches(tokenized, global_batch_size=8, seed=3))
    resumed.set_state(state)
    for want, got in zip(expected, _collect(resumed, 4), strict=True):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_exact_resume_through_orbax(tokenized, tmp_path):
    it = iter(pipeline.batches(tokenized, global_batch_size=8, seed=1))
    _collect(it, 3)
    params = {"w": np.arange(4.0)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(
            3,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), data=grain.checkpoint.CheckpointSave(it)
            ),
        )
        manager.wait_until_finished()
    expected = _collect(it, 2)
    fresh = iter(pipeline.batches(tokenized, global_batch_size=8, seed=1))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(
            3,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)
            ),
        )
    got = _collect(restored["data"], 2)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want["example_ids"], have["example_ids"])
        np.testing.assert_array_equal(want["chosen_tokens"], have["chosen_tokens"])


def test_epochs_are_permutations_and_seeded(tokenized):
    ids = [
        b["example_ids"] for b in _collect(iter(pipeline.batches(tokenized, global_batch_size=8, seed=0)), 12)
    ]
    first, second = np.concatenate(ids[:6]), np.concatenate(ids[6:])
    assert sorted(first) == sorted(second) == list(range(48))
    assert not np.array_equal(first, second)  # Each epoch is shuffled differently.
    again = np.concatenate(
        [b["example_ids"] for b in pipeline.batches(tokenized, global_batch_size=8, num_epochs=1)]
    )
    np.testing.assert_array_equal(again, first)
    other = np.concatenate(
        [b["example_ids"] for b in pipeline.batches(tokenized, global_batch_size=8, seed=1, num_epochs=1)]
    )
    assert not np.array_equal(other, first)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_complete_shards(tokenized, process_count):
    single = [
        b["example_ids"] for b in pipeline.batches(tokenized, global_batch_size=8, seed=5, num_epochs=1)
    ]
    shards = [
        [
            b["example_ids"]
            for b in pipeline.batches(
                tokenized,
                global_batch_size=8,
                seed=5,
                num_epochs=1,
                process_index=p,
                process_count=process_count,
            )
        ]
        for p in range(process_count)
    ]
    for step, global_ids in enumerate(single):
        local = [shards[p][step] for p in range(process_count)]
        assert all(len(ids) == 8 // process_count for ids in local)
        np.testing.assert_array_equal(
            np.concatenate(local), global_ids
        )  # Process p holds rows [p*b, (p+1)*b).
    everything = np.concatenate([ids for shard in shards for ids in shard])
    assert len(everything) == len(set(everything)) == 48  # Disjoint, and complete over the epoch.
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.batches(tokenized, global_batch_size=6, process_index=0, process_count=4)


def test_last_partial_batch_is_padded(tokenized):
    batches = list(pipeline.batches(tokenized, global_batch_size=20, num_epochs=1, drop_remainder=False))
    assert len(batches) == 3
    last = batches[-1]
    assert last["chosen_tokens"].shape == (20, 64)
    np.testing.assert_array_equal(last["example_ids"][8:], -1)
    assert (last["weights"][8:] == 0).all() and (last["weights"][:8] > 0).all()
    assert last["chosen_loss_mask"][8:].sum() == 0 and (last["chosen_tokens"][8:] == 0).all()
    counted = np.concatenate([b["example_ids"] for b in batches])
    assert sorted(counted[counted >= 0]) == list(range(48))


def test_bucketed_lengths_are_shared_by_processes(tokenized):
    rows = np.array([tokenized.row_lengths(i) for i in range(len(tokenized))])
    bucket = int(np.percentile(rows, 75))
    shards = [
        list(
            pipeline.batches(
                tokenized,
                global_batch_size=2,
                num_epochs=1,
                bucket_lengths=(bucket,),
                process_index=p,
                process_count=2,
            )
        )
        for p in range(2)
    ]
    for first, second in zip(*shards, strict=True):
        ids = np.concatenate([first["example_ids"], second["example_ids"]])
        want = bucket if rows[ids].max() <= bucket else 64  # From the global batch, on every process.
        assert first["chosen_tokens"].shape == second["rejected_tokens"].shape == (1, want)
    assert {b["chosen_tokens"].shape[1] for b in shards[0]} == {bucket, 64}


def test_make_global_batch(tokenized):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    local = next(iter(pipeline.batches(tokenized, global_batch_size=16)))
    batch = pipeline.make_global_batch(local, sharding)
    assert batch["chosen_tokens"].shape == (16, 64) and batch["weights"].shape == (16,)
    assert batch["chosen_tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch["example_ids"]), local["example_ids"])


def test_packed_sft_rows_hold_the_unpacked_examples(tok):
    examples = [data.SFTExample(p.prompt, p.chosen) for p in _pairs(30)]
    tokenized = pipeline.tokenize_sft(examples, tok, pipeline.SequenceLayout(192, 64))
    packed = packing.pack_sft(tokenized, seed=0)
    assert sorted(np.concatenate(packed.packs)) == list(range(30)) and len(packed) < 20
    batches = list(pipeline.batches(packed, global_batch_size=4, num_epochs=1, drop_remainder=False))
    seen = 0
    for batch in batches:
        for b in range(4):
            for k, j in enumerate(batch["example_ids"][b]):
                if j < 0:
                    continue
                seg = batch["segment_ids"][b] == k + 1
                single = tokenized.batch(np.array([j]), 192)
                n = single["segment_ids"][0].sum()
                assert seg.sum() == n
                np.testing.assert_array_equal(batch["tokens"][b][seg], single["tokens"][0][:n])
                np.testing.assert_array_equal(batch["loss_mask"][b][seg], single["loss_mask"][0][:n])
                targets = batch["targets"][b][seg]
                np.testing.assert_array_equal(targets[:-1], single["targets"][0][: n - 1])
                assert targets[-1] == tok.pad_id  # No prediction across the segment boundary.
                seen += 1
        assert batch["weights"].sum() == (batch["num_examples"] > 0).sum()
    assert seen == 30


def test_sampled_pairs_are_cut_to_max_len_like_text_pairs():
    """A prompt of up to max_prompt_len tokens plus max_new_tokens sampled ones can exceed max_len: the
    responses are cut to the room the prompt leaves (counted), and an unfitted pair is a clear error."""
    prompt = [np.arange(2, 9, dtype=np.int32), np.arange(2, 4, dtype=np.int32)]  # 7 and 2 tokens
    chosen = [np.full(8, 5, np.int32), np.full(3, 6, np.int32)]
    rejected = [np.full(2, 7, np.int32), np.full(4, 8, np.int32)]
    with pytest.raises(
        ValueError, match="pair 0: prompt \\(7 tokens\\) \\+ response \\(8\\) exceeds max_len=12"
    ):
        pipeline.TokenizedPreference(prompt, chosen, rejected, np.ones(2, np.float32), 0, 12)
    pairs, cut = pipeline.TokenizedPreference.fitted(prompt, chosen, rejected, np.ones(2, np.float32), 0, 12)
    assert cut == 1
    assert [len(c) for c in pairs.chosen_ids] == [5, 3] and [len(r) for r in pairs.rejected_ids] == [2, 4]
    batch = pairs.batch(np.array([0, 1]), 12)
    assert batch["chosen_loss_mask"].sum(1).tolist() == [5.0, 3.0]
    np.testing.assert_array_equal(batch["chosen_tokens"][0], [2, 3, 4, 5, 6, 7, 8, 5, 5, 5, 5, 5])
