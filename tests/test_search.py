"""EvoPress-style search and the sensitivity allocation (layerif.search), on tiny random-weight models."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import layerif.prune as P
import layerif.prune_allocation as PA
from layerif.commands import compare_pruning as CP
from layerif.commands import prune as PC
import layerif.search as S
from conftest import TINY_VOCAB, tiny_model
from layerif.allocate import SparsityOptions, allocate_sparsity
from layerif.errors import UserError
from layerif.results import block_sparsity
from layerif.models import find_blocks, projections, weight_out_in


def calib(n: int = 4, seqlen: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def block_weights(model, l: int) -> dict[str, torch.Tensor]:
    _, blocks = find_blocks(model)
    return {rel: weight_out_in(m).detach().clone() for rel, m in projections(blocks[l]).items()}


# ----------------------------------------------------------------------------- level grid


def test_equal_blocks_give_the_plain_grid():
    grid = S.LevelGrid(0.6, [1000] * 4)
    np.testing.assert_allclose(grid.level_ratios(0), np.arange(19) * 0.05, atol=1e-12)
    assert grid.k_min.tolist() == [-12] * 4 and grid.k_max.tolist() == [6] * 4
    assert grid.project([0.6] * 4).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("weights", [[1000, 1000, 1000, 1000, 1000], [100, 250, 37, 400, 1000, 64]])
def test_level_switch_mutation_keeps_the_weighted_sparsity_exact(weights):
    target = 0.55
    grid = S.LevelGrid(target, weights, step=0.05, low=0.1, high=0.9)
    rng = np.random.default_rng(0)
    w = np.asarray(weights, dtype=np.float64)
    k = grid.project(rng.uniform(0.1, 0.9, len(weights)))
    moved = 0
    for _ in range(500):
        child = grid.mutate(k, rng)
        moved += not np.array_equal(child, k)
        k = child
        r = grid.ratios(k)
        assert k.sum() == 0
        assert np.all(k >= grid.k_min) and np.all(k <= grid.k_max)
        assert np.all(r >= 0.1 - 1e-12) and np.all(r <= 0.9 + 1e-12)
        # pruned weights: Σ n_l r_l = target · Σ n_l (every level step is the same number of weights)
        assert math.isclose(float((w * r).sum()), target * w.sum(), rel_tol=1e-12)
    assert moved > 400


def test_projection_meets_the_budget_and_stays_near_the_start():
    weights = [100, 250, 37, 400, 1000, 64]
    grid = S.LevelGrid(0.5, weights, step=0.05)
    start = np.array([0.2, 0.8, 0.5, 0.45, 0.55, 0.9])
    k = grid.project(start)
    assert k.sum() == 0
    assert np.average(grid.ratios(k), weights=weights) == pytest.approx(0.5, abs=1e-12)
    # each block within a few level steps of where it started
    assert np.all(np.abs(grid.ratios(k) - np.clip(start, 0, 0.9)) <= 3 * grid.unit + 1e-12)


def test_grid_checks():
    with pytest.raises(UserError, match="low"):
        S.LevelGrid(0.95, [10, 10])
    with pytest.raises(UserError, match="step"):
        S.LevelGrid(0.5, [10, 10], step=0)
    with pytest.raises(UserError, match="positive"):
        S.LevelGrid(0.5, [10, 0])


# ----------------------------------------------------------------------------- database


@pytest.mark.parametrize("method", list(P.PRUNERS))
def test_database_swap_is_pruning_that_block_directly(method, tmp_path):
    model = tiny_model("llama", n_layers=3)
    windows = calib()
    dense = {l: block_weights(model, l) for l in range(3)}
    db = PA.level_database(tmp_path, model, method, windows)
    info = db.ensure([[0.25], [0.35, 0.6], []])
    assert info["levels"] == 3 and info["bytes"] > 0
    levels = S.BlockLevels(model, db)
    levels.set([None, 0.35, None])
    swapped = block_weights(model, 1)
    for l in (0, 2):  # untouched blocks stay dense
        assert all(torch.equal(block_weights(model, l)[rel], w) for rel, w in dense[l].items())
    levels.restore()
    assert all(torch.equal(block_weights(model, 1)[rel], w) for rel, w in dense[1].items())

    direct = copy.deepcopy(model)
    P.prune_model(direct, [0.0, 0.35, 0.0], method, windows)
    for rel, w in block_weights(direct, 1).items():
        assert torch.equal(swapped[rel], w), rel
    assert any((w == 0).any() for w in swapped.values())


def test_database_resumes_and_keys_its_settings(tmp_path):
    model = tiny_model("llama", n_layers=2)
    db = PA.level_database(tmp_path, model, "wanda", calib())
    db.ensure([[0.5], [0.5]])
    f = db.file(1, 0.5)
    stamp = f.stat().st_mtime_ns
    seconds = json.loads((db.path / "database.json").read_text())["build_seconds"]
    db.ensure([[0.5], [0.5, 0.7]])  # only the missing level is built
    assert f.stat().st_mtime_ns == stamp and db.file(1, 0.7).exists()
    assert db.info()["levels"] == 3 and db.info()["build_seconds"] >= seconds
    other = PA.level_database(tmp_path, model, "wanda", calib(seed=1))  # other calibration: other folder
    assert other.path != db.path


def test_database_is_keyed_by_the_weights_not_the_model_name(tmp_path):
    """Two models under the same name and shapes but with other weights share no level; the same weights
    under another name share them all."""
    a, b = tiny_model("llama", n_layers=2, seed=0), tiny_model("llama", n_layers=2, seed=1)
    db = PA.level_database(tmp_path, a, "magnitude", model_name="models/x")
    db.ensure([[0.5], [0.5]])
    other = PA.level_database(tmp_path, b, "magnitude", model_name="models/x")
    assert other.path != db.path and not other.file(0, 0.5).exists()
    same = PA.level_database(tmp_path, tiny_model("llama", n_layers=2, seed=0), "magnitude", model_name="./models/x")
    assert same.path == db.path and same.file(0, 0.5).exists()


# ----------------------------------------------------------------------------- fitness


def test_kl_fitness_is_the_plain_sum():
    dense = tiny_model("llama", n_layers=2, seed=3)
    pruned = copy.deepcopy(dense)
    P.prune_model(pruned, [0.5, 0.7], "magnitude")
    windows = calib(n=3, seqlen=6)
    ref = S.reference_logprobs(dense, windows, batch_size=2)
    got = S.kl_to_reference(pruned, windows, ref, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            a = dense(input_ids=w[None]).logits[0].double().tolist()
            b = pruned(input_ids=w[None]).logits[0].double().tolist()
            for t in range(len(w) - 1):
                za = sum(math.exp(x) for x in a[t])
                zb = sum(math.exp(x) for x in b[t])
                for xa, xb in zip(a[t], b[t]):
                    p, q = math.exp(xa) / za, math.exp(xb) / zb
                    total += p * (math.log(p) - math.log(q))
                count += 1
    assert got == pytest.approx(total / count, rel=1e-4)
    assert got > 0


# ----------------------------------------------------------------------------- search


def test_evolve_on_a_known_objective_is_seeded_elitist_and_within_budget():
    weights = [100, 100, 300, 100, 50]
    grid = S.LevelGrid(0.5, weights, step=0.05, low=0.0, high=0.9)
    cost = np.array([5.0, 1.0, 1.0, 0.2, 1.0])  # block 0 is expensive to prune

    def fitness(levels, idx):
        return float((cost * grid.ratios(levels) ** 2).sum())

    config = S.SearchConfig(evals=120, offspring=6, survivors=(2,), screen_windows=(1,), seed=7)
    a = S.evolve(fitness, grid, {"uniform": grid.project([0.5] * 5)}, 4, 10, config)
    b = S.evolve(fitness, grid, {"uniform": grid.project([0.5] * 5)}, 4, 10, config)
    strip = lambda t: [{k: v for k, v in r.items() if k != "seconds"} for r in t]  # noqa: E731
    assert np.array_equal(a.levels, b.levels) and strip(a.trajectory) == strip(b.trajectory)
    assert a.evaluations <= 120 and a.evaluations == a.trajectory[-1]["evaluations"]
    fits = [r["fitness"] for r in a.trajectory]
    assert all(x >= y for x, y in zip(fits, fits[1:])) and fits[-1] < fits[0]
    assert a.levels.sum() == 0 and a.ratios[0] < 0.5 and a.ratios[3] > 0.5


def test_multi_stage_selection_follows_the_schedule_a_plain_loop_gives():
    """Stages (windows 1 then 3, survivors 4 then 2) with 6 fitness windows: per generation the 8 offspring are
    scored on 1 window, the 4 best of them on 3 windows, the 2 best of those on all 6; the calls are counted here
    one by one and each stage's survivors re-ranked by hand from the scores the previous stage saw."""
    grid = S.LevelGrid(0.5, [100] * 6, step=0.05)
    cost = np.array([3.0, 0.5, 1.0, 2.0, 0.2, 1.0])
    calls: list[tuple[bytes, tuple[int, ...], float]] = []

    def fitness(levels, idx):
        value = float((cost * grid.ratios(levels) ** 2).sum() * (1 + 0.01 * len(idx)))
        calls.append((levels.tobytes(), tuple(int(i) for i in idx), value))
        return value

    config = S.SearchConfig(evals=3 * 14 + 2, offspring=8, survivors=(4, 2), screen_windows=(1, 3), seed=3)
    assert S.generation_cost(config, 6) == (8 + 4 + 2, 8 * 1 + 4 * 3 + 2 * 6)
    starts = {"a": grid.project([0.5] * 6), "b": grid.project([0.3, 0.7, 0.5, 0.5, 0.7, 0.3])}
    result = S.evolve(fitness, grid, starts, 6, 10, config)
    first = min(starts, key=lambda n: (cost * grid.ratios(starts[n]) ** 2).sum())
    assert result.start == first and set(result.start_fitnesses) == {"a", "b"}
    assert [len(c[1]) for c in calls[:2]] == [6, 6]
    gens = calls[2:]
    assert len(gens) == 3 * 14 and result.evaluations == 2 + 3 * 14
    assert result.tokens == 10 * (2 * 6 + 3 * (8 * 1 + 4 * 3 + 2 * 6))
    for g in range(3):
        stage1, stage2, final = gens[14 * g: 14 * g + 8], gens[14 * g + 8: 14 * g + 12], gens[14 * g + 12: 14 * g + 14]
        assert {len(c[1]) for c in stage1} == {1} and {len(c[1]) for c in stage2} == {3}
        assert {c[1] for c in final} == {tuple(range(6))}
        best4 = [c[0] for c in sorted(stage1, key=lambda c: c[2])[:4]]
        assert sorted(c[0] for c in stage2) == sorted(best4)
        best2 = [c[0] for c in sorted(stage2, key=lambda c: c[2])[:2]]
        assert sorted(c[0] for c in final) == sorted(best2)
    fits = [r["fitness"] for r in result.trajectory]
    assert all(x >= y for x, y in zip(fits, fits[1:]))


