"""The score registry: forward scores from hand-made logits, derived scores (knn_k, the
Instruction-Mining linear rule) on hand-made features, and the order scores are computed in;
each checked against values worked out by hand."""

import math

import numpy as np
import pytest
import torch

from evotune.selectors.base import Features
from evotune.trainer import scores as registry
from evotune.trainer.data import IGNORE_INDEX as X
from evotune.trainer.passes.forward import response_scores
from evotune.trainer.scores import (PROMPT_EMBEDDINGS, SCORES, ExcessOptions, KnnOptions,
                                    LinearOptions, RdsOptions, Score, knn_values,
                                    knn_distance, knn_tile_rows, names, parse_linear, rds_scores,
                                    with_inputs)

FORWARD = names("forward")


def test_scores_of_a_hand_made_batch():
    # Vocabulary of 3, T = 4, logits for all 4 positions. Row 0's response is tokens 2..3
    # (predicted at positions 1 and 2); row 1 has no response token.
    logits = torch.tensor([
        [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [9.0, 9.0, 9.0]],
        [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ])
    labels = torch.tensor([[X, X, 0, 2], [X, X, X, X]])
    s = response_scores(logits, labels)
    assert set(s) == set(FORWARD) == {"loss", "perplexity", "length", "least_confidence",
                                     "margin", "entropy"}
    lse1 = math.log(math.exp(2) + 2)                 # position 1 predicts token 0 (logit 2)
    lse2 = math.log(1 + math.exp(1) + math.exp(3))   # position 2 predicts token 2 (logit 3)
    loss = ((lse1 - 2) + (lse2 - 3)) / 2
    assert s["loss"][0] == pytest.approx(loss)
    assert s["perplexity"][0] == pytest.approx(math.exp(loss))
    assert s["length"][0] == 2
    assert s["least_confidence"][0] == pytest.approx(-(2 + 3) / 2)
    assert s["margin"][0] == pytest.approx(-((2 - 0) + (3 - 1)) / 2)

    def entropy(row):
        p = torch.softmax(torch.tensor(row), 0)
        return float(-(p * p.log()).sum())
    assert s["entropy"][0] == pytest.approx((entropy([2.0, 0, 0]) + entropy([0, 1.0, 3.0])) / 2)
    assert all(math.isnan(s[name][1]) for name in FORWARD)


def test_window_of_logits_gives_the_same_scores():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[X, X, X, 4, 5, 6], [X, X, X, X, 1, 2]])
    full = response_scores(logits, labels)
    window = response_scores(logits[:, 2:], labels)       # first target at 3: keep 2..5
    for name in FORWARD:
        assert torch.allclose(full[name], window[name])


KNOWN = ("loss", "length", "knn_k", "ifd_cherry")


def test_parse_linear_reads_signs_exponents_and_spacing():
    assert parse_linear("0.9*knn_k - 1.0*ifd_cherry + 8.257e-5*length", KNOWN) == {
        "knn_k": 0.9, "ifd_cherry": -1.0, "length": 8.257e-5}
    assert parse_linear("-2 * loss", KNOWN) == {"loss": -2.0}
    assert parse_linear(" .5*loss+1E2*length ", KNOWN) == {"loss": 0.5, "length": 100.0}


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("0.5*reward", "unknown score 'reward'"),
    ("0.5*loss 1*length", "cannot read"),          # missing operator between terms
    ("loss", "cannot read"),                       # no coefficient
    ("0.5*loss - 0.1*loss", "appears twice"),
    ("0.5*loss +", "cannot read"),
])
def test_parse_linear_errors_name_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        parse_linear(text, KNOWN)


def test_knn_distance_matches_brute_force_and_is_chunk_independent():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(57, 5)).astype(np.float32)
    full = np.sqrt(((emb[:, None, :].astype(np.float64) - emb[None]) ** 2).sum(-1))
    np.fill_diagonal(full, np.inf)
    for k in (1, 3, 6):
        expected = np.sort(full, axis=1)[:, k - 1]
        for chunk in (4, 57, 1000):
            assert knn_distance(emb, k, chunk) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        # a memory bound too small for one row still computes, one row per block
        assert knn_distance(emb, k, 1000, block_mb=1e-6) == pytest.approx(expected, rel=1e-4,
                                                                            abs=1e-4)


def test_knn_tile_rows_bound_the_tile_memory():
    # 256 MiB at 20 bytes a cell: isqrt(256·2^20 / 20) = 3663 rows a side
    assert knn_tile_rows(4096, 256) == 3663
    assert knn_tile_rows(1000, 256) == 1000                   # at most the chunk size
    assert knn_tile_rows(4096, 1e-6) == 1                     # never zero rows
    assert 3663**2 * 20 <= 256 * 2**20 < 3664**2 * 20


