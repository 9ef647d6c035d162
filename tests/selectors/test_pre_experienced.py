"""Cherry's pre-experienced round 0: the in-cluster rule against the reference's own output, and
the selector on hand-made inputs."""

import json

import numpy as np
import pytest

from evotune.selectors.base import Features
from evotune.selectors.pre_experienced import PreExperiencedSelector, middle_band_sample
from helpers import FIXTURES


def make(*args, **options):
    """A PreExperiencedSelector with these options."""
    return PreExperiencedSelector(PreExperiencedSelector.Options(*args, **options))


REFERENCE = json.loads((FIXTURES / "cherry_pre_experienced_reference.json").read_text())


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: f"N{len(c['labels'])}n{c['n']}")
def test_middle_band_sample_matches_cherrys_function(case):
    got = middle_band_sample(np.array(case["labels"]), np.array(case["confidences"]), case["n"])
    assert {str(c): v.tolist() for c, v in got.items()} == case["expected"]


def test_middle_band_sample_by_hand():
    labels = np.array([0] * 9 + [1] * 2)
    conf = np.array([9, 1, 8, 2, 7, 3, 6, 4, 5, 0, 0], dtype=float)
    # cluster 0: p25 = 3, p75 = 7 -> band rows with conf in [3, 7]: 4, 5, 6, 7, 8; step 5 // 2 = 2
    out = middle_band_sample(labels, conf, 2)
    assert out[0].tolist() == [4, 6] and out[1].tolist() == [9, 10]


def blobs():
    """Three tight, well separated blobs of 10 points; perplexity = position within the blob."""
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [50, 0], [0, 50]], dtype=np.float32)
    emb = np.concatenate([c + rng.normal(scale=0.1, size=(10, 2)) for c in centres])
    ppl = np.tile(np.arange(10, dtype=float), 3)
    return Features(embeddings=emb.astype(np.float32), scores={"instruction_perplexity": ppl})


def test_selector_takes_mid_perplexity_members_from_every_cluster():
    f = blobs()
    sel = make(n_clusters=3).select(
        f, np.array([], dtype=np.int64), np.arange(30), 6, np.random.default_rng(0))
    assert len(sel.positions) == 6 and len(set(sel.positions.tolist())) == 6
    assert sorted(p // 10 for p in sel.positions) == [0, 0, 1, 1, 2, 2]     # 2 per blob
    # band: ppl in [2.25, 6.75] -> 3..6; step 4 // 2 = 2 -> ppl 3 and 5 in each blob
    assert sorted(f.scores["instruction_perplexity"][sel.positions].tolist()) == [3, 3, 3, 5, 5, 5]
    assert sel.info == {"n_clusters": 3, "sample_num": 2, "filled": 0, "unscored": 0}
    assert sel.numbers["in_band"].tolist() == [1.0] * 6


def test_selector_fills_a_shortfall_with_flagged_random_picks():
    f = blobs()
    f.scores["instruction_perplexity"][10:] = np.nan          # only blob 0 is scored
    sel = make(n_clusters=3).select(
        f, np.array([], dtype=np.int64), np.arange(30), 8, np.random.default_rng(0))
    assert len(set(sel.positions.tolist())) == 8
    assert sel.info["unscored"] == 20 and sel.info["filled"] == sum(sel.numbers["in_band"] == 0)
    assert sel.info["filled"] > 0 and (sel.numbers["cluster"] == -1).sum() == sel.info["filled"]


def test_selector_needs_its_score():
    f = Features(embeddings=np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="instruction_perplexity"):
        make(2).select(f, np.array([], dtype=np.int64), np.arange(3), 2,
                                         np.random.default_rng(0))
