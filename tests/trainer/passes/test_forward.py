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


class _OneProcess:
    """The strategy of a one-process run, as compute_features uses it."""
    rank, world_size, is_rank0, device = 0, 1, True, torch.device("cpu")

    def all_reduce_sum(self, values):
        return values

    def gather_to_rank0(self, obj):
        return [obj]


def test_the_pass_is_each_row_computed_alone(tokenizer, tiny_model_dir):
    """compute_features over rows of many lengths (batches of 3, planned by length) against
    each row through the model alone: masked mean of the last hidden state, and the mean
    cross-entropy of its response tokens; the shard (gather=False) is the same rows sorted."""
    import numpy as np
    import torch.nn.functional as F
    from helpers import POOL_TINY

    from evotune.trainer.data import encode_all, load_examples
    from evotune.trainer.model import backbone, load_model
    from evotune.trainer.passes.forward import compute_features
    examples, _ = load_examples(POOL_TINY, "skip")
    _, enc, _ = encode_all(examples[:11], tokenizer, "chat", 256, "skip")
    model = load_model(tiny_model_dir, torch.float32).eval()
    whole, stats = compute_features(model, enc, _OneProcess(), tokenizer.pad_token_id, 3,
                                    True, ("loss",))
    shard, _ = compute_features(model, enc, _OneProcess(), tokenizer.pad_token_id, 3, True,
                                ("loss",), gather=False)
    assert stats.tokens == sum(len(e.input_ids) for e in enc)
    assert shard.positions.tolist() == list(range(len(enc)))
    np.testing.assert_array_equal(shard.embeddings, whole.embeddings)
    np.testing.assert_array_equal(shard.scores["loss"], whole.scores["loss"])
    with torch.no_grad():
        for i, e in enumerate(enc):
            ids = torch.tensor([e.input_ids])
            hidden = backbone(model)(input_ids=ids).last_hidden_state[0]
            assert np.allclose(whole.embeddings[i], hidden.mean(dim=0).numpy(), atol=1e-5)
            logits = model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(e.labels[1:])
            answer = labels != -100
            loss = F.cross_entropy(logits[answer], labels[answer])
            assert whole.scores["loss"][i] == pytest.approx(float(loss), abs=1e-4)