def test_knn_distance_hand_made_line():
    emb = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)
    assert knn_distance(emb, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_distance(emb, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_knn_distance_nan_rows_are_nobodys_neighbour():
    emb = np.array([[0.0], [np.nan], [1.0], [5.0]], dtype=np.float32)
    d = knn_distance(emb, 1)
    assert np.isnan(d[1]) and d[[0, 2, 3]].tolist() == [1.0, 1.0, 4.0]
    with pytest.raises(ValueError, match="needs more than 3"):
        knn_distance(emb, 3)
    with pytest.raises(ValueError, match=">= 1"):
        knn_distance(emb, 0)


def test_linear_score_combines_terms_and_carries_skip_reasons():
    f = Features(embeddings=np.array([[0.0], [1.0], [3.0]], dtype=np.float32),
                 scores={"loss": np.array([1.0, 2.0, 3.0]),
                         "ifd_cherry": np.array([0.5, np.nan, 0.9])},
                 skipped={"ifd_cherry": {1: "empty answer"}})
    f.scores["knn_k"], f.skipped["knn_k"] = SCORES["knn_k"].compute(f, KnnOptions(k=1))
    f.scores["linear"], f.skipped["linear"] = SCORES["linear"].compute(
        f, LinearOptions("2*knn_k - 1*ifd_cherry + 0.5*loss"))
    assert f.scores["knn_k"].tolist() == [1.0, 1.0, 2.0]
    assert f.scores["linear"][[0, 2]].tolist() == pytest.approx([2 - 0.5 + 0.5, 4 - 0.9 + 1.5])
    assert np.isnan(f.scores["linear"][1])
    assert f.skipped["linear"] == {1: "ifd_cherry: empty answer"}


def test_reducible_loss_and_share_from_the_current_and_reference_losses():
    # RHO-LOSS's reducible loss: current loss - reference loss; the share: that over the
    # current loss. A row without either loss has neither, with the missing one's reason.
    f = Features(scores={"loss": np.array([2.0, 1.0, np.nan, 4.0]),
                         "reference_loss": np.array([0.5, 1.5, 1.0, np.nan])},
                 skipped={"loss": {2: "no response tokens"}, "reference_loss": {3: "x"}})
    values, skipped = SCORES["reducible_loss"].compute(f, None)
    assert values[:2].tolist() == [1.5, -0.5] and np.isnan(values[2:]).all()
    assert skipped == {2: "loss: no response tokens", 3: "reference_loss: x"}
    share, skipped = SCORES["reducible_share"].compute(f, None)
    assert share[:2].tolist() == [0.75, -0.5] and np.isnan(share[2:]).all()
    assert with_inputs(["reducible_loss"], lambda n: None) == ["loss", "reference_loss",
                                                                "reducible_loss"]
    with pytest.raises(ValueError, match="'reference_loss' was not computed"):
        SCORES["reducible_loss"].compute(Features(scores={"loss": np.zeros(2)}), None)
    # loss_left: the current loss over the base model's
    f.scores["base_loss"] = np.array([4.0, 1.0, 2.0, 2.0])
    left, skipped = SCORES["loss_left"].compute(f, None)
    assert left[[0, 1, 3]].tolist() == [0.5, 1.0, 2.0] and np.isnan(left[2])
    assert skipped == {2: "loss: no response tokens"}


def brute_neighbour_values(emb, values, k):
    """Each row's k nearest other rows (squared distance in float64, then position) among the
    rows with a finite embedding and value: their values, nearest first."""
    ok = [j for j in range(len(emb)) if np.isfinite(emb[j]).all() and np.isfinite(values[j])]
    out = np.full((len(emb), k), np.nan)
    for i in ok:
        d = sorted((float(np.sum((emb[i].astype(np.float64) - emb[j]) ** 2)), j)
                   for j in ok if j != i)
        out[i] = [values[j] for _, j in d[:k]]
    return out


def test_knn_values_are_the_nearest_rows_values_ties_to_the_lower_position():
    rng = np.random.default_rng(4)
    emb = rng.integers(0, 3, size=(60, 3)).astype(np.float32)      # many equal distances
    values = rng.normal(size=60)
    emb[5] = np.nan
    values[9] = np.nan
    got = knn_values(emb, np.arange(60), values, 4, chunk_size=7)
    assert np.array_equal(np.isnan(got), np.isnan(brute_neighbour_values(emb, values, 4)))
    assert np.allclose(got, brute_neighbour_values(emb, values, 4), equal_nan=True)
    with pytest.raises(ValueError, match="needs more than"):
        knn_values(emb[:3], np.arange(3), values[:3], 3)


def test_loss_excess_is_the_loss_minus_the_median_of_the_nearest_prompts():
    # Prompts on a line; row 3's answer is much harder than its neighbours': a high excess.
    prompts = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [10.0], [11.0]], dtype=np.float32)
    loss = np.array([1.0, 1.2, 0.8, 5.0, 1.1, 3.0, np.nan])
    f = Features(scores={"loss": loss}, extra={PROMPT_EMBEDDINGS: prompts},
                 skipped={"loss": {6: "no response tokens"}})
    values, skipped = SCORES["loss_excess"].compute(f, ExcessOptions(k=2))
    # neighbours (k=2, ties to the lower position): 0: 1, 2; 1: 0, 2; 2: 1, 3; 3: 2, 4;
    # 4: 3, 2; 5: 4, 3 (row 6 has no loss: nobody's neighbour)
    expected = [1.0 - 1.0, 1.2 - 0.9, 0.8 - 3.1, 5.0 - 0.95, 1.1 - 2.9, 3.0 - 3.05]
    assert values[:6] == pytest.approx(expected)
    assert np.isnan(values[6]) and skipped == {6: "loss: no response tokens"}
    assert int(np.argmax(values[:6])) == 3
    with pytest.raises(ValueError, match="prompts' embeddings"):
        SCORES["loss_excess"].compute(Features(scores={"loss": loss}), ExcessOptions(k=2))


