"""Training pieces that need no DeepSpeed: LR schedule, step plan, the loss and its window."""

import math

import pytest
import torch

from evotune.trainer.config import TrainConfig
from evotune.trainer.data import IGNORE_INDEX, Encoded, collate
from evotune.trainer.fit import (lr_at, logits_window, plan_steps, response_tokens,
                                 token_loss_sum)


def schedule(kind, warmup_ratio=0.2, lr=1.0):
    t = TrainConfig()
    t.lr, t.lr_scheduler, t.warmup_ratio = lr, kind, warmup_ratio
    return t


def test_warmup_then_cosine_linear_constant():
    total = 10   # 2 warmup steps
    cos = [lr_at(s, total, schedule("cosine")) for s in range(total)]
    assert cos[:2] == [0.5, 1.0]
    assert cos[2] == 1.0 and cos[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a >= b for a, b in zip(cos[2:], cos[3:]))
    lin = [lr_at(s, total, schedule("linear")) for s in range(total)]
    assert lin[2] == 1.0 and lin[6] == pytest.approx(0.5)
    assert [lr_at(s, total, schedule("constant")) for s in range(2, total)] == [1.0] * 8
    assert lr_at(0, 1, schedule("cosine", warmup_ratio=0.0)) == 1.0


def test_plan_steps_is_seeded_per_round_and_epoch_and_covers_every_example():
    positions = list(range(10, 27))
    a = plan_steps(positions, epochs=2, batch_size=4, seed=1, round_idx=3)
    assert a == plan_steps(positions, 2, 4, 1, 3)
    assert a != plan_steps(positions, 2, 4, 1, 4)
    assert len(a) == 2 * math.ceil(17 / 4) and len(a[4]) == 1
    per_epoch = len(a) // 2
    for e in range(2):
        flat = [p for batch in a[e * per_epoch:(e + 1) * per_epoch] for p in batch]
        assert sorted(flat) == positions
    assert a[:per_epoch] != a[per_epoch:]   # reshuffled each epoch


def encoded(prompt_len, answer_len, start=5):
    ids = list(range(start, start + prompt_len + answer_len))
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:]
    return Encoded(ids, labels, truncated=False)


def test_response_tokens_counts_targets_after_the_shift():
    assert response_tokens(encoded(3, 4)) == 4


def test_logits_window_starts_one_before_the_first_target_of_the_batch():
    b = collate([encoded(6, 2), encoded(3, 5), encoded(9, 1)], pad_id=0)   # T = 10
    assert logits_window(b["labels"]) == 10 - 2      # first target at 3 → keep positions 2..9


