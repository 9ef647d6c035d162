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
    from evotune.trainer.passes.forward import response_scores
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


def test_rds_in_the_loop_matches_a_one_at_a_time_computation(tmp_path, tiny_model_dir):
    """RDS+ in the loop: the pool and the targets (SFT and prompt-only rows, two subtasks) are
    embedded by the round's model with position-weighted mean pooling. Recomputed here from the
    round-0 adapter one example at a time (no padding, as the reference), with the weights
    written out: token i of n weighs i / (n (n + 1) / 2)."""
    from peft import PeftModel

    from evotune.selectors.rds import round_robin
    from evotune.trainer.data import encode_all, encode_prompt, load_examples
    from evotune.trainer.model import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    rows = [json.loads(line) for line in (POOL_TINY.parent / "eval_tiny.jsonl").read_text()
            .splitlines()]
    rows = [r for r in rows if len(tok(r["instruction"] + r["output"]).input_ids) < 100][:3]
    assert len(rows) == 3
    targets = tmp_path / "targets.jsonl"
    targets.write_text("".join(json.dumps({**r, "subtask": "qa"}) + "\n" for r in rows)
                       + json.dumps({"prompt": "Add 17 and 25.", "subtask": "math"}) + "\n")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out,
                       selection={"selector": "rds", "pooling": "weighted_mean", "rounds": 2},
                       scoring={"rds": {"targets": str(targets)}})
    run_train(["--config", str(cfg)])
    f, s = npz(out), summary(out)
    assert s["embeddings"] == "weighted_mean" and summary(out, 0)["embeddings"] is None

    examples, _ = load_examples(POOL_TINY)
    _, encoded, _ = encode_all(examples, tok, "chat", 160, "skip")
    _, target_enc, _ = encode_all(load_examples(_sft_only(targets))[0], tok, "chat", 160,
                                  "error")
    target_enc.append(encode_prompt("Add 17 and 25.", tok, "chat", 160))
    model = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32),
                                      out / "rounds" / "round_000" / "adapter").eval()

    @torch.no_grad()
    def embed(enc):
        hidden = model(input_ids=torch.tensor([enc.input_ids]),
                       output_hidden_states=True).hidden_states[-1][0]
        n = hidden.shape[0]
        weights = torch.arange(1, n + 1, dtype=torch.float32) / (n * (n + 1) / 2)
        v = (hidden * weights[:, None]).sum(0)
        return (v / v.norm()).numpy()

    pool = np.stack([embed(e) for e in encoded])
    tgt = np.stack([embed(e) for e in target_enc])
    sims = pool @ tgt.T
    qa, math = sims[:, :3].max(axis=1), sims[:, 3]
    assert f["score_rds:qa"] == pytest.approx(qa, abs=1e-4)
    assert f["score_rds:math"] == pytest.approx(math, abs=1e-4)
    assert f["score_rds"] == pytest.approx(np.maximum(qa, math), abs=1e-4)
    # the picks: round-robin over math, qa on those scores, among the round's candidates
    first = {r["pool_index"] for r in picks(out, 0)}
    cand = np.array([i for i in range(len(encoded)) if i not in first])
    expected, _ = round_robin(np.stack([math, qa], axis=1), cand, 5)
    assert [r["pool_index"] for r in picks(out)] == expected.tolist()
    assert {r["rds_subtask"] for r in picks(out)} <= {"qa", "math"}


def _sft_only(path: Path) -> Path:
    """The SFT rows of a target file, as a pool file of their own."""
    sft = path.with_name("sft_only.jsonl")
    sft.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                           if '"prompt"' not in line))
    return sft