def test_knn_without_embeddings_and_linear_without_its_terms_fail_clearly():
    f = Features(scores={"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="knn_k needs embeddings"):
        SCORES["knn_k"].compute(f, KnnOptions(k=1))
    with pytest.raises(ValueError, match="term 'length' was not computed"):
        SCORES["linear"].compute(f, LinearOptions("1*loss + 1*length"))
    with pytest.raises(ValueError, match="empty"):
        SCORES["linear"].compute(f, LinearOptions(""))


def test_inputs_come_before_the_scores_that_read_them():
    options = {"linear": LinearOptions("1*knn_k - 2*ifd_cherry")}
    assert with_inputs(["length", "linear"], options.get) == ["length", "knn_k", "ifd_cherry",
                                                              "linear"]
    assert with_inputs(["linear", "knn_k"], options.get) == ["knn_k", "ifd_cherry", "linear"]
    with pytest.raises(ValueError, match="unknown score 'bogus'"):
        with_inputs(["bogus"], options.get)


def test_a_registered_score_is_computed_like_the_built_in_ones(monkeypatch):
    monkeypatch.setattr(registry, "SCORES", dict(SCORES))
    registry.register(Score("top_logit", "forward", "the mean top logit",
                            lambda t: float(t.top2[:, 0].mean())))
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])
    s = response_scores(logits, torch.tensor([[X, 0, 2]]), ("top_logit", "loss"))
    # positions 0 and 1 predict the response tokens 0 and 2: their top logits are 0 and 2
    assert s["top_logit"][0] == pytest.approx(1.0)
    assert "top_logit" in registry.names("forward")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Score("loss", "forward", "another loss", lambda t: 0.0))
    with pytest.raises(ValueError, match="source must be one of"):
        registry.register(Score("odd", "elsewhere", "?"))


def test_rds_is_the_max_or_mean_cosine_to_each_subtasks_targets():
    pool = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [np.nan, 1.0]])
    targets = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    subtasks = ["x", "y", "x"]
    got = rds_scores(pool, targets, subtasks, RdsOptions(reduce="max"))
    # cosines of row 0 ([.6, .8]) with the targets: .6, .8, -.6; row 1: 1, 0, -1
    assert got["rds:x"][:2].tolist() == pytest.approx([0.6, 1.0])
    assert got["rds:y"][:2].tolist() == pytest.approx([0.8, 0.0])
    assert got["rds"][:2].tolist() == pytest.approx([0.8, 1.0])
    assert np.isnan(got["rds"][2:]).all()          # a zero or non-finite embedding: no score
    mean = rds_scores(pool, targets, subtasks, RdsOptions(reduce="mean"))
    assert mean["rds:x"][:2].tolist() == pytest.approx([0.0, 0.0])
    assert mean["rds"][:2].tolist() == pytest.approx([0.8, 0.0])
