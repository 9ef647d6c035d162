"""Training pieces that need no DeepSpeed: LR schedule, step plan, the loss and its window."""

import math

import pytest
import torch

from evotune.trainer.config import TrainConfig
from evotune.trainer.data import IGNORE_INDEX, Encoded, collate
from evotune.trainer.fit import (logits_positions, logits_window, lr_at, plan_steps,
                                 response_tokens, token_loss_sum)


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


def test_logits_positions_are_the_window_and_give_the_same_logits(tiny_model_dir):
    """The index form of the window keeps positions 2..9 of the batch above, and the model's
    logits through it equal those of the int window bitwise, in fp32 and in bf16 (the head
    runs on a copied block instead of a strided view; nothing else changes)."""
    from transformers import AutoModelForCausalLM
    b = collate([encoded(6, 2), encoded(3, 5), encoded(9, 1)], pad_id=0)
    assert logits_positions(b["labels"]).tolist() == list(range(2, 10))
    b = collate([encoded(20, 7, start=100), encoded(12, 3, start=300), encoded(30, 9, 500)], 0)
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
        with torch.no_grad():
            by_int = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           logits_to_keep=logits_window(b["labels"])).logits
            by_index = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             logits_to_keep=logits_positions(b["labels"])).logits
        assert by_index.dtype == dtype and torch.equal(by_index, by_int)


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
    """Each sequence alone: one plain forward, no padding, no cache; the summed -log p (nats,
    float64 softmax) of its response tokens, written out here rather than taken from the code
    under test. The logits are those of the positions that predict a response token (listed
    here, one by one), which is all the sum reads: the 49,152-word head over every position
    of every sequence was most of this file's time."""
    out = []
    for e in encoded:
        targets = [t for t in range(1, len(e.labels)) if e.labels[t] != IGNORE_INDEX]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False,
                           logits_to_keep=torch.tensor([t - 1 for t in targets])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        out.append(-sum(float(logp[i, e.labels[t]]) for i, t in enumerate(targets)))
    return out


def _first_best(nll, cs):
    """Rows whose gold choice has the lowest NLL, ties to the first choice listed."""
    return [min(range(n), key=lambda j: nll[s + j]) == g
            for s, n, g in zip(cs.starts, cs.counts, cs.gold)]


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
        choice_nll(model, _OneRank(), cs, 4)
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
    assert choice_nll(model, _OneRank(), cs, 3) == pytest.approx(ref, rel=1e-4)
    right = sum(_first_best(ref, cs))
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
    assert choice_nll(model, _OneRank(), cs, 2) == pytest.approx(
        _reference_nll(model, [a, b]), rel=1e-4)


def _mixed_choice_rows(tmp_path, tokenizer):
    """Real chat-encoded choice rows of 2, 3, 4 and 5 choices and many prompt lengths, then two
    hand-made rows whose choices share no tokenised prompt (2 and 3 choices) and one whose
    prompt is a single token. Returns the gold encoding of every row (the eval rows) and the
    ChoiceSet over them."""
    import json

    from evotune.trainer.data import ChoiceSet, choice_set, encode, load_examples
    from helpers import EVAL_TINY
    lines = [json.loads(line) for line in EVAL_TINY.read_text().splitlines()]
    for row in [r for r in lines if len(r["choices"]) == 5]:    # 3-choice variants
        others = [c for c in row["choices"] if c != row["output"]]
        lines.append(dict(row, id=row["id"] + "-3", choices=[others[0], row["output"], others[1]]))
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    examples, _ = load_examples(path)
    cs = choice_set(examples, tokenizer, "chat", 1024)
    rows = [encode(ex, tokenizer, "chat", 1024) for ex in examples]
    apart = [[Encoded([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9], False),
              Encoded([5, 6, 11, 12, 13, 14], [IGNORE_INDEX] * 3 + [12, 13, 14], False)],
             [Encoded([40, 41, 42, 43], [IGNORE_INDEX] * 2 + [42, 43], False),
              Encoded([40, 44, 45], [IGNORE_INDEX] * 2 + [45], False),
              Encoded([40, 41, 46, 47, 48], [IGNORE_INDEX] * 2 + [46, 47, 48], False)],
             [Encoded([50, 51, 52], [IGNORE_INDEX] + [51, 52], False),
              Encoded([50, 53], [IGNORE_INDEX] + [53], False)]]
    for choices, gold in zip(apart, (1, 2, 0)):
        cs = ChoiceSet(cs.encoded + choices, cs.starts + [len(cs.encoded)],
                       cs.counts + [len(choices)], cs.gold + [gold], cs.rows + [len(rows)])
        rows.append(choices[gold])
    return rows, cs


