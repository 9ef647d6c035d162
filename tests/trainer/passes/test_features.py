"""The feature pass's plan (which passes a selector's needs make a round run) and its clean-up
of non-finite values."""

import numpy as np
from helpers import EVAL_TINY, POOL_TINY

from evotune.selectors.base import Features
from evotune.selectors.registry import build
from evotune.trainer.config import load_config
from evotune.trainer.data import encode_all, load_examples
from evotune.trainer.passes.features import FeaturePass, mark_non_finite


def plan(tokenizer, *overrides):
    cfg = load_config(None, [f"data.pool={POOL_TINY}", *overrides])
    examples, _ = load_examples(POOL_TINY, "skip")
    pool, enc, _ = encode_all(examples, tokenizer, "chat", 256, "skip")
    return FeaturePass(cfg, build(cfg.selection), pool, enc, tokenizer, "chat", None)


def test_a_linear_rule_brings_its_terms_and_their_passes(tokenizer):
    fp = plan(tokenizer, "selection.selector=weighted", "selection.weighted.score=linear",
              "scoring.linear.rule=1*knn_k - 1*ifd_cherry + 0.01*length")
    # IFD (training template, no proxy) reads the forward pass's loss: it is computed too
    assert fp.forward_scores == ("loss", "length")
    assert fp.ifd is not None and fp.ifd.variants == ["ifd_cherry"] and fp.ifd.needs_forward_loss
    assert fp.derived == ["knn_k", "linear"] and fp.needs_embeddings
    assert fp.influence is None and fp.needed and not fp.needs_optimizer_state


def test_the_log_says_where_a_rule_selects(tokenizer):
    assert plan(tokenizer).where_selected("kcenter") == \
        "selection (kcenter): on every rank over its own rows (nothing N × D on one rank)"
    gathered = plan(tokenizer, "selection.selector=cluster_quota").where_selected("x")
    assert "on rank 0" in gathered and "no sharded form" in gathered
    assert "reads no model features" in plan(tokenizer, "selection.selector=random") \
        .where_selected("random")


def test_kcenter_needs_only_embeddings_and_random_needs_no_pass(tokenizer):
    fp = plan(tokenizer)
    assert fp.needs_embeddings and fp.forward_scores == () and fp.ifd is None
    assert fp.derived == [] and fp.needed
    assert not plan(tokenizer, "selection.selector=random").needed
    # k-center alone keeps its embeddings sharded over the ranks (a round 0 read from the
    # base-model cache too: test_loop_e2e's cache test)
    assert fp.sharded


def test_gradient_embeddings_stay_sharded(tokenizer):
    grad = "selection.embedding=gradient"
    fp = plan(tokenizer, grad)
    assert fp.gradient_embeddings and fp.influence is not None and fp.sharded
    centroid = ("selection.selector=cluster_quota", "selection.cluster_quota.pick=centroid")
    assert plan(tokenizer, grad, *centroid, "selection.cluster_quota.kmeans=minibatch").sharded
    # TAGCOS's full KMeans has no sharded form
    tagcos = plan(tokenizer, grad, *centroid)
    assert not tagcos.sharded and "the rule has no sharded form" in tagcos.where_selected("x")
    # with a validation set (its scores on the same rows), or a forward-pass score filter
    # (its values moved to the rows of the gradient sample)
    assert plan(tokenizer, grad, f"influence.validation={EVAL_TINY}").sharded
    assert plan(tokenizer, grad, "selection.filter_score=loss").sharded


def test_a_sharded_rule_reading_the_influence_score_stays_sharded(tokenizer):
    fp = plan(tokenizer, f"influence.validation={EVAL_TINY}", "selection.filter_score=influence")
    assert fp.sharded and fp.influence is not None and not fp.gradient_embeddings


def test_a_filter_score_is_computed_too(tokenizer):
    fp = plan(tokenizer, "selection.filter_score=entropy")
    assert fp.forward_scores == ("entropy",) and fp.needs_embeddings
    # a forward score to filter k-center by: each rank scores and keeps its own rows
    assert fp.sharded
    # IFD: computed on rank 0 from the gathered losses and sent back; the rules stay sharded
    ifd = plan(tokenizer, "selection.filter_score=ifd_cherry")
    assert ifd.sharded and ifd.ifd.needs_forward_loss and ifd.forward_scores == ("loss",)
    assert plan(tokenizer, "selection.selector=weighted").sharded
    assert plan(tokenizer, "selection.selector=repr_filter").sharded
    # knn_k and the linear rule have sharded forms; a rule without one is gathered
    assert plan(tokenizer, "selection.filter_score=knn_k").sharded
    assert plan(tokenizer, "selection.selector=weighted", "selection.weighted.score=linear",
                "scoring.linear.rule=1*knn_k - 1*ifd_cherry").sharded
    assert not plan(tokenizer, "selection.selector=cluster_quota").sharded
    assert plan(tokenizer, "selection.selector=cluster_quota",
                "selection.cluster_quota.kmeans=minibatch").sharded
    # a derived score registered without a sharded form is computed on rank 0: gathered
    from evotune.trainer.scores import SCORES, Score, register
    register(Score("half_length", "derived", "length / 2",
                   lambda f, o: (f.scores["length"] / 2, {}), inputs=lambda o: ("length",)))
    try:
        assert not plan(tokenizer, "selection.filter_score=half_length").sharded
    finally:
        del SCORES["half_length"]


def test_mark_non_finite_turns_inf_into_nan_with_a_reason_once():
    f = Features(scores={"loss": np.array([1.0, np.inf, np.nan, -np.inf]),
                         "ifd_cherry": np.array([np.nan, 0.5, 0.7, 0.1])},
                 skipped={"ifd_cherry": {0: "empty answer"}})
    assert mark_non_finite(f) == {"loss": 3}
    assert np.isnan(f.scores["loss"][1:]).all() and f.scores["loss"][0] == 1.0
    assert f.skipped["loss"] == {1: "non-finite value (inf)", 2: "non-finite value (nan)",
                                 3: "non-finite value (-inf)"}
    assert f.skipped["ifd_cherry"] == {0: "empty answer"}
    assert mark_non_finite(f) == {}
