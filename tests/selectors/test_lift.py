"""LIFT: row variance in the standardised PCA space, checked against scikit-learn's PCA with the
documented sign rule, and the keep-then-score rule on hand-made rows."""

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from evotune.selectors.base import Features
from evotune.selectors.lift import LiftSelector, row_variance


def make(*args, **options):
    """A LiftSelector with these options."""
    return LiftSelector(LiftSelector.Options(*args, **options))


def by_hand(x, variance):
    """scikit-learn's StandardScaler and PCA (its own solver and component count), then each
    component signed so that its largest loading is positive, then each row's variance."""
    z = StandardScaler().fit_transform(x)
    pca = PCA(n_components=variance if variance < 1 else None, svd_solver="full").fit(z)
    comps = pca.components_
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]
    return (z @ comps.T).var(axis=1)


def test_row_variance_matches_an_svd_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    for v in (0.5, 0.95, 1.0):
        assert row_variance(x, v) == pytest.approx(by_hand(x, v), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        row_variance(x[:1])


def test_row_variance_read_in_blocks_is_the_same(monkeypatch):
    """The rows are standardised and projected a block at a time: blocks of 7 rows (the last
    one short), all rows or a masked subset, give the figures of scikit-learn's PCA on the
    whole matrix."""
    import evotune.selectors.lift as lift
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 5)) @ rng.normal(size=(5, 5))
    monkeypatch.setattr(lift, "_CHUNK", 7)
    assert row_variance(x, 0.9) == pytest.approx(by_hand(x, 0.9), rel=1e-6, abs=1e-9)
    mask = np.arange(50) % 3 != 1                        # a row mask: no copy, same figures
    assert row_variance(x, 0.9, rows=mask) == pytest.approx(by_hand(x[mask], 0.9), rel=1e-6,
                                                            abs=1e-9)
    x[3, 2] = np.nan
    assert lift.finite_rows(x).tolist() == [i != 3 for i in range(50)]


def test_keep_the_spread_out_rows_then_the_best_scored_of_them():
    rng = np.random.default_rng(1)
    emb = rng.normal(scale=0.1, size=(10, 3))
    emb[[2, 5, 7]] += [[5, 0, 0], [0, -5, 0], [0, 0, 5]]          # three rows far out
    rv = by_hand(emb[1:], 0.95)                                     # candidates 1..9
    far = set((np.argsort(-rv)[:3] + 1).tolist())
    assert far == {2, 5, 7}
    scores = np.arange(10, dtype=float)                             # 7 scores best of the far
    f = Features(embeddings=emb, scores={"q": scores})
    sel = make(keep=0.3, score="q").select(f, np.array([0]), np.arange(1, 10), 2,
                                           np.random.default_rng(0))
    assert sel.positions.tolist() == [7, 5]
    assert sel.numbers["q"].tolist() == [7.0, 5.0] and sel.info["kept_by_variance"] == 3
    # no score: by row variance alone, highest first
    plain = make(keep=0.3).select(f, np.array([0]), np.arange(1, 10), 3, np.random.default_rng(0))
    order = [int(i) + 1 for i in np.argsort(-rv)[:3]]
    assert plain.positions.tolist() == order and plain.numbers["row_variance"] == pytest.approx(
        np.sort(rv)[::-1][:3])
    assert make().scores == () and make(score="q").scores == ("q",)


def test_the_budget_is_kept_even_when_keep_is_smaller_and_unscored_rows_are_out():
    emb = np.random.default_rng(2).normal(size=(8, 2))
    scores = np.array([1.0, np.nan, 3, 4, 5, 6, 7, 8])
    sel = make(keep=0.1, score="q").select(Features(embeddings=emb, scores={"q": scores}),
                                           np.array([], np.int64), np.arange(8), 4,
                                           np.random.default_rng(0))
    assert len(sel.positions) == 4 and 1 not in sel.positions.tolist()
    assert sel.info == {"kept_by_variance": 4, "unembedded": 1}
    with pytest.raises(ValueError, match="cannot pick 8"):
        make(score="q").select(Features(embeddings=emb, scores={"q": scores}),
                               np.array([], np.int64), np.arange(8), 8, np.random.default_rng(0))
