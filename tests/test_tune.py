"""--tune (a hyper-parameter chosen on calibration-side windows by the KL to the dense model) and the fitness windows
apart from the pruners' calibration windows, on tiny random-weight models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import layerif.prune as P
import layerif.prune_allocation as PA
from conftest import TINY_VOCAB, make_tokenizer, tiny_model
from layerif import allocate, datasets_io, evaluate, lm_eval_io, tasks
from layerif.allocate import SparsityOptions
from layerif.commands import compare_pruning as CP
from layerif.commands import prune as PC
from layerif.errors import UserError
from layerif.levels import windows_hash
from layerif.measure import Sources, outlier_ratios
from test_prune import compare_args, model_dir, prune_args, read_csv, stand_ins  # noqa: F401  (fixtures)


def ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def tuples(windows: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(w) for w in windows.tolist()}


# ----------------------------------------------------------------------------- fitness windows apart


def test_windows_apart_skip_calibration_windows_and_repeats():
    pool = torch.tensor([[1, 1], [2, 2], [1, 1], [3, 3], [2, 2], [4, 4], [5, 5], [6, 6]])
    exclude = pool[:2]
    # draw(k) is the first k of a seeded sequence; the picks: the windows after, minus [1 1], [2 2] and repeats
    got = datasets_io.windows_apart(lambda k: pool[:k], exclude, 3)
    assert got.tolist() == [[3, 3], [4, 4], [5, 5]]
    with pytest.raises(UserError, match="apart from the 2 calibration windows"):
        datasets_io.windows_apart(lambda k: pool[:k], exclude, 5, doublings=1)


def test_fitness_windows_are_disjoint_from_the_calibration_windows(stand_ins, model_dir, tmp_path):
    args = prune_args(model_dir, tmp_path, n_calib=6, seqlen=4, search_windows=5)
    tok = make_tokenizer()
    calib = PC.windows(tok, args, args.n_calib, 0)
    fit = PC.fitness_windows(tok, args, 0, None)
    assert fit.shape == (5, 4) and len(tuples(fit)) == 5
    assert tuples(fit).isdisjoint(tuples(calib))
    # the same calibration draw given or drawn: the same fitness windows; another seed: other windows
    assert torch.equal(PC.fitness_windows(tok, args, 0, calib), fit)
    assert not torch.equal(PC.fitness_windows(tok, args, 1, None), fit)


def test_sensitivity_records_fitness_windows_apart_from_calibration(stand_ins, model_dir, tmp_path):
    PC.run(prune_args(model_dir, tmp_path, allocation="sensitivity", method="wanda", search_windows=3,
                      search_dir=str(tmp_path / "s"), save=str(tmp_path / "pruned")))
    saved = json.loads((tmp_path / "pruned" / "allocation.json").read_text())
    args = prune_args(model_dir, tmp_path)
    tok = make_tokenizer()
    calib = PC.windows(tok, args, args.n_calib, args.seed)
    fit = PC.fitness_windows(tok, args.__class__(**{**args.__dict__, "search_windows": 3}), args.seed, calib)
    rec = saved["sensitivity"]["fitness_windows"]
    assert rec == {"windows": 3, "seqlen": 16, "hash": windows_hash(fit), "calibration_hash": windows_hash(calib),
                   "shared_with_calibration": 0}
    assert tuples(fit).isdisjoint(tuples(calib))


# ----------------------------------------------------------------------------- the tuned choice


def plain_kl(dense: torch.nn.Module, pruned: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean over predicted positions of Σ_v p (log p − log q), p the dense model's next-token distribution."""
    with torch.no_grad():
        lp = torch.log_softmax(dense(windows).logits[:, :-1].double(), -1)
        lq = torch.log_softmax(pruned(windows).logits[:, :-1].double(), -1)
    return float((lp.exp() * (lp - lq)).sum() / (windows.shape[0] * (windows.shape[1] - 1)))


READERS = [(datasets_io, "evaluation_text"), (evaluate, "perplexity"), (evaluate, "window_nll"),
           (evaluate, "mc_correct"), (evaluate, "mc_accuracy"), (evaluate, "option_logprobs"),
           (evaluate, "exact_match_correct"), (tasks, "test_records"), (tasks, "get_task"),
           (lm_eval_io, "evaluate"), (lm_eval_io, "load_task"),
           (PC, "perplexity"), (PC, "mc_accuracy"), (PC, "test_records"), (PC, "eval_text"),
           (CP, "window_nll"), (CP, "mc_correct"), (CP, "test_records"), (CP, "eval_text")]
"""Every reader of test items and held-out evaluation windows (the library's and the names the commands bound)."""


def sentinels(monkeypatch, armed=lambda: True) -> None:
    """Make every reader of :data:`READERS` fail the test when called while ``armed()``."""
    for mod, name in READERS:
        real = getattr(mod, name)

        def guard(*a, _real=real, _name=f"{mod.__name__}.{name}", **k):
            if armed():
                pytest.fail(f"{_name} (test items / held-out windows) was read during tuning")
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, guard)


