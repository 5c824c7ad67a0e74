"""Bootstrap intervals, top-k probabilities, rank stability and split-half checks of a block ranking."""

from __future__ import annotations

import json
import random

import pytest
import torch
from scipy.stats import spearmanr

from conftest import WORDS, make_tokenizer, tiny_model
from layerif.cli import main
from layerif.data import encode_split
from layerif.errors import UserError
from helpers import compute, stats_from_grads
from layerif.models import LoadedModel
from layerif.engine import EngineConfig
from layerif.influence import EstimatorConfig
from layerif.scores import ScoreConfig, split_half_recompute
from layerif.stability import (bootstrap, layer_scores, spearman, split_half_from_influence, split_half_from_stats,
                               split_indices)


def random_texts(n: int, seed: int) -> list[str]:
    """n distinct word sequences from the test tokenizer's vocabulary."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + f" {i % 10}" for i in range(n)]


def synthetic(n: int, layers: int = 8, seed: int = 0, n_val: int | None = None) -> dict[int, torch.Tensor]:
    """Per-sample influences of a fixed distribution per block: block l has mean -0.1 (l + 1), noise sd 1."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if n_val is None else (n_val, n)
    return {l: torch.randn(shape, generator=g, dtype=torch.float64) - 0.1 * (l + 1) for l in range(layers)}


def test_spearman_matches_scipy_with_ties_and_constant():
    a, b = [3.0, 1.0, 2.0, 2.0, 5.0], [1.0, 0.5, 4.0, 4.0, 9.0]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, [-x for x in a]) == pytest.approx(-1.0)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) != spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])  # NaN


def test_bootstrap_scores_are_layer_scores_and_intervals_hold_them():
    inf = synthetic(200)
    b = bootstrap(inf, 300, top_k=3, seed=1)
    assert b["layers"] == list(range(8)) and b["score"] == pytest.approx(layer_scores(inf))
    for lo, s, hi in zip(b["ci_low"], b["score"], b["ci_high"]):
        assert lo < s < hi
    assert sum(b["p_top_k"]) == pytest.approx(3.0)
    full = layer_scores(inf)
    assert b["top_k_blocks"] == sorted(range(8), key=lambda l: -full[l])[:3]
    assert -1 <= b["rank_stability_ci"][0] <= b["rank_stability"] <= b["rank_stability_ci"][1] <= 1
    assert bootstrap(inf, 300, top_k=3, seed=1) == b  # seeded


def test_bootstrap_intervals_shrink_as_n_grows_synthetic():
    """Relative interval width of a sum of n i.i.d. contributions shrinks like 1/sqrt(n); rank stability rises."""
    small, large = (bootstrap(synthetic(n, seed=n), 400, seed=0) for n in (50, 800))
    w = lambda b: sum(b["rel_width"]) / len(b["rel_width"])  # noqa: E731
    assert w(large) < 0.4 * w(small)  # 1/sqrt(16) = 0.25 expected
    assert large["rank_stability"] > small["rank_stability"]


def test_bootstrap_intervals_shrink_as_n_grows_tiny_model():
    lm = LoadedModel(model=tiny_model("llama", n_layers=4, seed=5), tokenizer=make_tokenizer(), name="tiny")
    val = encode_split(lm.tokenizer, [{"text": t} for t in random_texts(4, seed=99)], "validation")[0]
    texts = random_texts(48, seed=7)
    widths = []
    for n in (12, 48):
        train = encode_split(lm.tokenizer, [{"text": t} for t in texts[:n]], "train")[0]
        res = compute(lm, train, val, "attn", "datainf", 0.1, batch_size=16)
        b = bootstrap(res.influence, 300, top_k=2, seed=0)
        widths.append(sum(hi - lo for lo, hi in zip(b["ci_low"], b["ci_high"])) / sum(b["score"]))
    assert widths[1] < 0.75 * widths[0], widths  # 1/sqrt(4) = 0.5 expected


def test_deterministic_influences_give_certain_ranking():
    inf = {l: torch.full((10,), -float(l + 1), dtype=torch.float64) for l in range(5)}
    b = bootstrap(inf, 50, top_k=2)
    assert b["rank_stability"] == pytest.approx(1.0)
    assert b["p_top_k"] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert b["ci_low"] == pytest.approx(b["score"]) and b["ci_high"] == pytest.approx(b["score"])


def test_resampling_identical_validation_columns_changes_nothing():
    one = synthetic(30, n_val=1)
    rep = {l: v.expand(4, -1).clone() for l, v in one.items()}
    a = bootstrap(rep, 40, seed=3)
    b = bootstrap(rep, 40, seed=3, resample_val=True)
    assert a["ci_low"] == pytest.approx(b["ci_low"]) and a["p_top_k"] == b["p_top_k"]
    with pytest.raises(UserError, match="--per-val"):
        bootstrap(synthetic(30), 40, resample_val=True)


@pytest.mark.parametrize("B", [-3, 1])
def test_bootstrap_needs_two_resamples(B):
    with pytest.raises(UserError, match="--bootstrap must be >= 2"):
        bootstrap(synthetic(10), B)


def test_split_half_of_deterministic_case_is_one():
    inf = {l: torch.full((11,), -float(l + 1), dtype=torch.float64) for l in range(6)}
    s = split_half_from_influence(inf, top_k=2, seed=4)
    assert s["spearman"] == 1.0 and s["spearman_brown"] == 1.0 and s["top_k_overlap"] == 1.0 and s["n_half"] == 5
    a, b = split_indices(11, seed=4)
    assert not set(a) & set(b) and len(a) == len(b) == 5


