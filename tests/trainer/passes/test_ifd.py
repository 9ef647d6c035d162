"""IFD scores: evotune's batched values against the unmodified reference scripts, and the rules.

The reference values (tests/fixtures/ifd_reference.json, made as IFD_REFERENCE.md says) come
from Cherry_LLM's and Superfiltering's own scripts, one example at a time. Tolerance: every loss
within 1e-5 relative; every IFD within 1e-5 relative or 1e-6 absolute, whichever is looser
(a Superfiltering IFD near 0.002 is exp of a difference of two ~6-nat losses, so its relative
error is that difference's absolute error, ~1e-5 in fp32 when batched: 1.1e-5 measured at
batch size 8, 6e-6 at 4).
"""

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES, POOL_TINY, ifd_scores

from evotune.trainer.data import IGNORE_INDEX, load_examples
from evotune.trainer.model import load_model, load_tokenizer
from evotune.trainer.passes.ifd import VARIANTS, ifd_inputs, ifd_prompt, ifd_value

REFERENCE = json.loads((FIXTURES / "ifd_reference.json").read_text())
RESULTS = REFERENCE["results"]          # "<model>/<variant>/<max_length>" → per-row records
LOSS_REL = 1e-5
IFD_REL, IFD_ABS = 1e-5, 1e-6


def tensor_sha256(path) -> str:
    """The fixture's checkpoint hash: tensors in name order, as 'name|dtype|shape|' + bytes."""
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def models(smollm_dir, tiny_model_dir):
    """name → (model, tokenizer), after checking the weights are the ones the fixture used."""
    out = {}
    for name, path in (("smollm2", smollm_dir), ("tiny", tiny_model_dir)):
        expected = REFERENCE["models"][name]["tensor_sha256"]
        assert tensor_sha256(path / "model.safetensors") == expected, (
            f"{name}: weights differ from those the IFD reference values were computed with")
        out[name] = (load_model(path, torch.float32), load_tokenizer(path))
    return out


@pytest.fixture(scope="module")
def rows():
    examples, _ = load_examples(POOL_TINY, limit=20)
    return examples


def test_fixture_covers_both_variants_models_and_lengths():
    assert sorted(RESULTS) == sorted(f"{m}/{v}/{n}" for m in ("smollm2", "tiny")
                                     for v in VARIANTS for n in (512, 64))
    # The small max_length exercises every skip rule of both references.
    for model in ("smollm2", "tiny"):
        cherry = {r["skipped"]["skip_rule"] for r in RESULTS[f"{model}/ifd_cherry/64"]
                  if "skipped" in r}
        assert len(cherry) == 2            # prompt fills max_length; prompt + answer too long
        assert any("skipped" not in r for r in RESULTS[f"{model}/ifd_superfilter/64"])


@pytest.mark.parametrize("key", sorted(RESULTS), ids=lambda k: k.replace("/", "-"))
def test_batched_values_match_the_reference_scripts(key, models, rows):
    name, variant, max_length = key.split("/")
    model, tokenizer = models[name]
    expected = RESULTS[key]
    assert [ex.id for ex in rows] == [r["id"] for r in expected]

    got = ifd_scores(model, tokenizer, [ex.alpaca for ex in rows], variant, int(max_length),
                     batch_size=4)

    skipped = [r["id"] for r in expected if "skipped" in r]
    assert [ex.id for ex, g in zip(rows, got) if "skipped" in g] == skipped
    assert len(skipped) < len(rows)        # something is compared
    for ex, g, r in zip(rows, got, expected):
        if "skipped" in r:
            assert isinstance(g["skipped"], str) and g["skipped"]
            continue
        for k in ("loss_cond", "loss_direct"):
            assert math.isclose(g[k], r[k], rel_tol=LOSS_REL), (ex.id, k, g[k], r[k])
        assert math.isclose(g["ifd"], r["ifd"], rel_tol=IFD_REL, abs_tol=IFD_ABS), \
            (ex.id, g["ifd"], r["ifd"])


def _spans(enc, tokenizer):
    """(text of the unscored tokens, text of the scored tokens) of an Encoded."""
    unscored = [t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX]
    scored = [lab for lab in enc.labels if lab != IGNORE_INDEX]
    assert enc.input_ids[len(unscored):] == scored      # one contiguous answer span at the end
    return tokenizer.decode(unscored), tokenizer.decode(scored)


ROW = {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour of the sky."}
ROW_INPUT = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}


def test_cherry_passes_of_a_hand_made_row(tokenizer):
    cond, direct = ifd_inputs(ROW, tokenizer, "ifd_cherry", 512)
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:")
    assert ifd_prompt(ROW, "ifd_cherry") == prompt
    assert _spans(cond, tokenizer) == (prompt, ROW["output"])
    assert _spans(direct, tokenizer) == ("### Response:", ROW["output"])
    assert not cond.truncated and not direct.truncated

    cond, direct = ifd_inputs(ROW_INPUT, tokenizer, "ifd_cherry", 512)
    assert _spans(cond, tokenizer)[0].endswith(
        "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:")
    assert _spans(direct, tokenizer) == ("### Response:", "Bonjour")


def test_superfilter_passes_of_a_hand_made_row(tokenizer):
    cond, direct = ifd_inputs(ROW, tokenizer, "ifd_superfilter", 512)
    assert _spans(cond, tokenizer) == ("Name a colour.\n", ROW["output"])
    # The direct pass is the bare answer; its first token has no predecessor, so (SmolLM2 adds
    # no BOS) it is not scored, exactly as in the reference.
    assert direct.input_ids == tokenizer.encode(ROW["output"])
    assert _spans(direct, tokenizer) == ("Blue", " is a colour of the sky.")
    cond, _ = ifd_inputs(ROW_INPUT, tokenizer, "ifd_superfilter", 512)
    assert _spans(cond, tokenizer) == ("Translate to French.\nGood morning\n", "Bonjour")


