"""LoRA capacity rules (hand computations), the PEFT adapter of `layerif finetune` (equal budgets, reload to
identical logits) and `layerif compare-finetune` on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_moe import SMALL, ids, logits, model_dir, tasks, write_scores, write_validation  # noqa: F401

from layerif.allocate import CAPACITIES, capacity_ranks, parse_capacity
from layerif.cli import load_commands, main
from layerif.commands import compare_finetune
from layerif.commands import finetune as ft_cmd
from layerif.errors import UserError
from layerif.finetune import apply_lora, lora_config, remove_lora, trainable_parameters
from layerif.models import weight_out_in
from layerif.moe import target_names

FT = {k: v for k, v in SMALL.items() if k != "rank"}
load_commands()  # before the `tasks` fixture stands in a small task module


# ----------------------------------------------------------------------------- capacity rules by hand


def test_capacity_rules_by_hand():
    m = [0.5, 3.0, -1.0, 2.0, 0.0]  # highest: blocks 1, 3; lowest: 2, 4
    assert capacity_ranks("top:layerif", m, 5, 2, 4).tolist() == [0, 4, 0, 4, 0]
    assert capacity_ranks("bottom", m, 5, 2, 4, default_metric="alpha").tolist() == [0, 0, 4, 0, 4]
    assert capacity_ranks("first", None, 5, 2, 4).tolist() == [4, 4, 0, 0, 0]
    assert capacity_ranks("last", None, 5, 2, 4).tolist() == [0, 0, 0, 4, 4]
    # uniform: 8 rank units over 5 blocks -> 1 each, the 3 left to the first blocks
    assert capacity_ranks("uniform", None, 5, 2, 4).tolist() == [2, 2, 2, 1, 1]
    # rank, β = 1: w = m − min m = [1.5, 4, 0, 3, 1] (sum 9.5); 8 − 5 = 3 units on top of 1 each:
    # quotas 3·w/9.5 = [.474, 1.263, 0, .947, .316] -> floors [0, 1, 0, 0, 0], 2 left to the largest
    # fractional parts (.947 block 3, .474 block 0) -> [1, 1, 0, 1, 0] + 1
    assert capacity_ranks("rank:gain", m, 5, 2, 4, beta=1.0).tolist() == [2, 2, 1, 2, 1]
    # ties go to the lower index
    assert capacity_ranks("top:layerif", [1.0, 1.0, 1.0], 3, 1, 2).tolist() == [2, 0, 0]


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("rule", list(CAPACITIES))
def test_every_rule_spends_the_budget_exactly(rule, seed):
    rng = np.random.default_rng(seed)
    n, k, r = 30, int(rng.integers(1, 16)), int(rng.integers(2, 9))
    label = f"{rule}:layerif" if CAPACITIES[rule].uses_metric else rule
    ranks = capacity_ranks(label, rng.normal(size=n), n, k, r, beta=2.5, draw_seed=seed)
    assert ranks.sum() == k * r and ranks.min() >= 0
    if rule in ("top", "bottom", "random", "first", "last"):
        assert (ranks > 0).sum() == k and set(ranks[ranks > 0].tolist()) == {r}
    else:
        assert ranks.min() >= 1


def test_random_draw_is_fixed_by_its_seed():
    a = capacity_ranks("random", None, 30, 8, 4, draw_seed=3)
    assert (a == capacity_ranks("random", None, 30, 8, 4, draw_seed=3)).all()
    assert any((capacity_ranks("random", None, 30, 8, 4, draw_seed=s) != a).any() for s in range(1, 4))


@pytest.mark.parametrize("label, message", [
    ("middle", "unknown allocation"), ("top", "ranks blocks by a metric"), ("top:loss", "unknown metric"),
    ("random:layerif", "takes no metric"),
])
def test_bad_labels(label, message):
    with pytest.raises(UserError, match=message):
        parse_capacity(label)


def test_bad_budgets():
    with pytest.raises(UserError, match="outside 1..5"):
        capacity_ranks("last", None, 5, 6, 4)
    with pytest.raises(UserError, match="rank ≥ 1"):
        capacity_ranks("uniform", None, 5, 1, 4)  # 4 units for 5 blocks


# ----------------------------------------------------------------------------- the PEFT adapter


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainable_parameters_are_the_ranks_times_module_sizes(family):
    model = tiny_model(family, n_layers=4)
    ranks = [0, 3, 1, 2]
    names = target_names(model, "qv")
    modules = dict(model.named_modules())
    want = sum(r * sum(sum(weight_out_in(modules[n]).shape) for n in names[l]) for l, r in enumerate(ranks))
    peft_model = apply_lora(model, ranks, "qv", rank=2)
    assert trainable_parameters(peft_model) == want
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert all(f".{l}." not in n for n in adapted for l in (0,))  # block 0 carries no LoRA
    assert len(adapted) == sum(len(names[l]) for l in (1, 2, 3))


def test_fresh_adapter_leaves_logits_and_remove_restores_the_model():
    model = tiny_model("llama", n_layers=3)
    x = ids()
    before = logits(model, x)
    peft_model = apply_lora(model, [2, 0, 4], "qv", rank=2)
    assert torch.allclose(logits(peft_model, x), before)  # B = 0
    base = remove_lora(peft_model)
    assert not any("lora" in n for n, _ in base.named_modules())
    assert torch.equal(logits(base, x), before)


def test_lora_config_scales_alpha_with_rank():
    cfg = lora_config(tiny_model("llama", n_layers=3), [2, 0, 4], "qv", rank=2, lora_alpha=8.0)
    assert cfg.layers_to_transform == [0, 2]
    assert sorted(set(cfg.rank_pattern.values())) == [2, 4]
    assert all(cfg.alpha_pattern[k] == 4.0 * cfg.rank_pattern[k] for k in cfg.rank_pattern)  # alpha / r = 4


def test_finetune_command_saves_an_adapter_peft_loads(tasks, model_dir, tmp_path):
    from peft import PeftModel

    from layerif.models import load_model

    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5])
    save = tmp_path / "adapter"
    summary = ft_cmd.run(ft_cmd.FinetuneArgs(model=model_dir, scores=scores, allocation="top", blocks=1, rank=2,
                                             save=str(save), **FT))
    assert "allocation top:layerif" in summary and "blocks 1 at rank 2" in summary
    doc = json.loads((save / "allocation.json").read_text())
    assert doc["ranks"] == [0, 2, 0] and doc["adapted_blocks"] == [1] and doc["budget_rank_units"] == 2
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.png", "config.json", "report.md"} <= \
        {p.name for p in save.iterdir()}
    # the trained model's logits, recomputed by training again with the same seed, equal PEFT's reload
    lm = load_model(model_dir, device="cpu")
    x = ids()
    base = logits(lm.model, x)
    loaded = PeftModel.from_pretrained(lm.model, save)
    s = ft_cmd.setting(ft_cmd.FinetuneArgs(model=model_dir, scores=scores, **FT))
    trained, _ = ft_cmd.fit(s, ft_cmd.FinetuneArgs(model=model_dir, rank=2, **FT), np.array([0, 2, 0]), 0)
    assert torch.allclose(logits(loaded, x), logits(trained, x), atol=1e-6)
    assert not torch.allclose(logits(loaded, x), base)


def test_two_allocations_train_equal_parameter_counts(tasks, model_dir, tmp_path):
    args = dict(model=model_dir, blocks=2, rank=3, **FT)
    out = {}
    for allocation in ("first", "uniform"):
        save = tmp_path / allocation
        ft_cmd.run(ft_cmd.FinetuneArgs(allocation=allocation, save=str(save), **args))
        out[allocation] = json.loads((save / "allocation.json").read_text())
    assert out["first"]["ranks"] == [3, 3, 0] and out["uniform"]["ranks"] == [2, 2, 2]
    assert out["first"]["trainable_params"] == out["uniform"]["trainable_params"]


def test_random_with_the_same_draw_seed_picks_the_same_blocks(tasks, model_dir, tmp_path):
    args = dict(model=model_dir, allocation="random", blocks=2, rank=2, draw_seed=5, **FT)
    docs = []
    for i in range(2):
        ft_cmd.run(ft_cmd.FinetuneArgs(save=str(tmp_path / f"r{i}"), **args))
        docs.append(json.loads((tmp_path / f"r{i}" / "allocation.json").read_text()))
    assert docs[0]["ranks"] == docs[1]["ranks"]
    assert docs[0]["ranks"] == capacity_ranks("random", None, 3, 2, 2, draw_seed=5).tolist()


def test_gain_metric_reads_the_validation_file(tasks, model_dir, tmp_path):
    folder = write_validation(tmp_path / "val", [0.3, 0.1, 0.9])
    save = tmp_path / "g"
    ft_cmd.run(ft_cmd.FinetuneArgs(model=model_dir, allocation="top:gain", validation=folder, blocks=1, rank=2,
                                   save=str(save), **FT))
    assert json.loads((save / "allocation.json").read_text())["ranks"] == [0, 0, 2]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--allocation", "top"], "needs --scores"),
    (["finetune", "--allocation", "top:gain"], "needs --validation"),
    (["finetune", "--allocation", "middle"], "unknown allocation"),
    (["finetune", "--allocation", "last", "--blocks", "0"], "--blocks must be ≥ 1"),
    (["compare-finetune", "--allocations", "random,top:layerif"], "needs --scores"),
    (["compare-finetune", "--allocations", "random", "--draws", "0"], "--draws must be ≥ 1"),
])
def test_bad_input_is_one_line_before_the_model_loads(tasks, model_dir, tmp_path, monkeypatch, capsys, argv, message):
    import layerif.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(layerif.models, "load_model", no_load)
    out = ["--out", str(tmp_path / "o")] if argv[0].startswith("compare") else []
    assert main([*argv, "--model", model_dir, *out, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_compare_finetune_pools_random_draws_and_pairs(tasks, model_dir, tmp_path):
    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5])
    out = tmp_path / "cmp"
    summary = compare_finetune.run(compare_finetune.CompareFinetuneArgs(
        model=model_dir, scores=scores, allocations=["top:layerif", "random", "uniform", "last"], budgets=["1", "2"],
        seeds=["0", "1"], draws=3, rank=3, out=str(out), **FT))
    assert "Budget K = 1" in summary and "Budget K = 2" in summary
    rows = (out / "comparison.csv").read_text().splitlines()
    # 1 base + 2 budgets × (3 allocations × 2 seeds + 3 random draws)
    assert len(rows) == 1 + 1 + 2 * (3 * 2 + 3)
    md = (out / "comparison.md").read_text()
    assert "| top:layerif | random |" in md.replace(" (best baseline)", "")
    items = json.loads((out / "items.json").read_text())
    draws = [k for k in items if k.startswith("random|1|0|")]
    assert sorted(draws) == ["random|1|0|0", "random|1|0|2"]  # draws 0 and 2 train with seed 0 (d mod 2)
    pooled = compare_finetune.pooled([{"allocation": "random", "blocks": 1, "seed": "0", "draw": d,
                                       "accuracy": float(np.mean(items[f"random|1|0|{d}"]["accuracy"])),
                                       "exact_match": 0.0, "final_loss": 0.0, "trainable_params": 0, "seconds": 0.0,
                                       "items": items[f"random|1|0|{d}"]} for d in ("0", "2")])
    assert len(pooled) == 1
    want = [(a + b) / 2 for a, b in zip(items["random|1|0|0"]["accuracy"], items["random|1|0|2"]["accuracy"])]
    assert pooled[0]["items"]["accuracy"] == pytest.approx(want)
    params = {r.split(",")[0] + r.split(",")[1]: r.split(",")[7] for r in rows[2:]}
    assert len({v for k, v in params.items() if k.endswith("2")}) == 1  # equal budgets at K = 2
    assert (out / "accuracy_by_budget.png").exists() and (out / "report.md").exists()