@pytest.mark.parametrize("survivors, windows, match", [((2, 2), (1, 2), "fall"), ((4, 2), (2, 2), "grow"),
                                                       ((9,), (1,), "fall"), ((2,), (1, 3), "one value")])
def test_selection_stages_out_of_order_are_refused(survivors, windows, match):
    with pytest.raises(UserError, match=match):
        S.SearchConfig(offspring=8, survivors=survivors, screen_windows=windows).check()


def test_block_tokens_counts_whole_model_passes_as_a_hand_count():
    """A forward of n windows of s tokens adds n·s; block-by-block calibration of k windows (without update)
    runs block 0 once per window to catch its inputs (stopped there: 1/L of a pass each), one window through
    every block for the call arguments, and each window through each block once."""
    from layerif.calibration import calibrate
    from layerif.models import BlockTokens

    model = tiny_model("llama", n_layers=4, seed=0)
    n, s = 3, 7
    windows = calib(n=n, seqlen=s, seed=1)
    with BlockTokens(model) as cost, torch.no_grad():
        model(input_ids=windows)
    assert cost.tokens == n * s
    with BlockTokens(model) as cost:
        for _ in calibrate(model, windows, update=False):
            pass
    assert cost.total == n * s + 4 * s + 4 * n * s and cost.tokens == cost.total / 4


