import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.random import RandomSelector


def pick(seed, n=5):
    cand = np.arange(3, 40)
    return RandomSelector().select(Features(), np.arange(3), cand, n,
                                   np.random.default_rng(seed)).positions


def test_seeded_unique_and_within_candidates():
    a, b, c = pick(1), pick(1), pick(2)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert len(set(a.tolist())) == 5 and all(3 <= p < 40 for p in a)


def test_too_many_picks_is_an_error():
    with pytest.raises(ValueError, match="cannot pick"):
        pick(0, n=100)