def test_truncation_lengths_and_skips(tokenizer):
    n_answer = len(tokenizer.encode(ROW["output"]))                     # 8 tokens
    for variant in VARIANTS:
        assert ifd_inputs({**ROW, "output": ""}, tokenizer, variant, 512) == "empty answer"
        assert "chat row" in ifd_inputs(None, tokenizer, variant, 512)
        n_prompt = len(tokenizer.encode(ifd_prompt(ROW, variant)))
        # The answer vanishes from the conditioned pass when the prompt fills max_length.
        assert isinstance(ifd_inputs(ROW, tokenizer, variant, n_prompt), str)

    # Superfiltering: the direct pass keeps max_length - P + 1 tokens, of which the first is
    # not scored; the conditioned pass is cut at max_length.
    n_prompt = len(tokenizer.encode(ifd_prompt(ROW, "ifd_superfilter")))
    cond, direct = ifd_inputs(ROW, tokenizer, "ifd_superfilter", n_prompt + 3)
    assert (len(cond.input_ids), cond.n_response, cond.truncated) == (n_prompt + 3, 3, True)
    assert (len(direct.input_ids), direct.n_response, direct.truncated) == (4, 3, True)
    assert "conditioned" in ifd_inputs(ROW, tokenizer, "ifd_superfilter", n_prompt)
    # A one-token answer leaves nothing to score in the direct pass: the reference gets NaN.
    one = {**ROW, "output": "Blue"}
    assert "direct" in ifd_inputs(one, tokenizer, "ifd_superfilter", 512)

    # Cherry: the direct pass keeps max_length - P + 4 tokens ("### Response:" is 3 tokens
    # here), so a cut answer has one more direct token than fits beside the prompt: skipped.
    n_prompt = len(tokenizer.encode(ifd_prompt(ROW, "ifd_cherry")))
    assert "prompt fills" in ifd_inputs(ROW, tokenizer, "ifd_cherry", n_prompt)
    assert "exceed" in ifd_inputs(ROW, tokenizer, "ifd_cherry", n_prompt + n_answer - 1)
    cond, direct = ifd_inputs(ROW, tokenizer, "ifd_cherry", n_prompt + n_answer)
    assert cond.n_response == direct.n_response == n_answer
    # A one-token answer is fine for Cherry: "### Response:" precedes it.
    cond, direct = ifd_inputs(one, tokenizer, "ifd_cherry", 512)
    assert cond.n_response == direct.n_response == 1


def test_ifd_value_formulas():
    assert ifd_value(2.0, 4.0, "ifd_cherry") == 0.5
    assert ifd_value(1.5, 1.0, "ifd_superfilter") == pytest.approx(math.exp(0.5))
    assert ifd_value(3.0, 3.0, "ifd_superfilter") == 1.0
    with pytest.raises(ValueError, match="undefined"):
        ifd_value(1.0, 0.0, "ifd_cherry")
    with pytest.raises(ValueError, match="unknown IFD score"):
        ifd_value(1.0, 1.0, "ifd")


def test_scores_skip_with_a_reason_and_keep_row_order(models):
    model, tokenizer = models["tiny"]
    rows = [{**ROW, "output": ""}, ROW, {**ROW, "output": "Blue"}]
    model.train()
    cher = ifd_scores(model, tokenizer, rows, "ifd_cherry", 512, batch_size=2)
    sup = ifd_scores(model, tokenizer, rows, "ifd_superfilter", 512, batch_size=2)
    assert cher[0] == sup[0] == {"skipped": "empty answer"}
    assert set(cher[1]) == set(sup[1]) == {"loss_cond", "loss_direct", "ifd"}
    assert cher[1]["ifd"] == pytest.approx(cher[1]["loss_cond"] / cher[1]["loss_direct"])
    assert sup[1]["ifd"] == pytest.approx(math.exp(sup[1]["loss_cond"] - sup[1]["loss_direct"]))
    assert "ifd" in cher[2] and "skipped" in sup[2]
    assert model.training                  # the caller's mode is restored
    model.eval()


# ----------------------------------------------------------------------------- training template

def test_response_header_under_chat_and_alpaca(tokenizer):
    from evotune.trainer.passes.ifd import response_header
    assert tokenizer.decode(response_header(tokenizer, "chat")) == "<|im_start|>assistant\n"
    assert tokenizer.decode(response_header(tokenizer, "alpaca")) == "### Response:"


def test_response_header_needs_a_generation_prompt(tokenizer):
    import copy

    from evotune.trainer.passes.ifd import response_header
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation prompt"):
        response_header(tok, "chat")


def test_direct_pass_keeps_every_response_span_after_a_header():
    from evotune.trainer.passes.ifd import direct_pass
    from evotune.trainer.data import Encoded
    I = IGNORE_INDEX
    two_turns = Encoded([1, 2, 3, 10, 11, 4, 5, 12], [I, I, I, 10, 11, I, I, 12], True)
    d = direct_pass(two_turns, [7, 8], bos=1)
    assert d.input_ids == [1, 7, 8, 10, 11, 7, 8, 12]
    assert d.labels == [I, I, I, 10, 11, I, I, 12]
    assert d.n_response == two_turns.n_response and d.truncated
    no_bos = direct_pass(Encoded([2, 3, 10], [I, I, 10], False), [7], bos=1)
    assert no_bos.input_ids == [7, 10] and no_bos.labels == [I, 10]