def test_split_half_from_stats_rescores_each_half_on_its_own():
    """Identical train gradients: each half's own lambda and 1/n terms give the same profile -> Spearman 1."""
    from layerif.compare import block_influence
    from layerif.models import Projection

    g = torch.Generator().manual_seed(0)
    targets, stats = [], {}
    for l in range(5):
        G = torch.randn(1, 7, generator=g, dtype=torch.float64).expand(12, -1)
        v = (l + 1) * G[0] + 0.01 * torch.randn(7, generator=g, dtype=torch.float64)
        stats[f"m{l}"] = stats_from_grads(G, v)
        targets.append(Projection(block=l, name=f"m{l}", module=torch.nn.Linear(1, 1), rel=f"m{l}"))
    for est in ("datainf", "exact", "lissa"):
        s = split_half_from_stats(stats, lambda st, est=est: block_influence(st, targets, EstimatorConfig(est, 0.1)),
                                  top_k=2, seed=1)
        assert s["spearman"] == pytest.approx(1.0) and s["score_a"] == pytest.approx(s["score_b"])


def test_split_half_recompute_on_tiny_model_with_identical_records_is_one():
    lm = LoadedModel(model=tiny_model("llama", n_layers=3, seed=2), tokenizer=make_tokenizer(), name="tiny")
    train = encode_split(lm.tokenizer, [{"text": "the capital of france is paris"}] * 8, "train")[0]
    val = encode_split(lm.tokenizer, [{"text": "one plus two equals three"}], "validation")[0]
    s = split_half_recompute(lm, train, val, ScoreConfig(EstimatorConfig("datainf", 0.1), EngineConfig("attn", batch_size=4)),
                             top_k=2, seed=0)
    assert s["method"] == "recomputed" and s["n_half"] == 4
    assert s["spearman"] == pytest.approx(1.0) and s["score_a"] == pytest.approx(s["score_b"], rel=1e-6)


def test_split_half_recompute_equals_rescoring_gram_subsets():
    """Two independent routes to the same halves: new gradient passes per half vs K[A, A], P[A] of one pass."""
    from layerif.compare import block_influence
    from layerif.models import select_targets
    from layerif.engine import module_stats

    lm = LoadedModel(model=tiny_model("llama", n_layers=3, seed=6), tokenizer=make_tokenizer(), name="tiny")
    train = encode_split(lm.tokenizer, [{"text": t} for t in random_texts(10, seed=5)], "train")[0]
    val = encode_split(lm.tokenizer, [{"text": t} for t in random_texts(2, seed=6)], "validation")[0]
    rec = split_half_recompute(lm, train, val, ScoreConfig(EstimatorConfig("exact", 0.1),
                                                           EngineConfig("attn", batch_size=5, mode="materialized")),
                               top_k=2, seed=3)
    targets = select_targets(lm.model, "attn")
    stats, _, _ = module_stats(lm.model, targets, train, val, lm.tokenizer.pad_token_id, EngineConfig(batch_size=5))
    gram = split_half_from_stats(stats, lambda s: block_influence(s, targets, EstimatorConfig("exact", 0.1)), top_k=2,
                                 seed=3)
    assert rec["score_a"] == pytest.approx(gram["score_a"], rel=1e-4)
    assert rec["score_b"] == pytest.approx(gram["score_b"], rel=1e-4)


# ----------------------------------------------------------------------------- through `layerif score`


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=3, seed=0).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in random_texts(10, seed=1)))
    (d / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in random_texts(3, seed=2)))
    return ["--train", str(d / "train.jsonl"), "--val", str(d / "val.jsonl")]


@pytest.mark.parametrize("estimator", ["datainf", "grad-dot"])
def test_score_writes_stability(model_dir, data, tmp_path, capsys, estimator):
    out = tmp_path / "o"
    assert main(["score", "--model", str(model_dir), *data, "--out", str(out), "--quiet", "--bootstrap", "40",
                 "--split-half", "--top-k", "2", "--per-val", "--bootstrap-val", "--estimator", estimator]) == 0
    doc = json.loads((out / "scores.json").read_text())
    b, s = doc["stability"]["bootstrap"], doc["stability"]["split_half"]
    assert b["B"] == 40 and b["top_k"] == 2 and b["resample_val"] and b["score"] == pytest.approx(doc["score"], rel=1e-6)
    assert s["method"] == ("per-sample influences" if estimator == "grad-dot" else "recomputed") and s["n_half"] == 5
    assert (out / "stability.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "rank stability (bootstrap, B=40)" in printed and "split-half" in printed
    assert "rank" in (out / "report.md").read_text()


def test_error_bars_drawn_from_bootstrap():
    from matplotlib.container import ErrorbarContainer

    from layerif.commands.score import plot
    from layerif.scores import ScoreResult

    inf = synthetic(20, layers=4)
    res = ScoreResult(layers=[0, 1, 2, 3], influence=inf, lambdas={}, train_loss=torch.zeros(20), seconds=0, passes=0,
                      meta={"stability": {"bootstrap": bootstrap(inf, 30)}})
    fig = plot(res, "t")
    assert any(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)


@pytest.mark.parametrize("extra,expect", [
    (["--bootstrap", "-5"], "--bootstrap must be >= 2 resamples, or 0 for none (got -5)"),
    (["--bootstrap", "1"], "--bootstrap must be >= 2"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--bootstrap", "10", "--bootstrap-val"], "--bootstrap-val needs --per-val"),
])
def test_bad_stability_options_one_line(model_dir, data, tmp_path, capsys, extra, expect):
    out = tmp_path / "never"
    assert main(["score", "--model", str(model_dir), *data, "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and not out.exists()