def planted_model():
    """A tiny model whose block 1 writes 30× more into the residual stream: pruning it changes the output most."""
    model = tiny_model("llama", n_layers=4, seed=1)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for rel, mod in projections(blocks[1]).items():
            if rel.endswith(("o_proj", "down_proj")):
                mod.weight.mul_(30)
    return model


def test_search_moves_sparsity_away_from_a_planted_sensitive_block(tmp_path):
    model = planted_model()
    weights = P.prunable_params(model)
    windows = calib(n=4, seqlen=12, seed=2)
    db = PA.level_database(tmp_path, model, "magnitude")
    before = {l: block_weights(model, l) for l in range(4)}
    config = S.SearchConfig(evals=60, offspring=4, survivors=(2,), screen_windows=(2,), step=0.1, low=0.0, high=0.9,
                            seed=0)
    db.ensure(S.search_levels(0.5, weights, config))  # the pruner side writes the levels; the search only reads
    result, info = S.search_allocation(model, db, 0.5, weights, windows, {"uniform": [0.5] * 4}, config,
                                       batch_size=4)
    assert result.ratios[1] < 0.5 and result.ratios[1] == result.ratios.min()
    assert result.fitness < result.start_fitness
    assert np.average(result.ratios, weights=weights) == pytest.approx(0.5, abs=1e-12)
    assert info["levels"] == 4 * 10
    for l in range(4):  # the model is left dense
        assert all(torch.equal(block_weights(model, l)[rel], w) for rel, w in before[l].items())


