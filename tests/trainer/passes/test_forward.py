"""Pooling hidden states into an embedding, against sums worked out by hand."""

import pytest
import torch

from evotune.trainer.passes.forward import pool

# Two rows, right-padded: row 0 has 3 real tokens, row 1 has 2 (then a padding position whose
# hidden state is large, so any leak of it would show).
HIDDEN = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]],
                       [[2.0, 2.0], [4.0, 0.0], [100.0, 100.0]]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_mean_averages_the_real_tokens():
    assert pool(HIDDEN, MASK, "mean").tolist() == [[3.0, 2.0], [3.0, 1.0]]


def test_weighted_mean_weights_token_i_of_n_by_i_over_the_sum():
    # row 0: (1·[1,0] + 2·[3,2] + 3·[5,4]) / 6; row 1: (1·[2,2] + 2·[4,0]) / 3
    expected = [[(1 + 6 + 15) / 6, (0 + 4 + 12) / 6], [(2 + 8) / 3, 2 / 3]]
    got = pool(HIDDEN, MASK, "weighted_mean")
    assert torch.allclose(got, torch.tensor(expected))


def test_last_takes_the_last_real_token():
    assert pool(HIDDEN, MASK, "last").tolist() == [[5.0, 4.0], [4.0, 0.0]]


def test_a_row_alone_pools_like_in_a_padded_batch():
    for how in ("mean", "weighted_mean", "last"):
        alone = pool(HIDDEN[1:, :2], MASK[1:, :2], how)
        assert torch.allclose(alone, pool(HIDDEN, MASK, how)[1:])


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool(HIDDEN, MASK, "max")
