"""AUROC of a score, clean rows against each labelled group, by hand."""

import math

import numpy as np
import pytest

from evotune.trainer.separation import auroc, separation


def test_auroc_by_hand():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2, 2]) == 0.5
    assert auroc([2], [2]) == 0.5                          # ties count half
    assert auroc([1, np.nan, 3], [2, np.nan]) == 0.5      # NaN rows are left out
    assert math.isnan(auroc([np.nan], [1.0]))


def test_separation_pairs_each_group_with_its_own_originals():
    ids = ["a", "b", "c", "bad-a", "bad-c"]
    labels = [None, None, "", "trunc", "trunc"]
    scores = {"s": np.array([5.0, 0.0, 6.0, 1.0, 2.0])}
    paired = separation(scores, labels, [None, None, None, "a", "c"], ids)
    assert paired["trunc"]["n_clean"] == 2 and paired["trunc"]["scores"]["s"]["auroc"] == 1.0
    unpaired = separation(scores, labels)
    assert unpaired["trunc"]["n_clean"] == 3
    assert unpaired["trunc"]["scores"]["s"]["auroc"] == pytest.approx(4 / 6)