def test_sensitivity_finds_the_planted_block_and_gives_it_the_least_sparsity(tmp_path):
    model = planted_model()
    weights = P.prunable_params(model)
    windows = calib(n=3, seqlen=10, seed=2)
    db = PA.level_database(tmp_path, model, "magnitude")
    db.ensure([[0.5]] * 4)
    kl = S.block_sensitivity(model, db, 0.5, windows, batch_size=3)
    assert int(np.argmax(kl)) == 1 and np.all(kl > 0)
    # one block pruned alone: the same number as the KL of a directly pruned copy
    direct = copy.deepcopy(model)
    P.prune_model(direct, [0, 0, 0.5, 0], "magnitude")
    ref = S.reference_logprobs(model, windows, 3)
    assert kl[2] == pytest.approx(S.kl_to_reference(direct, windows, ref, 3), rel=1e-6)
    ratios = allocate_sparsity("sensitivity", kl, 0.5, weights, SparsityOptions(epsilon=0.2))
    assert int(np.argmin(ratios)) == 1
    assert np.average(ratios, weights=weights) == pytest.approx(0.5, abs=1e-12)


def test_outputs_and_saved_allocations(tmp_path):
    grid = S.LevelGrid(0.5, [10, 10])
    result = S.evolve(lambda k, i: float(abs(k[0])), grid, {"uniform": np.array([1, -1])}, 2, 5,
                      S.SearchConfig(evals=20, offspring=2, survivors=(1,), screen_windows=(1,)))
    rec = S.search_record(result, S.SearchConfig(), {"path": "x"}, "wanda")
    files = S.write_search(tmp_path, {"uniform": rec, "other": {**rec, "target": 0.7}}, "title")
    assert all((tmp_path / f).exists() for f in files)
    lines = (tmp_path / "search_trajectory.csv").read_text().splitlines()
    assert lines[0].startswith("search,generation,evaluations") and len(lines) == 1 + 2 * len(result.trajectory)
    (tmp_path / "allocation.json").write_text(json.dumps({"layers": [0, 1], "sparsity": [0.4, 0.6]}))
    assert block_sparsity(tmp_path / "allocation.json", 2)[0].tolist() == [0.4, 0.6]
    assert block_sparsity(tmp_path, 2)[0].tolist() == [0.4, 0.6]  # the folder holding it
    with pytest.raises(UserError, match="model has 3"):
        block_sparsity(tmp_path / "allocation.json", 3)
    (tmp_path / "other.json").write_text(json.dumps({"layers": [0, 1], "experts": [1, 2]}))
    with pytest.raises(UserError, match="not a pruning allocation"):
        block_sparsity(tmp_path / "other.json", 2)


# ----------------------------------------------------------------------------- commands

from test_prune import compare_args, model_dir, prune_args, read_csv, stand_ins  # noqa: E402,F401  (fixtures)


