"""Scores in the loop: IFD with the training template, the linear rule and knn_k, IFD under two
ranks and ZeRO-3, a proxy model with a different tokenizer, tokens/s in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evotune.trainer.scores import knn_distance
from helpers import POOL_TINY, run_train, write_config

pytestmark = pytest.mark.e2e


def npz(out: Path, r: int = 1) -> dict[str, np.ndarray]:
    with np.load(out / "rounds" / f"round_{r:03d}" / "features.npz") as f:
        return {k: f[k] for k in f.files}


def summary(out: Path, r: int = 1) -> dict:
    return json.loads((out / "rounds" / f"round_{r:03d}" / "summary.json").read_text())


def picks(out: Path, r: int = 1) -> list[dict]:
    path = out / "rounds" / f"round_{r:03d}" / "selection.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def mean_answer_loss(model, enc) -> float:
    from evotune.trainer.scores import response_scores
    ids = torch.tensor([enc.input_ids])
    logits = model(input_ids=ids).logits
    return float(response_scores(logits, torch.tensor([enc.labels]))["loss"][0])


def test_train_template_ifd_is_one_extra_pass_and_matches_a_direct_computation(
        tmp_path, tiny_model_dir):
    """In-loop IFD with the chat template: the conditioned loss is the embedding pass's own
    ``loss`` and the direct pass is the response header + response tokens. Recomputed here
    from the round-0 adapter, one example at a time, without the loop."""
    from peft import PeftModel

    from evotune.trainer.passes.ifd import direct_pass, response_header
    from evotune.trainer.data import encode_all, load_examples
    from evotune.trainer.model import load_model, load_tokenizer

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out, selection={
        "selector": "kcenter", "filter_score": "ifd_cherry", "filter_top_fraction": 0.5,
        "rounds": 2})
    run_train(["--config", str(cfg)])
    f = npz(out)
    s = summary(out)
    assert s["tokens"]["ifd"] > 0 and s["ifd_tokens_per_s"] > 0 and s["features_tokens_per_s"] > 0
    # One direct pass: its real tokens are the response tokens plus one header per example.
    tok = load_tokenizer(tiny_model_dir)
    examples, _ = load_examples(POOL_TINY)
    kept, encoded, _ = encode_all(examples, tok, "chat", 160, "skip")
    header = response_header(tok, "chat")
    assert tok.decode(header) == "<|im_start|>assistant\n"
    directs = [direct_pass(e, header, tok.bos_token_id) for e in encoded]
    assert s["tokens"]["ifd"] == sum(len(d.input_ids) for d in directs)
    assert list(f["ids"]) == [ex.id for ex in kept]

    model = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32),
                                      out / "rounds" / "round_000" / "adapter").eval()
    for i in range(0, len(encoded), 4):
        cond, direct = mean_answer_loss(model, encoded[i]), mean_answer_loss(model, directs[i])
        assert f["score_loss"][i] == pytest.approx(cond, rel=1e-5)
        assert f["score_ifd_cherry"][i] == pytest.approx(cond / direct, rel=1e-5)
    # The filter ran on those values: the picks are in the top half by IFD.
    rows = picks(out)
    assert all(r["passed_filter"] == 1 for r in rows)
    assert s["selection_info"]["passed"] == (len(kept) - 6) // 2


def test_linear_rule_over_knn_and_ifd_in_the_loop(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    rule = "1.0*knn_k - 0.5*ifd_superfilter + 0.01*length"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out, selection={
        "selector": "weighted", "weighted": {"score": "linear", "alpha": 1.0}, "rounds": 2},
        scoring={"linear": {"rule": rule}, "knn_k": {"k": 3}})
    run_train(["--config", str(cfg)])
    f = npz(out)
    expected = f["score_knn_k"] - 0.5 * f["score_ifd_superfilter"] + 0.01 * f["score_length"]
    assert f["score_linear"] == pytest.approx(expected)
    # knn_k from the (fp32) embeddings; the npz holds fp16 copies, hence the tolerance.
    assert f["score_knn_k"] == pytest.approx(
        knn_distance(f["embeddings"].astype(np.float32), 3), rel=2e-2)
    rows = picks(out)
    first_round = {r["pool_index"] for r in picks(out, 0)}
    cand = [i for i in range(len(f["ids"])) if i not in first_round]
    best = sorted(cand, key=lambda i: (-f["score_linear"][i], i))[:5]
    assert [r["pool_index"] for r in rows] == best          # alpha = 1: top linear score
    assert {"linear", "knn_k", "ifd_superfilter", "length"} <= set(rows[0])


def test_bad_linear_rule_is_a_config_error(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, tmp_path / "out", selection={
        "selector": "weighted", "weighted": {"score": "linear"}},
        scoring={"linear": {"rule": "0.5*reward"}})
    proc = run_train(["--config", str(cfg)], check=False)
    assert proc.returncode == 2 and "scoring.linear.rule" in proc.stderr and "reward" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template", ["train", "reference"])
def test_ifd_under_two_ranks_and_zero3_matches_one_rank(tmp_path, tiny_model_dir, template):
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"out{ranks}"
        cfg = write_config(tmp_path / f"cfg{ranks}.yaml", tiny_model_dir, out, selection={
            "selector": "weighted", "weighted": {"score": "ifd_superfilter", "alpha": 0.5},
            "rounds": 2},
            scoring={"template": template, "max_length": 160}, deepspeed={"zero_stage": 3})
        run_train(["--config", str(cfg)], ranks=ranks if ranks > 1 else None)
        runs[ranks] = out
    a, b = npz(runs[1]), npz(runs[2])
    for key in ("score_ifd_superfilter", "score_loss") if template == "train" else \
            ("score_ifd_superfilter",):
        assert np.isnan(a[key]).tolist() == np.isnan(b[key]).tolist()
        ok = ~np.isnan(a[key])
        assert b[key][ok] == pytest.approx(a[key][ok], rel=1e-4)
    assert summary(runs[2])["world_size"] == 2
    assert [r["id"] for r in picks(runs[1])] == [r["id"] for r in picks(runs[2])]


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    """A tiny Llama with its own BPE tokenizer (trained here on the tiny pool; adds a BOS, has no
    chat template): a proxy whose tokenizer differs from the training model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from evotune.trainer.data import load_examples
    from helpers import build_tiny_model

    d = tmp_path_factory.mktemp("proxy")
    texts = [m["content"] for ex in load_examples(POOL_TINY)[0] for m in ex.messages]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(d / "tok")
    return build_tiny_model(d / "model", d / "tok")