def _tiny_classifier(out_dir: Path, tokenizer_dir: Path, num_labels: int) -> Path:
    """A randomly initialised 2-layer Llama sequence classifier with the real SmolLM2
    tokenizer (chat template included), seeded: a stand-in reward model, nothing downloaded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         num_labels=num_labels, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        LlamaForSequenceClassification(config).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_scores_once_and_matches_one_example_at_a_time(tmp_path, tiny_model_dir,
                                                                     num_labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from evotune.trainer.data import load_examples

    rm = _tiny_classifier(tmp_path / "rm", tiny_model_dir, num_labels)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", tiny_model_dir, out, selection={
        "selector": "weighted", "weighted": {"score": "reward", "alpha": 1.0}},
        scoring={"reward": {"model": str(rm), "label": 0}}, data={"max_length": 100})
    proc = run_train(["--config", str(cfg)])
    f = npz(out)
    # one at a time, no padding: the conversation under the classifier's chat template
    tok = AutoTokenizer.from_pretrained(rm)
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    examples, _ = load_examples(POOL_TINY)
    kept = [ex for ex in examples if ex.id in set(f["ids"].tolist())]
    expected, cut = [], 0
    with torch.no_grad():
        for ex in kept:
            ids = tok(tok.apply_chat_template(ex.messages, tokenize=False),
                      add_special_tokens=False).input_ids
            cut += len(ids) > 100
            logits = model(input_ids=torch.tensor([ids[:100]])).logits[0]
            expected.append(float(logits[0] if num_labels == 1 else logits.softmax(-1)[0]))
    # the rows the reward model saw cut, counted over every rank's batches, in one warning
    assert cut > 0 and f"scoring.reward.model: {cut} pool rows cut to data.max_length=100" \
        in " ".join(proc.stderr.split())
    assert f["score_reward"] == pytest.approx(np.array(expected), rel=1e-4, abs=1e-6)
    # alpha = 1: the top rewards among the round's candidates
    first = {r["pool_index"] for r in picks(out, 0)}
    cand = [i for i in range(len(kept)) if i not in first]
    best = sorted(cand, key=lambda i: (-expected[i], i))[:5]
    assert [r["pool_index"] for r in picks(out)] == best
    # scored once: the reward pass ran in round 1 only, round 2 reused its values
    assert summary(out, 1)["tokens"]["reward"] > 0 and "reward" not in summary(out, 2)["tokens"]
    assert npz(out, 2)["score_reward"] == pytest.approx(f["score_reward"])
    if num_labels == 1:     # sharded over two ranks: the same values
        run_train(["--config", str(cfg), "--scores", "reward", "--out", str(tmp_path / "two")],
                  ranks=2, script="score_pool.py")
        two = [json.loads(line)["reward"] for line in
               (tmp_path / "two" / "scores.jsonl").read_text().splitlines()]
        assert two == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_mods_preset_with_a_reward_model_filters_by_it(tmp_path, tiny_model_dir):
    """configs/mods_like.yaml with a reward model given, as its header says: the quality step
    keeps the top half of the candidates by reward before k-center."""
    from helpers import EVAL_TINY, REPO
    rm = _tiny_classifier(tmp_path / "rm", tiny_model_dir, 1)
    out = tmp_path / "out"
    run_train(["--config", str(REPO / "configs" / "mods_like.yaml"), f"model.path={tiny_model_dir}",
               "model.precision=fp32",
               f"data.pool={POOL_TINY}", f"eval.path={EVAL_TINY}", "data.on_error=skip",
               "data.max_length=160", "selection.init_size=6", "selection.per_round=5",
               "train.epochs=1", "train.batch_size=4", "train.micro_batch_size=2",
               "lora.target_modules=[q_proj, v_proj]", f"output.dir={out}",
               f"scoring.reward.model={rm}", "selection.filter_score=reward"])
    for r in (0, 1):
        f, rows = npz(out, r), picks(out, r)
        first = {x["pool_index"] for x in picks(out, 0)} if r else set()
        cand = [i for i in range(len(f["ids"])) if i not in first]
        top_half = sorted(cand, key=lambda i: (-f["score_reward"][i], i))[:len(cand) // 2]
        assert {x["pool_index"] for x in rows} <= set(top_half)
        assert all(x["passed_filter"] == 1 for x in rows)


@pytest.mark.parametrize("rule", ["rds", "filtered_kcenter", "lift", "weighted", "ifd_mix",
                                  "deita", "reward", "linear", "cluster"])
def test_sharded_score_rules_on_two_ranks_pick_like_one_rank(tmp_path, tiny_model_dir, rule):
    """rds, a forward-score filter over k-center, LIFT, the weighted greedy with a forward
    score, the IFD mix (configs/ifd_mix.yaml's rule, on a sample of the pool: IFD is computed
    on rank 0 and sent back), DEITA's repr filter by IFD, MoDS's reward filter over k-center
    (the reward model's values sent to every rank), the weighted greedy by Instruction
    Mining's linear rule over knn_k (computed over ranks in tiles) and the cluster quotas with
    the streamed mini-batch KMeans select on every rank over its own rows (nothing gathered
    for the selection): the same picks, scores and skip reasons as one rank, with a sampled
    round (selection.candidates) for rds. LIFT's row variances come from sums over ranks:
    equal to their last digits."""
    targets = tmp_path / "targets.jsonl"
    rows = [json.loads(line) for line in (POOL_TINY.parent / "eval_tiny.jsonl").read_text()
            .splitlines()][:3]
    targets.write_text("".join(json.dumps({**r, "subtask": "qa"}) + "\n" for r in rows)
                       + json.dumps({"prompt": "Add 17 and 25.", "subtask": "math"}) + "\n")
    sections = {"selection": {"selector": "rds", "rounds": 2, "candidates": 0.6},
                "scoring": {"rds": {"targets": str(targets)}}} if rule == "rds" else \
        {"selection": {"selector": "kcenter", "rounds": 2, "filter_score": "entropy",
                       "filter_top_fraction": 0.5}} if rule == "filtered_kcenter" else \
        {"selection": {"selector": "lift", "rounds": 2, "lift": {"score": "entropy",
                                                                 "keep": 0.6}}} \
        if rule == "lift" else \
        {"selection": {"selector": "weighted", "rounds": 2, "weighted": {"score": "entropy",
                                                                         "alpha": 0.5}}} \
        if rule == "weighted" else \
        {"selection": {"selector": "repr_filter", "rounds": 2,
                       "repr_filter": {"score": "ifd_cherry", "threshold": 0.9}}} \
        if rule == "deita" else \
        {"selection": {"selector": "kcenter", "rounds": 2, "filter_score": "reward",
                       "filter_top_fraction": 0.5},
         "scoring": {"reward": {"model": str(_tiny_classifier(tmp_path / "rm", tiny_model_dir,
                                                              1))}}} \
        if rule == "reward" else \
        {"selection": {"selector": "weighted", "rounds": 2, "candidates": 0.8,
                       "weighted": {"score": "linear", "alpha": 0.5}},
         "scoring": {"linear": {"rule": "1.0*knn_k - 0.5*entropy"}, "knn_k": {"k": 3,
                                                                             "chunk_size": 4}}} \
        if rule == "linear" else \
        {"selection": {"selector": "cluster_quota", "rounds": 2, "cluster_quota": {
            "score": "entropy", "n_clusters": 3, "kmeans": "minibatch", "batch_size": 8}}} \
        if rule == "cluster" else \
        {"selection": {"selector": "weighted", "rounds": 2, "candidates": 0.7,
                       "weighted": {"score": "ifd_cherry", "alpha": 0.5},
                       "filter_score": "ifd_cherry", "filter_max": 1.0}}
    runs = {}
    for ranks in (1, 2):
        runs[ranks] = tmp_path / f"out{ranks}"
        cfg = write_config(tmp_path / f"cfg{ranks}.yaml", tiny_model_dir, runs[ranks],
                           **sections)
        run_train(["--config", str(cfg)], ranks=ranks if ranks > 1 else None)
    one, two = picks(runs[1]), picks(runs[2])
    assert [r["id"] for r in one] == [r["id"] for r in two]
    for r1, r2 in zip(one, two):                         # every logged number of every pick
        assert sorted(r1) == sorted(r2)
        for key in r1:
            same = pytest.approx(r2[key], rel=1e-9) if key == "row_variance" else r2[key]
            assert r1[key] == same, (r1["pick_order"], key, r1[key], r2[key])
    score = "rds" if rule == "rds" else "ifd_cherry" if rule in ("ifd_mix", "deita") else \
        rule if rule in ("reward", "linear") else "entropy"
    assert all(np.isfinite(r[score]) for r in one)
    a, b = npz(runs[1]), npz(runs[2])
    assert sorted(a) == sorted(b) and f"score_{score}" in a
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f"), key
    s1, s2 = summary(runs[1]), summary(runs[2])
    assert s1["score_skipped"] == s2["score_skipped"] and s2["world_size"] == 2
    assert s1["selected_on"] == s2["selected_on"] == "every rank"
    assert s1["selection_info"] == s2["selection_info"]
    if rule == "rds":            # 40% of the unselected rows were not measured this round
        assert s1["score_skipped"]["rds"]["count"] >= 0.3 * (len(a["ids"]) - len(one))
        assert {r["rds_subtask"] for r in one} <= {"qa", "math"}
        assert all(f"rds:{t}" in r for r in one for t in ("qa", "math"))
    elif rule in ("filtered_kcenter", "reward"):
        assert s1["selection_info"]["passed"] > 0
    elif rule == "cluster":
        assert s1["selection_info"]["n_clusters"] == 3
        assert {r["cluster"] for r in one} == {0, 1, 2}
    elif rule == "linear":             # knn_k over the round's sample only (0.8 of the rest)
        sampled = np.isfinite(a["score_knn_k"])
        assert a["score_linear"][sampled] == pytest.approx(
            a["score_knn_k"][sampled] - 0.5 * a["score_entropy"][sampled])
        assert 0 < sampled.sum() < len(sampled)
    elif rule == "lift":
        assert all(np.isfinite(r["row_variance"]) for r in one)
    elif rule == "deita":
        assert all(r["admitted"] in (0, 1) and "max_cosine" in r for r in one)
    elif rule == "ifd_mix":
        assert s1["selection_info"]["passed"] > 0
        assert all(r["ifd_cherry"] <= 1.0 for r in one if r["passed_filter"] == 1)
    else:
        assert all(np.isfinite(r["objective"]) for r in one)