def test_prune_with_search_then_apply_the_saved_allocation(stand_ins, model_dir, tmp_path):
    from pathlib import Path

    search = dict(allocation="search", method="wanda", search_init="layerif", search_evals=12, search_offspring=3,
                  search_survivors=["1"], search_windows=3, search_screen_windows=["1"], search_dir=str(tmp_path / "s"))
    summary = PC.run(prune_args(model_dir, tmp_path, save=str(tmp_path / "pruned"), **search))
    assert "search from layerif" in summary
    assert "search-layerif" in PC.PruneArgs.__dataclass_fields__["allocation"].metadata["choices"]
    saved = json.loads((tmp_path / "pruned" / "allocation.json").read_text())
    assert saved["allocation"] == "search" and saved["search"]["evaluations"] <= 12
    weights = saved["prunable_params"]
    assert np.average(saved["sparsity"], weights=weights) == pytest.approx(0.5, abs=1e-12)
    assert all(f.exists() for f in (Path(tmp_path / "s") / n for n in ("search.json", "search.png")))
    assert yaml_sparsity(tmp_path / "pruned") == pytest.approx(saved["sparsity"], abs=1e-6)
    # the saved allocation applied again: the same per-block targets and the same pruned model
    PC.run(prune_args(model_dir, tmp_path, allocation_file=str(tmp_path / "pruned" / "allocation.json"),
                     save=str(tmp_path / "again"), sparsity=None))
    again = json.loads((tmp_path / "again" / "allocation.json").read_text())
    assert again["allocation"] == "file" and again["sparsity"] == saved["sparsity"]
    assert again["achieved"] == saved["achieved"] and again["target_sparsity"] == pytest.approx(0.5)
    with pytest.raises(UserError, match="neither"):
        PC.run(prune_args(model_dir, tmp_path, allocation="search", search_init="nowhere.json"))


def yaml_sparsity(folder) -> list[float]:
    import yaml

    doc = yaml.safe_load((folder / "recipe.yaml").read_text())
    return next(iter(doc["sparsity_stage"]["sparsity_modifiers"].values()))["sparsity"]


def test_prune_with_sensitivity(stand_ins, model_dir, tmp_path):
    PC.run(prune_args(model_dir, tmp_path, allocation="sensitivity", method="magnitude", search_windows=2,
                     search_dir=str(tmp_path / "s"), save=str(tmp_path / "pruned")))
    saved = json.loads((tmp_path / "pruned" / "allocation.json").read_text())
    kl = saved["sensitivity"]["kl"]
    assert saved["metric"] == kl and int(np.argmin(saved["sparsity"])) == int(np.argmax(kl))


def test_compare_pruning_with_search_and_sensitivity(stand_ins, model_dir, tmp_path):
    from pathlib import Path

    args = compare_args(model_dir, tmp_path, allocations=["uniform", "sensitivity", "search-uniform", "search-layerif"],
                        methods=["wanda"], seeds=["0"], search_evals=8, search_offspring=3, search_survivors=["1"],
                        search_windows=2, search_screen_windows=["1"])
    CP.run(args)
    out = Path(args.out)
    rows = read_csv(out / "comparison.csv")
    assert {r["allocation"] for r in rows} == {"dense", "uniform", "sensitivity", "search-uniform", "search-layerif"}
    for r in rows[1:]:
        assert float(r["achieved"]) == pytest.approx(0.5, abs=1 / 16)
    cost = {r["allocation"]: float(r["alloc_tokens"]) for r in rows}
    assert cost["uniform"] == 0 and cost["sensitivity"] > 0 and cost["search-layerif"] > 0
    assert "## Cost of each allocation" in (out / "comparison.md").read_text()
    searches = json.loads((out / "search.json").read_text())
    assert sorted(searches) == ["wanda 0.5 seed 0 from layerif", "wanda 0.5 seed 0 from uniform"]
    assert all(s["evaluations"] <= 8 for s in searches.values()) and (out / "search.png").exists()
    assert len(list((out / "levels").glob("wanda-*/b*.safetensors"))) > 3
    md = (out / "comparison.md").read_text()  # each search against its start, the LayerIF start against uniform's
    for pair in ("| search-layerif | search-uniform", "| search-uniform | uniform"):
        assert md.count(pair) == 2, pair  # accuracy and perplexity