@pytest.mark.parametrize("template", ["train", "reference"])
def test_proxy_with_a_different_tokenizer_scores_once_with_its_own(tmp_path, tiny_model_dir,
                                                                    proxy_dir, template):
    from helpers import ifd_scores

    from evotune.trainer.data import encode, load_examples
    from evotune.trainer.model import load_model, load_tokenizer
    from evotune.trainer.passes.ifd import direct_pass, response_header

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out, selection={
        "selector": "weighted", "weighted": {"score": "ifd_cherry", "alpha": 0.5}},
        data={"max_length": 512},    # the proxy's 400-token BPE needs ~3x the tokens
        scoring={"model": str(proxy_dir), "template": template, "max_length": 512})
    run_train(["--config", str(cfg)])
    assert summary(out, 1)["tokens"]["ifd"] > 0
    assert "ifd" not in summary(out, 2)["tokens"]       # the proxy never changes: scored once
    f1, f2 = npz(out, 1), npz(out, 2)
    assert np.array_equal(f1["score_ifd_cherry"], f2["score_ifd_cherry"], equal_nan=True)

    proxy, ptok = load_model(proxy_dir, torch.float32), load_tokenizer(proxy_dir)
    assert len(ptok) != len(load_tokenizer(tiny_model_dir))
    examples, _ = load_examples(POOL_TINY)
    kept = [ex for ex in examples if ex.id in set(f1["ids"])]
    if template == "reference":
        want = [r.get("ifd", float("nan")) for r in
                ifd_scores(proxy, ptok, [ex.alpaca for ex in kept], "ifd_cherry", 512)]
    else:   # no chat template: the proxy's own Alpaca encoding, "### Response:" as the header
        header = response_header(ptok, "alpaca")
        want = []
        for ex in kept:
            try:
                e = encode(ex, ptok, "alpaca", 512)
            except ValueError:           # no answer token fits with this tokenizer
                want.append(float("nan"))
                continue
            want.append(mean_answer_loss(proxy, e) /
                        mean_answer_loss(proxy, direct_pass(e, header, ptok.bos_token_id)))
    ok = ~np.isnan(want)
    assert ok.sum() >= len(kept) // 2
    assert f1["score_ifd_cherry"][ok] == pytest.approx(np.asarray(want)[ok], rel=1e-5)
    assert np.isnan(f1["score_ifd_cherry"][~ok]).all()