@pytest.fixture(scope="module")
def mixed(tiny_model_dir, tokenizer, tmp_path_factory):
    """The fp32 tiny model, the mixed choice rows and each choice's reference NLL, made once
    for every batch size."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows, cs = _mixed_choice_rows(tmp_path_factory.mktemp("mixed"), tokenizer)
    return model, rows, cs, _reference_nll(model, cs.encoded)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_choice_nll_equals_each_choice_sequence_alone(mixed, tokenizer, batch_size):
    """Several rows per forward call (padded prompts, one cache, every tail against its own
    row's entries) give each choice's NLL as a plain forward of that sequence alone, in fp32,
    within 1e-5 relative; and the accuracy that follows from those independent numbers."""
    from evotune.trainer.fit import _prompt_length, choice_nll, evaluate_with_choices
    model, rows, cs, ref = mixed
    prompts = [_prompt_length(cs.encoded[s: s + n]) for s, n in zip(cs.starts, cs.counts)]
    assert sorted(set(cs.counts)) == [2, 3, 4, 5] and len(cs) == 15
    # 12 real rows, 10 prompt lengths (a 3-choice variant shares its 5-choice row's prompt)
    assert prompts[-3:] == [0, 0, 1] and len(set(prompts[:-3])) == 10
    nll = choice_nll(model, _OneRank(), cs, batch_size)
    assert nll == pytest.approx(ref, rel=1e-5, abs=0)
    right = _first_best(ref, cs)
    assert 0 < sum(right) < len(cs)          # the comparison below can tell the rows apart
    result = evaluate_with_choices(model, _OneRank(), rows, cs, tokenizer.pad_token_id,
                                   batch_size)
    assert result.accuracy == sum(right) / len(cs)


def test_choice_nll_through_a_peft_model(tiny_model_dir, tokenizer, tmp_path):
    """A LoRA-wrapped model (what training hands to the eval) takes the same cache, position
    and mask arguments: each choice's NLL as that model gives the sequence alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evotune.trainer.fit import choice_nll
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)      # random A and B: the adapter changes the numbers
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"])).eval()
    _, cs = _mixed_choice_rows(tmp_path, tokenizer)
    ref = _reference_nll(model, cs.encoded)
    with model.disable_adapter():
        assert _reference_nll(model, cs.encoded[:2]) != pytest.approx(ref[:2], rel=1e-3)
    assert choice_nll(model, _OneRank(), cs, 4) == pytest.approx(ref, rel=1e-5, abs=0)


class _Rank:
    """Rank ``rank`` of ``world``; the sum over ranks is left to the test."""
    device = torch.device("cpu")

    def __init__(self, rank, world):
        self.rank, self.world_size = rank, world

    @staticmethod
    def all_reduce_sum(values):
        return list(values)


def test_every_rank_makes_the_same_forward_calls_whatever_rows_it_holds(tiny_model_dir):
    """Under ZeRO-3 each forward call gathers parameters with every other rank: two calls per
    batch of rows (prompts, then choices), shared prompt or not, and dummy batches where a rank
    has fewer batches, so the count depends on the row count alone, never on the rows."""
    from transformers import AutoModelForCausalLM

    from evotune.trainer.data import ChoiceSet
    from evotune.trainer.fit import _prompt_length, choice_nll
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    shared = [Encoded([5, 6, 7, 8], [IGNORE_INDEX] * 2 + [7, 8], False),
              Encoded([5, 6, 9], [IGNORE_INDEX] * 2 + [9], False)]
    longer = [Encoded([20, 21, 22, 23, 24, 25], [IGNORE_INDEX] * 5 + [25], False),
              Encoded([20, 21, 22, 23, 24, 26, 27], [IGNORE_INDEX] * 5 + [26, 27], False),
              Encoded([20, 21, 22, 23, 24, 28], [IGNORE_INDEX] * 5 + [28], False)]
    apart = [Encoded([5, 6, 7, 8, 9], [IGNORE_INDEX] * 3 + [8, 9], False),
             Encoded([5, 6, 11, 12, 13, 14], [IGNORE_INDEX] * 3 + [12, 13, 14], False)]
    assert [_prompt_length(r) for r in (shared, longer, apart)] == [2, 5, 0]

    def choice_rows(*rows):
        starts = [sum(map(len, rows[:i])) for i in range(len(rows))]
        return ChoiceSet([e for r in rows for e in r], starts, [len(r) for r in rows],
                         [0] * len(rows))

    # one rank: a row with a shared prompt and one without make the same two calls
    for row in (shared, apart):
        calls.clear()
        nll = choice_nll(model, _Rank(0, 1), choice_rows(row), 4)
        assert len(calls) == 2
        assert nll == pytest.approx(_reference_nll(model, row), rel=1e-5)
    # two ranks, three rows: with one row per batch a rank holds two rows or one row and a
    # dummy batch; with two, one holds a shared and an unshared row, the other one row
    cs = choice_rows(shared, longer, apart)
    ref = _reference_nll(model, cs.encoded)
    for batch_size, batches in ((1, 3), (2, 2), (8, 1)):
        per_rank, total = [], [0.0] * len(cs.encoded)
        for rank in (0, 1):
            calls.clear()
            nll = choice_nll(model, _Rank(rank, 2), cs, batch_size)
            per_rank.append(len(calls))
            total = [a + b for a, b in zip(total, nll)]
        assert per_rank == [2 * -(-batches // 2)] * 2, batch_size
        assert total == pytest.approx(ref, rel=1e-5)