def test_search_best_reuses_the_sensitivity_the_run_measured(stand_ins, model_dir, tmp_path, monkeypatch):
    """In one comparison the sensitivity allocation and the search's sensitivity start are one measurement per
    (seed, pruner, target): the same KL rises, measured once."""
    calls = []
    real = PA.run_sensitivity
    monkeypatch.setattr(PA, "run_sensitivity", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    args = compare_args(model_dir, tmp_path, allocations=["sensitivity", "search-best"], methods=["magnitude"],
                        seeds=["0"], sparsities=["0.5", "0.6"], search_evals=10, search_offspring=2,
                        search_survivors=["1"], search_windows=2, search_screen_windows=["1"])
    CP.run(args)
    assert calls == [0.5, 0.6]
    searches = json.loads((tmp_path / "cmp" / "search.json").read_text())
    assert all("sensitivity" in s["starts"] for s in searches.values())


def test_a_new_search_start_is_one_registration(stand_ins, model_dir, tmp_path, monkeypatch):
    """A search start added in one place (here: ATP, sparsity rising with depth) is an allocation search-NAME."""
    from layerif import allocate

    monkeypatch.setattr(allocate, "ALLOCATIONS", {k: v for k, v in allocate.ALLOCATIONS.items() if k != "search-atp"})
    monkeypatch.setattr(allocate, "SEARCH_STARTS", [a for a in allocate.SEARCH_STARTS if a != "atp"])
    allocate.register_search_start("atp")

    PC.run(prune_args(model_dir, tmp_path, allocation="search-atp", method="magnitude", search_evals=6,
                      search_offspring=2, search_survivors=["1"], search_windows=2, search_screen_windows=["1"],
                      search_dir=str(tmp_path / "s"), save=str(tmp_path / "pruned")))
    saved = json.loads((tmp_path / "pruned" / "allocation.json").read_text())
    # ATP at 0.5 over 3 equal blocks: step 0.2 / (3 − 1) = 0.1, so 0.4, 0.5, 0.6 (on the search's 0.05 grid)
    assert saved["search"]["start"] == "atp" and saved["search"]["start_sparsity"] == pytest.approx([0.4, 0.5, 0.6])
    assert np.average(saved["sparsity"], weights=saved["prunable_params"]) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("scores", [True, False])
def test_search_best_starts_from_the_best_registered_start(stand_ins, model_dir, tmp_path, scores):
    """``search-best`` evaluates every start it can compute (LayerIF's only with --scores; sensitivity measured
    with the pruner) on all fitness windows and begins from the least KL; the saved record keeps each start's KL."""
    from layerif import allocate

    kw = {} if scores else {"scores": None}
    PC.run(prune_args(model_dir, tmp_path, allocation="search-best", method="magnitude", search_evals=12,
                      search_offspring=2, search_survivors=["1"], search_windows=2, search_screen_windows=["1"],
                      search_dir=str(tmp_path / "s"), save=str(tmp_path / "pruned"), **kw))
    rec = json.loads((tmp_path / "pruned" / "allocation.json").read_text())["search"]
    expected = [a for a in allocate.SEARCH_STARTS if scores or allocate.ALLOCATIONS[a].metric != "scores"]
    assert list(rec["starts"]) == expected and "sensitivity" in expected and ("layerif" in expected) == scores
    assert rec["start"] == min(rec["starts"], key=rec["starts"].get)
    assert rec["start_fitness"] == rec["starts"][rec["start"]] and rec["fitness"] <= rec["start_fitness"]
    assert rec["evaluations"] >= len(expected)


def test_the_sparsity_target_never_reenters_a_module(stand_ins, model_dir, tmp_path):
    """From `layerif prune --allocation search-layerif` down to the pruner, no call re-enters a layerif module it
    has left: on every call stack the command's allocation and pruning calls start (layerif frames only,
    consecutive frames of one module taken as one) each module appears once. The search reads the level
    database and never calls back into the pruner."""
    import sys

    PATH = {(f"layerif.{m}",) for m in ("prune_allocation", "measure", "allocate", "prune")}
    seen: set[tuple[str, ...]] = set()
    bad: list[tuple[str, ...]] = []

    def stack_of(frame) -> tuple[str, ...]:
        mods: list[str] = []
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name.startswith("layerif") and (not mods or mods[-1] != name):
                mods.append(name)
            frame = frame.f_back
        return tuple(reversed(mods))

    def profile(frame, event, arg):
        if event == "call" and frame.f_globals.get("__name__", "").startswith("layerif"):
            stack = stack_of(frame)
            if stack[1:2] in PATH and stack not in seen:  # below the command: allocating and pruning
                seen.add(stack)
                if len(set(stack)) != len(stack):
                    bad.append(stack)

    search = dict(allocation="search-layerif", method="wanda", search_evals=6, search_offspring=2,
                  search_survivors=["1"], search_windows=2, search_screen_windows=["1"], search_dir=str(tmp_path / "s"))
    sys.setprofile(profile)
    try:
        PC.run(prune_args(model_dir, tmp_path, **search))
    finally:
        sys.setprofile(None)
    path = {m for stack in seen for m in stack}
    assert {"layerif.prune_allocation", "layerif.search", "layerif.levels", "layerif.prune"} <= path
    assert not any("layerif.search" in s and "layerif.prune" in s[s.index("layerif.search"):] for s in seen)
    assert bad == []
