"""Per-example scores from hand-made logits, checked against values worked out by hand."""

import math

import pytest
import torch

from evotune.selectors.scores import SCORES, response_scores
from evotune.trainer.data import IGNORE_INDEX as X


def test_scores_of_a_hand_made_batch():
    # Vocabulary of 3, T = 4, logits for all 4 positions. Row 0's response is tokens 2..3
    # (predicted at positions 1 and 2); row 1 has no response token.
    logits = torch.tensor([
        [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [9.0, 9.0, 9.0]],
        [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    ])
    labels = torch.tensor([[X, X, 0, 2], [X, X, X, X]])
    s = response_scores(logits, labels)
    assert set(s) == set(SCORES)
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
    assert all(math.isnan(s[name][1]) for name in SCORES)


def test_window_of_logits_gives_the_same_scores():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[X, X, X, 4, 5, 6], [X, X, X, X, 1, 2]])
    full = response_scores(logits, labels)
    window = response_scores(logits[:, 2:], labels)       # first target at 3: keep 2..5
    for name in SCORES:
        assert torch.allclose(full[name], window[name])
