"""RDS+'s round-robin over target subtasks, on hand-made per-subtask scores."""

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.rds import RdsSelector, round_robin

NAN = float("nan")
# Pool positions 0..5; subtask a prefers 0, 1, 2; subtask b prefers 1, 3, 4.
A = [0.9, 0.8, 0.7, 0.1, 0.0, 0.2]
B = [0.0, 0.95, 0.1, 0.9, 0.85, 0.3]


def test_subtasks_take_turns_and_a_shared_favourite_spends_the_turn():
    picks, by = round_robin(np.array([A, B]).T, np.arange(6), 4)
    # a: 0; b: 1; a: its next is 1, already taken -> a's turn is spent; b: 3; a: 2
    assert picks.tolist() == [0, 1, 3, 2] and by.tolist() == [0, 1, 1, 0]


def test_one_subtask_is_the_top_n_with_ties_to_the_lowest_index():
    s = np.array([[0.5], [0.9], [0.5], [0.9], [0.1]])
    picks, by = round_robin(s, np.array([4, 3, 2, 1, 0]), 3)
    assert picks.tolist() == [1, 3, 0] and set(by.tolist()) == {0}


def test_only_candidates_count_and_unscored_rows_are_never_taken():
    s = np.array([A, B]).T
    s[3, 1] = NAN                                   # b has no score for 3
    picks, _ = round_robin(s, np.array([2, 3, 4, 5]), 3)
    # a over {2,3,4,5}: 2, 5, 3, 4; b: 4, 5, 2 (3 unscored for b)
    assert picks.tolist() == [2, 4, 5]
    with pytest.raises(ValueError, match="only 2 of 3 candidates have an rds score"):
        round_robin(np.array([[0.1], [NAN], [0.3]]), np.arange(3), 3)


def test_the_selector_reads_the_per_subtask_scores_and_logs_whose_turn_it_was():
    f = Features(scores={"rds": np.maximum(A, B), "rds:a": np.array(A), "rds:b": np.array(B)})
    sel = RdsSelector().select(f, np.array([5]), np.arange(5), 3, np.random.default_rng(0))
    assert sel.positions.tolist() == [0, 1, 3]
    assert sel.labels["rds_subtask"] == ["a", "b", "b"]
    assert sel.numbers["rds"].tolist() == [0.9, 0.95, 0.9]
    assert sel.info == {"subtasks": 2, "unscored": 0}
    with pytest.raises(ValueError, match="per-subtask scores"):
        RdsSelector().select(Features(scores={"rds": np.zeros(3)}), np.array([], np.int64),
                             np.arange(3), 1, np.random.default_rng(0))