def test_windowed_loss_equals_the_full_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    b = collate([encoded(20, 7, start=100), encoded(12, 3, start=300), encoded(30, 9, 500)], 0)
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        k = logits_window(b["labels"])
        win = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    logits_to_keep=k).logits
    assert win.shape[1] == k < full.shape[1]
    ref = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, full.size(-1)), b["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    assert token_loss_sum(full, b["labels"]) == pytest.approx(float(ref), rel=1e-6)
    assert token_loss_sum(win, b["labels"]) == pytest.approx(float(ref), rel=1e-5)


class _OneRank:
    rank, world_size, device = 0, 1, torch.device("cpu")

    @staticmethod
    def all_reduce_sum(values):
        return list(values)


def _reference_nll(model, encoded):
    """One sequence at a time, no padding, no cache, full logits."""
    out = []
    for e in encoded:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits
        out.append(float(token_loss_sum(logits, torch.tensor([e.labels]))))
    return out


def test_choice_nll_warns_about_nothing(tiny_model_dir, tokenizer, monkeypatch):
    """The key/value cache goes by the name this transformers gives it: no deprecation
    message on every eval (transformers 5 renamed ``past_key_values`` to ``cache``)."""
    import warnings

    import transformers.utils.generic as generic
    from transformers import AutoModelForCausalLM

    from evotune.trainer.data import choice_set, load_examples
    from evotune.trainer.fit import choice_nll
    from helpers import EVAL_TINY
    said = []                  # warning_once remembers what it said: record every call instead
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples, _ = load_examples(EVAL_TINY)
    cs = choice_set(examples, tokenizer, "chat", 1024)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice_nll(model, _OneRank(), cs)
    assert [m for m in said + [str(w.message) for w in caught] if "deprecated" in m] == []


def test_choice_nll_with_a_shared_prompt_cache_equals_whole_sequences(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from evotune.trainer.data import choice_set, encode, load_examples
    from evotune.trainer.fit import _prompt_length, choice_nll, evaluate_with_choices
    from helpers import EVAL_TINY
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples, _ = load_examples(EVAL_TINY)
    cs = choice_set(examples, tokenizer, "chat", 1024)
    assert (len(cs), cs.skipped) == (10, [])
    assert all(_prompt_length(cs.encoded[s: s + n]) > 0 for s, n in zip(cs.starts, cs.counts))
    ref = _reference_nll(model, cs.encoded)
    assert choice_nll(model, _OneRank(), cs) == pytest.approx(ref, rel=1e-4)
    right = sum(min(range(n), key=lambda j: ref[s + j]) == g
                for s, n, g in zip(cs.starts, cs.counts, cs.gold))
    # loss over every row: choice rows from their gold choice, the others forwarded as usual
    rows = [encode(ex, tokenizer, "chat", 1024) for ex in examples]
    extra = Encoded([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9], False)
    groups = [ex.source.split("_")[0] for ex in examples] + ["extra"]
    result = evaluate_with_choices(model, _OneRank(), rows + [extra], cs,
                                   tokenizer.pad_token_id, 3, groups=groups)
    assert result.accuracy == right / 10
    everything = _reference_nll(model, rows + [extra])
    tokens = [response_tokens(e) for e in rows + [extra]]
    assert (result.tokens, result.loss) == (sum(tokens),
                                           pytest.approx(sum(everything) / sum(tokens), rel=1e-5))
    # per group: the same sums over the group's rows only
    for label in set(groups):
        rows_of = [i for i, g in enumerate(groups) if g == label]
        g = result.groups[label]
        assert g["loss"] == pytest.approx(sum(everything[i] for i in rows_of)
                                          / sum(tokens[i] for i in rows_of), rel=1e-5)
        assert g["choice_rows"] == sum(i < len(rows) for i in rows_of)
        if label != "extra":
            hits = [min(range(n), key=lambda j: ref[s + j]) == gold for s, n, gold, row in
                    zip(cs.starts, cs.counts, cs.gold, cs.rows) if row in rows_of]
            assert g["accuracy"] == sum(hits) / len(hits)
    assert result.groups["extra"]["accuracy"] is None
    assert evaluate_with_choices(model, _OneRank(), rows, None, 0, 3).accuracy is None


def test_choice_nll_without_a_shared_prompt_forwards_whole_sequences(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from evotune.trainer.data import ChoiceSet
    from evotune.trainer.fit import _prompt_length, choice_nll
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a = Encoded([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9], False)
    b = Encoded([5, 6, 11, 12, 13, 14], [IGNORE_INDEX] * 3 + [12, 13, 14], False)
    assert _prompt_length([a, b]) == 0
    cs = ChoiceSet([a, b], [0], [2], [1])
    assert choice_nll(model, _OneRank(), cs) == pytest.approx(_reference_nll(model, [a, b]),
                                                              rel=1e-4)


def test_every_choice_row_makes_two_forward_calls_shared_prompt_or_not(tiny_model_dir):
    """Under ZeRO-3 each forward call gathers parameters with every other rank: a row with a
    shared prompt (cache + choices) and one without must make the same number of calls."""
    from transformers import AutoModelForCausalLM

    from evotune.trainer.data import ChoiceSet
    from evotune.trainer.fit import choice_nll
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    shared = [Encoded([5, 6, 7, 8], [IGNORE_INDEX] * 2 + [7, 8], False),
              Encoded([5, 6, 9], [IGNORE_INDEX] * 2 + [9], False)]
    apart = [Encoded([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9], False),
             Encoded([5, 6, 11, 12, 13, 14], [IGNORE_INDEX] * 3 + [12, 13, 14], False)]
    for encoded in (shared, apart):
        calls.clear()
        nll = choice_nll(model, _OneRank(), ChoiceSet(encoded, [0], [2], [0]))
        assert len(calls) == 2
        assert nll == pytest.approx(_reference_nll(model, encoded), rel=1e-4)
