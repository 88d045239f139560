"""Rejection-sampling fine-tuning's selection: verification filter and whitespace dedup, hand-built cases."""

import pytest

from rlhf_jax import rft


def test_normalise():
    assert rft.normalise("  a\n b\t\tc  ") == "a b c"
    assert rft.normalise("a b") != rft.normalise("ab")


def test_select_filters_and_dedups_per_problem():
    sols = [
        ["1+1=2\n#### 2", "1+1=2 \n####  2", "1+1=3\n#### 3", "2=2\n#### 2"],  # 3 verified, 1 duplicate
        ["x\n#### 5", "y\n#### 6"],  # none verified
        ["same\n#### 7", "same\n#### 7"],  # 2 verified, 1 duplicate; same text as in no other problem
    ]
    ok = [[True, True, False, True], [False, False], [True, True]]
    s = rft.select(sols, ok)
    assert s.kept == [(0, "1+1=2\n#### 2"), (0, "2=2\n#### 2"), (2, "same\n#### 7")]
    assert s.counts() == {
        "problems": 3,
        "problems_solved": 2,
        "samples": 8,
        "verified": 5,
        "kept": 3,
        "duplicates": 2,
    }


def test_same_text_in_two_problems_is_kept_in_both():
    s = rft.select([["a"], ["a"]], [[True], [True]])
    assert s.kept == [(0, "a"), (1, "a")] and s.duplicates == 0


def test_select_shape_errors():
    with pytest.raises(ValueError, match="problem 0: 2 solutions but 1 verdicts"):
        rft.select([["a", "b"]], [[True]])
    with pytest.raises(ValueError, match="1 problems of solutions but 2"):
        rft.select([["a"]], [[True], [False]])
