"""The training-pair fit along a preference run's curve (`preference.label_fit_sets`): which tokenised
pairs are the flipped and the unflipped ones, and the synthetic task's record of its flips."""

import numpy as np

from rlhf_jax.data import pipeline, records, synthetic_tldr
from rlhf_jax.pipelines import preference


def _pairs(flags):
    examples = [
        records.PreferenceExample(f"p{i}", chosen=f"c{i}", rejected=f"r{i}", meta={"flipped": f})
        for i, f in enumerate(flags)
    ]
    data = pipeline.TokenizedPreference(
        [np.array([1, i], np.int32) for i in range(len(flags))],
        [np.array([100 + i], np.int32) for i in range(len(flags))],
        [np.array([200 + i], np.int32) for i in range(len(flags))],
        np.arange(len(flags), dtype=np.float32),
        0,
        8,
    )
    return examples, data


def test_fit_sets_hold_the_flipped_and_the_unflipped_pairs_index_for_index():
    flags = [False, True, False, True, True, False]
    examples, data = _pairs(flags)
    sets = preference.label_fit_sets(examples, data, seed=0)
    assert [int(c[0]) - 100 for c in sets["flipped"].chosen_ids] == [1, 3, 4]
    assert [int(r[0]) - 200 for r in sets["unflipped"].rejected_ids] == [0, 2, 5]
    assert sets["flipped"].weights.tolist() == [1.0, 3.0, 4.0]  # weights follow their pairs
    # At most `limit` of each, a seeded draw kept in order.
    a = preference.label_fit_sets(examples, data, seed=0, limit=2)
    b = preference.label_fit_sets(examples, data, seed=0, limit=2)
    got = [int(c[0]) - 100 for c in a["flipped"].chosen_ids]
    assert len(got) == 2 and set(got) <= {1, 3, 4} and got == sorted(got)
    assert got == [int(c[0]) - 100 for c in b["flipped"].chosen_ids]


def test_no_fit_sets_without_flips_or_when_the_pairs_do_not_line_up():
    examples, data = _pairs([False, False])
    assert preference.label_fit_sets(examples, data, seed=0) == {}
    examples, data = _pairs([True, False, True])
    assert preference.label_fit_sets(examples[:2], data, seed=0) == {}  # not the same pairs
    plain = [records.PreferenceExample("p", chosen="a", rejected="b")]
    assert preference.label_fit_sets(plain, _pairs([True])[1], seed=0) == {}


def test_the_synthetic_task_records_its_flips():
    """A flipped pair's chosen response is the one the Bradley-Terry rater did not prefer; at rate 0.4
    about 40% of pairs are flipped, and none at rate 0."""
    flipped = synthetic_tldr.generate_splits(seed=3, num_sft=0, num_pref=400, num_eval=0, flip_rate=0.4)
    clean = synthetic_tldr.generate_splits(seed=3, num_sft=0, num_pref=400, num_eval=0, flip_rate=0.0)
    flags = [p.meta["flipped"] for p in flipped.preference]
    assert 0.3 < np.mean(flags) < 0.5
    assert not any(p.meta["flipped"] for p in clean.preference)
    # The flip draw does not disturb the other streams: the same pairs, swapped where flipped.
    for f, c, flag in zip(flipped.preference, clean.preference, flags, strict=True):
        assert f.prompt == c.prompt
        assert (f.chosen, f.rejected) == ((c.rejected, c.chosen) if flag else (c.chosen, c.rejected))