@pytest.mark.parametrize("name, method", [("layerif", "wanda"), ("owl", "sparsegpt")])
def test_the_tuned_value_is_the_argmin_of_a_plain_loop(monkeypatch, name, method):
    sentinels(monkeypatch)  # nothing here may read test items or held-out windows
    model = tiny_model("llama", n_layers=4, seed=3)
    dense = copy.deepcopy(model)
    calib, fit = ids(4, 12, 0), ids(3, 12, 1)
    weights = P.prunable_params(model)
    scores = np.array([1.0, 4.0, 2.0, 3.0])
    m = PA.Measurement(method, fit, Path("unused"), batch_size=2)
    ratios, metric, rec = PA.block_sparsity_for(f"{name}-tuned", Sources(model, scores, windows=calib), 0.6, weights,
                                                SparsityOptions(), measurement=m)
    grid = list(allocate.ALLOCATIONS[name].tune)
    expected = []
    for cand in grid:  # the same candidates, pruned and scored by hand
        if name == "layerif":
            r = allocate.linear_sparsity(scores, 0.6, cand["epsilon"], weights)
        else:
            r = allocate.owl_sparsity(outlier_ratios(dense, calib, cand["owl_m"]), 0.6, cand["owl_lambda"], weights)
        pruned = copy.deepcopy(dense)
        P.prune_model(pruned, r, method, calib)
        expected.append(plain_kl(dense, pruned, fit))
    assert rec["grid"] == grid and rec["fitness"] == pytest.approx(expected, rel=1e-3)  # float32 vs float64
    best = grid[int(np.argmin(expected))]
    assert rec["chosen"] == best and len(set(np.round(expected, 9))) > 1  # the grid's candidates differ
    if name == "layerif":
        np.testing.assert_allclose(ratios, allocate.linear_sparsity(scores, 0.6, best["epsilon"], weights))
        assert rec["default"] == {"epsilon": 0.2}
    else:
        np.testing.assert_allclose(metric, outlier_ratios(dense, calib, best["owl_m"]))
        assert rec["default"] == {"owl_lambda": 0.08, "owl_m": 5.0}
    assert rec["fitness_windows"]["shared_with_calibration"] == 0
    for a, b in zip(model.parameters(), dense.parameters()):  # the model is left dense
        assert torch.equal(a, b)


def test_tune_needs_a_tunable_allocation(stand_ins, model_dir, tmp_path):
    with pytest.raises(UserError, match="no hyper-parameter to tune"):
        PC.run(prune_args(model_dir, tmp_path, allocation="uniform", tune=True))
    with pytest.raises(UserError, match="--allocation-file has none"):
        PC.run(prune_args(model_dir, tmp_path, allocation_file="x.json", sparsity=None, tune=True))
    assert allocate.tuned_label("layerif-reversed") == "layerif-tuned-reversed"


def test_prune_tune_records_the_grid_and_the_choice(stand_ins, model_dir, tmp_path):
    summary = PC.run(prune_args(model_dir, tmp_path, allocation="atp", tune=True, method="wanda", search_windows=2,
                                eval_windows=2, save=str(tmp_path / "pruned")))
    saved = json.loads((tmp_path / "pruned" / "allocation.json").read_text())
    rec = saved["tune"]
    assert saved["allocation"] == "atp-tuned" and rec["grid"] == list(allocate.ATP_GRID)
    assert rec["chosen"] == rec["grid"][int(np.argmin(rec["fitness"]))] and "tuned atp" in summary
    np.testing.assert_allclose(saved["sparsity"], allocate.atp_sparsity(3, 0.5, rec["chosen"]["atp_step"],
                                                                        saved["prunable_params"]))


def test_compare_pruning_tune_never_reads_test_data_while_tuning(stand_ins, model_dir, tmp_path, monkeypatch):
    tuning = {"on": False, "calls": 0}
    real = PA.tuned_setting

    def watched(*a, **k):
        tuning["on"], tuning["calls"] = True, tuning["calls"] + 1
        try:
            return real(*a, **k)
        finally:
            tuning["on"] = False

    monkeypatch.setattr(PA, "tuned_setting", watched)
    sentinels(monkeypatch, lambda: tuning["on"])
    args = compare_args(model_dir, tmp_path, allocations=["uniform", "layerif", "dlp"], methods=["wanda"],
                        seeds=["0", "1"], search_windows=2, tune=True)
    CP.run(args)
    out = Path(args.out)
    rows = read_csv(out / "comparison.csv")
    assert [r["allocation"] for r in rows[:6]] == ["dense", "uniform", "layerif", "layerif-tuned", "dlp", "dlp-tuned"]
    assert tuning["calls"] == 4  # two tuned arms × two seeds
    recs = json.loads((out / "tuning.json").read_text())
    assert sorted(recs) == sorted(f"wanda 0.5 seed {s} {a}-tuned" for s in (0, 1) for a in ("layerif", "dlp"))
    for rec in recs.values():
        assert rec["chosen"] == rec["grid"][int(np.argmin(rec["fitness"]))]
        assert rec["fitness_windows"]["shared_with_calibration"] == 0
    md = (out / "comparison.md").read_text()
    assert "- tuning: layerif epsilon ∈ {0.02, 0.05, 0.1, 0.15, 0.2}" in md
    assert "| layerif-tuned | layerif" in md and "| dlp-tuned | dlp" in md  # tuned against default, paired
    assert json.loads((out / "config.json").read_text())["args"]["tune"] is True
