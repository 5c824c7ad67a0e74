"""Pruners, allocations on models, saving and the two commands, on tiny random-weight models."""

from __future__ import annotations

import copy
import csv
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import layerif.prune as P
import layerif.prune_allocation as PA
from layerif.measure import Sources, allocation_metric, dlp_medians, outlier_ratios
from layerif.prune_export import llmcompressor_recipe, save_pruned
from layerif.commands import compare_pruning as CP
from layerif.commands import prune as PC
from conftest import TINY_VOCAB, WORDS, make_tokenizer, tiny_model
from layerif.allocate import COMPARE_SPARSITY, linear_sparsity
from layerif.errors import UserError
from layerif.models import find_blocks, projections, weight_out_in


def calib(n: int = 6, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def masks(model) -> dict[str, torch.Tensor]:
    return {name: weight_out_in(mod) == 0 for name, (_, mod) in P.prunable_modules(model).items()}


# ----------------------------------------------------------------------------- pruners


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(P.PRUNERS))
def test_achieved_sparsity_is_the_allocation(family, method):
    model = tiny_model(family, n_layers=3)
    weights = P.prunable_params(model)
    ratios = linear_sparsity([0.1, 0.9, 0.4], 0.5, epsilon=0.3, weights=weights)
    targets = P.prune_model(model, ratios, method, calib())
    per_block, per_module = P.achieved_sparsity(model)
    mods = P.prunable_modules(model)
    min_in = min(weight_out_in(m).shape[1] for _, m in mods.values())
    for name, (_, mod) in mods.items():
        assert abs(per_module[name] - targets[name]) <= 1 / weight_out_in(mod).shape[1]  # one weight per row
    np.testing.assert_allclose(per_block, ratios, atol=1 / min_in)
    assert np.average(per_block, weights=weights) == pytest.approx(0.5, abs=1 / min_in)


def test_module_ratios_override_their_block():
    model = tiny_model("llama", n_layers=3)
    name = next(n for n in P.prunable_modules(model) if n.endswith("mlp.down_proj"))
    targets = P.prune_model(model, [0.5, 0.5, 0.5], "magnitude", module_ratios={name: 0.9})
    assert targets[name] == 0.9
    assert P.achieved_sparsity(model)[1][name] == pytest.approx(0.9, abs=1e-3)
    with pytest.raises(UserError, match="not a prunable module"):
        P.module_sparsity(model, [0.5] * 3, {"lm_head": 0.5})


def direct_wanda(model, windows, ratios) -> None:
    """Wanda computed directly: full-model forwards collect each block's inputs after the earlier blocks are pruned."""
    _, blocks = find_blocks(model)
    for l, block in enumerate(blocks):
        sq: dict[str, torch.Tensor] = {}

        def hook(rel):
            def f(mod, inputs, output):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                sq[rel] = sq.get(rel, 0) + (x * x).sum(0)

            return f

        handles = [m.register_forward_hook(hook(rel)) for rel, m in projections(block).items()]
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None])
        for h in handles:
            h.remove()
        for rel, mod in projections(block).items():
            W = weight_out_in(mod)
            metric = W.detach().abs() * sq[rel].sqrt()[None, :]
            k = int(round(ratios[l] * W.shape[1]))
            mask = torch.zeros_like(W, dtype=torch.bool).scatter_(1, torch.argsort(metric, dim=1)[:, :k], True)
            with torch.no_grad():
                W.masked_fill_(mask, 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_wanda_masks_equal_direct_computation(family):
    model = tiny_model(family, n_layers=3)
    ref = copy.deepcopy(model)
    windows, ratios = calib(), [0.3, 0.5, 0.65]
    P.prune_model(model, ratios, "wanda", windows)
    direct_wanda(ref, windows, ratios)
    got, want = masks(model), masks(ref)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_owl_outlier_ratios_equal_direct_computation():
    model = tiny_model("llama", n_layers=3)
    windows = calib()
    _, blocks = find_blocks(model)
    sq: dict[int, torch.Tensor] = {}
    mods = list(P.prunable_modules(model).values())

    def hook(i):
        def f(mod, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sq[i] = sq.get(i, 0) + (x * x).sum(0)

        return f

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(mods)]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    for h in handles:
        h.remove()
    want = []
    for l in range(len(blocks)):
        scores = torch.cat([(weight_out_in(m).detach().abs() * sq[i].sqrt()).flatten()
                            for i, (b, m) in enumerate(mods) if b == l])
        want.append(float((scores > 5 * scores.mean()).float().mean()))
    np.testing.assert_allclose(outlier_ratios(model, windows), want, rtol=1e-6)
    assert all(m.weight.ne(0).all() for _, m in mods)  # measuring does not prune
    medians = [float(torch.cat([(weight_out_in(m).detach().abs() * sq[i].sqrt()).flatten()
                                for i, (b, m) in enumerate(mods) if b == l]).median()) for l in range(len(blocks))]
    np.testing.assert_allclose(dlp_medians(model, windows), medians, rtol=1e-6)  # DLP: the same statistics
    np.testing.assert_allclose(allocation_metric("dlp", Sources(model, windows=windows)), medians, rtol=1e-6)


def layer_inputs(seed: int = 0, n: int = 2048, d: int = 96) -> torch.Tensor:
    """LLM-like layer inputs: correlated (a rank-16 part) with feature scales spread over orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g)
    return (Z[:, :16] @ torch.randn(16, d, generator=g) + 0.3 * Z) * torch.exp(torch.randn(d, generator=g))


def reference_sparsegpt(W, H, sparsity, blocksize, percdamp=0.01):
    """SparseGPT's ``fasterprune`` (unstructured), transcribed line by line from the reference code."""
    W = W.clone().float()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(W.shape[1])
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def test_sparsegpt_equals_the_reference_code():
    X = layer_inputs(1)
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    H = X.T @ X
    # the reference prunes int(size·s) + 1 weights per column block (its "<= threshold"), ours round(size·s):
    # with 48×32 blocks and size·s = 767.6 both prune 768
    s = 767.6 / (48 * 32)
    torch.testing.assert_close(P.sparsegpt_weight(W, H, s, block_size=32), reference_sparsegpt(W, H, s, 32))


@pytest.mark.parametrize("rows, cols, block", [(48, 96, 32), (37, 256, 128), (20, 64, 16)])
@pytest.mark.parametrize("seed", range(2))
def test_sparsegpt_at_several_ratios_is_the_reference_at_each(rows, cols, block, seed):
    """One sweep over stacked ratios (the level database's call) against the reference transcription run once
    per ratio, and bitwise against the single-ratio call; a dead input (zero Hessian row) included."""
    g = torch.Generator().manual_seed(seed)
    X = layer_inputs(seed, d=cols)
    X[:, 3] = 0
    W = torch.randn(rows, cols, generator=g)
    H = X.T @ X
    # ratios at which the reference's int(size·s) + 1 and our round(size·s) prune the same count per column block
    ratios = [(k - 0.4) / (rows * block) for k in (1, rows * block // 3, rows * block // 2, rows * block * 7 // 10)]
    stacked = P.sparsegpt_weights(W, H, ratios, block_size=block)
    for ratio, Ws in zip(ratios, stacked):
        torch.testing.assert_close(Ws, reference_sparsegpt(W, H, ratio, block))
        assert torch.equal(Ws, P.sparsegpt_weight(W, H, ratio, block_size=block))
    for nm in ((2, 4), (1, 4)):
        assert torch.equal(P.sparsegpt_weights(W, H, [0.1, 0.5], nm=nm, block_size=block)[1],
                           P.sparsegpt_weight(W, H, 0.5, nm=nm, block_size=block))


def test_wanda_at_several_ratios_is_each_ratio_alone():
    """The level database's call (one score, one sort) against Wanda's mask computed afresh at each ratio."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g)
    stats = P.InputStats(torch.nn.Linear(40, 24), hessian=False)
    stats.sq = torch.randint(0, 3, (40,), generator=g).float()  # ties in the score
    ratios = [0.0, 0.1, 0.45, 0.5, 0.9]
    masks = P.PRUNERS["wanda"].prune_levels(W, ratios, stats, P.PruneSettings())
    for ratio, mask in zip(ratios, masks):
        score = P.wanda_score(W, stats.sq)
        expected = torch.zeros_like(mask)
        k = int(round(ratio * 40))
        expected.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
        assert torch.equal(mask, expected), ratio


def test_lowest_mask_is_a_stable_sorts_choice():
    """Selection (k-th value, then the first ties by position) against the plain stable sort, with many ties and NaN."""
    g = torch.Generator().manual_seed(0)
    for score in (torch.randint(0, 4, (7, 9), generator=g).float(), torch.randn(5, 6, generator=g),
                  torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 2.0]])):
        for ratio in (0.0, 0.1, 0.5, 0.77, 0.9, 1.0):
            k = int(round(ratio * score.numel()))
            expected = torch.zeros(score.numel(), dtype=torch.bool)
            expected[torch.sort(score.flatten(), stable=True).indices[:k]] = True
            assert torch.equal(P.lowest_mask(score, ratio), expected.view_as(score)), (score, ratio)


@pytest.mark.parametrize("seed", range(3))
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(seed):
    X = layer_inputs(seed)
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(seed))
    H = X.T @ X

    def err(V):
        return float(((X @ (W - V).T) ** 2).sum())

    assert torch.equal(P.sparsegpt_weight(W, H, 0.0), W)
    for ratio in (0.3, 0.5, 0.7):
        magnitude = W.masked_fill(P.lowest_mask(W.abs(), ratio), 0)
        wanda = W.masked_fill(P.row_mask(P.wanda_score(W, torch.diag(H)), ratio), 0)
        for block in (128, 32):
            Ws = P.sparsegpt_weight(W, H, ratio, block_size=block)
            assert float((Ws == 0).float().mean()) == pytest.approx(ratio, abs=1 / 96)
            assert err(Ws) < 0.5 * err(magnitude)
            assert err(Ws) < err(wanda)
    Ws = P.sparsegpt_weight(W, H, 0.5, nm=(2, 4))
    assert err(Ws) < err(W.masked_fill(P.nm_mask(W.abs(), 2, 4), 0))


@pytest.mark.parametrize("method", list(P.PRUNERS))
def test_nm_pruning_zeroes_n_of_every_m(method):
    model = tiny_model("llama", n_layers=2)
    P.prune_model(model, [0.5, 0.5], method, calib(), nm=(2, 4))
    for name, mask in masks(model).items():
        counts = mask.view(mask.shape[0], -1, 4).sum(-1)
        assert torch.all(counts == 2), name


def test_mask_helpers():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    assert P.row_mask(s, 0.5).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert P.lowest_mask(s, 0.25).tolist() == [[False, True, False, False], [True, False, False, False]]
    assert P.nm_mask(s, 1, 2).tolist() == [[False, True, False, True], [True, False, True, False]]
    assert P.parse_nm("2:4") == (2, 4) and P.parse_nm(None) is None
    for bad in ("4:2", "2:2", "0:4", "2-4", "a:b"):
        with pytest.raises(UserError):
            P.parse_nm(bad)
    with pytest.raises(UserError, match="divisible"):
        P.nm_mask(torch.rand(2, 6), 2, 4)


# ----------------------------------------------------------------------------- saving and export


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_model_reloads_with_identical_logits(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_model(family, n_layers=3), make_tokenizer()
    P.prune_model(model, [0.4, 0.5, 0.6], "sparsegpt", calib())
    dest = save_pruned(model, tok, str(tmp_path / "pruned"), {"layers": [0, 1, 2]}, recipe="a: 1\n")
    assert {"model.safetensors", "allocation.json", "recipe.yaml", "config.json"} <= {p.name for p in dest.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(dest).eval()
    x = calib(2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)
    assert AutoTokenizer.from_pretrained(dest)("the cat")["input_ids"] == tok("the cat")["input_ids"]
    # an earlier pruned model is replaced; any other non-empty folder is refused
    with pytest.raises(UserError, match="pass --overwrite"):
        save_pruned(model, tok, str(dest), {"layers": [0, 1, 2], "again": True})
    save_pruned(model, tok, str(dest), {"layers": [0, 1, 2], "again": True}, overwrite=True)
    assert json.loads((dest / "allocation.json").read_text())["again"] is True
    assert not (dest / "recipe.yaml").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier pruned model"):
        save_pruned(model, tok, str(other), {})
    assert (other / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "pruned"]  # no temporary folders left


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_llmcompressor_recipe(family, method):
    model = tiny_model(family, n_layers=3)
    prefix, blocks = find_blocks(model)
    text = llmcompressor_recipe(method, [0.4, 0.5, 0.6], prefix, damping=0.01, block_size=128)
    mod_name = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}[method]
    mod = yaml.safe_load(text)["sparsity_stage"]["sparsity_modifiers"][mod_name]
    assert mod["sparsity"] == [0.4, 0.5, 0.6]
    assert mod["mask_structure"] == "0:0"
    pattern = mod["targets"][0].removeprefix("re:")
    matched = [n for n, _ in model.named_modules() if re.match(pattern, n)]
    assert matched == [f"{prefix}.{i}" for i in range(len(blocks))]  # one sparsity per block, in order
    assert ("dampening_frac" in mod) == (method == "sparsegpt")
    nm = yaml.safe_load(llmcompressor_recipe(method, [0.5] * 3, prefix, nm=(2, 4)))
    assert nm["sparsity_stage"]["sparsity_modifiers"][mod_name]["mask_structure"] == "2:4"
    assert llmcompressor_recipe("magnitude", [0.5] * 3, prefix) is None


# ----------------------------------------------------------------------------- the commands


def fake_corpus_module() -> types.ModuleType:
    """A stand-in for layerif.corpus with its documented signatures, over the tiny tokenizer's words."""
    mod = types.ModuleType("layerif.corpus")
    rng = np.random.default_rng(0)
    default = " ".join(rng.choice(WORDS, size=4000))

    def load_text(path=None):
        return default if path is None else Path(path).read_text(encoding="utf-8")

    def split_text(text):
        return text[: len(text) // 2], text[len(text) // 2 :]

    def text_windows(tokenizer, text, n_windows, seqlen, seed):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < seqlen:
            raise UserError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seqlen}")
        starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, size=n_windows)
        return torch.tensor([ids[s : s + seqlen] for s in starts])

    mod.load_text, mod.split_text, mod.text_windows = load_text, split_text, text_windows
    return mod


def write_task(path: Path) -> str:
    """A multiple-choice task file (JSONL) over the tiny tokenizer's words."""
    capitals = [("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid")]
    records = [{"prompt": f"the capital of {country} is", "completion": f" {city}",
                "options": [f" {c}" for _, c in capitals], "answer": i} for i, (country, city) in enumerate(capitals)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def stand_ins(monkeypatch):
    monkeypatch.setitem(sys.modules, "layerif.corpus", fake_corpus_module())


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", n_layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_scores(path: Path, score: list[float]) -> str:
    path.write_text(json.dumps({"model": "tiny", "task": "toy", "target": "attn", "estimator": "datainf",
                                "layers": list(range(len(score))), "score": score}))
    return str(path)


def prune_args(model_dir, tmp_path, **kw) -> PC.PruneArgs:
    base = dict(model=str(model_dir), device="cpu", scores=write_scores(tmp_path / "scores.json", [1.0, 5.0, 2.0]),
                sparsity=0.5, n_calib=4, seqlen=16)
    base.update(kw)
    return PC.PruneArgs(**base)


def test_prune_command(stand_ins, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    summary = PC.run(prune_args(model_dir, tmp_path, save=str(out), eval_windows=2))
    assert "achieved" in summary and "perplexity" in summary
    doc = json.loads((out / "allocation.json").read_text())
    assert {"layers", "sparsity", "achieved", "modules", "args"} <= doc.keys()
    assert doc["layers"] == [0, 1, 2]
    assert np.argmax(doc["sparsity"]) == 1  # the highest score gets the most sparsity
    weights = np.asarray(doc["prunable_params"])
    assert np.average(doc["sparsity"], weights=weights) == pytest.approx(0.5)
    assert doc["mean_achieved"] == pytest.approx(0.5, abs=1 / 32)
    assert all({"target", "achieved"} == set(v) for v in doc["modules"].values())
    assert doc["args"]["method"] == "wanda" and doc["args"]["allocation"] == "layerif"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(P.achieved_sparsity(loaded)[0], doc["achieved"])
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["sparsity_stage"]["sparsity_modifiers"]["WandaPruningModifier"]["sparsity"] == pytest.approx(
        doc["sparsity"], abs=1e-6)
    # reversed: the highest score now gets the least sparsity
    rev = tmp_path / "rev"
    PC.run(prune_args(model_dir, tmp_path, save=str(rev), reverse=True, smooth=False))
    assert np.argmin(json.loads((rev / "allocation.json").read_text())["sparsity"]) == 1


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("allocation", ["atp", "dlp"])
def test_prune_command_atp_and_dlp(stand_ins, model_dir, tmp_path, allocation, method):
    """ATP (depth only) and DLP (median Wanda scores, calibrated) with every pruner: the map of the library."""
    from layerif.allocate import atp_sparsity, dlp_sparsity

    out = tmp_path / allocation
    PC.run(prune_args(model_dir, tmp_path, scores=None, allocation=allocation, method=method, save=str(out),
                      atp_step=0.1, dlp_alpha=0.1))
    doc = json.loads((out / "allocation.json").read_text())
    w = doc["prunable_params"]
    assert np.average(doc["sparsity"], weights=w) == pytest.approx(0.5)
    assert np.average(doc["achieved"], weights=w) == pytest.approx(0.5, abs=1 / 32)
    if allocation == "atp":
        assert doc["metric"] is None
        np.testing.assert_allclose(doc["sparsity"], [0.4, 0.5, 0.6])
    else:
        np.testing.assert_allclose(doc["sparsity"], dlp_sparsity(doc["metric"], 0.5, 0.1, w))


@pytest.mark.parametrize("allocation", ["uniform", "owl", "alpha"])
def test_prune_command_baseline_allocations(stand_ins, model_dir, tmp_path, allocation):
    out = tmp_path / allocation
    PC.run(prune_args(model_dir, tmp_path, scores=None, allocation=allocation, method="magnitude", save=str(out)))
    doc = json.loads((out / "allocation.json").read_text())
    assert np.average(doc["sparsity"], weights=doc["prunable_params"]) == pytest.approx(0.5)
    assert (doc["metric"] is None) == (allocation == "uniform")
    assert not (out / "recipe.yaml").exists()  # llm-compressor has no one-shot magnitude modifier


def test_prune_command_task_accuracy(stand_ins, model_dir, tmp_path):
    """prune --task FILE: the accuracy of the pruned model, as mc_accuracy measures it on the saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerif.evaluate import mc_accuracy
    from layerif.tasks import test_records

    out, task = tmp_path / "pruned", write_task(tmp_path / "task.jsonl")
    summary = PC.run(prune_args(model_dir, tmp_path, task=task, save=str(out)))
    doc = json.loads((out / "allocation.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert doc["accuracy"] == mc_accuracy(reloaded, AutoTokenizer.from_pretrained(out), test_records(task))
    assert f"accuracy on {task} (4 items" in summary


def test_prune_command_nm(stand_ins, model_dir, tmp_path):
    out = tmp_path / "nm"
    PC.run(prune_args(model_dir, tmp_path, allocation="uniform", method="sparsegpt", nm="2:4", save=str(out)))
    doc = json.loads((out / "allocation.json").read_text())
    assert doc["achieved"] == pytest.approx([0.5] * 3)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sparsity=1.0), "outside \\[0, 1\\)"),
        (dict(sparsity=-0.1), "outside \\[0, 1\\)"),
        (dict(epsilon=1.5), "epsilon"),
        (dict(epsilon=-0.5), "epsilon"),
        (dict(method="pca"), "unknown pruning method"),
        (dict(allocation="random"), "unknown allocation"),
        (dict(scores=None), "needs --scores"),
        (dict(nm="2:4"), "use --allocation uniform"),
        (dict(nm="2:4", allocation="atp"), "use --allocation uniform"),
        (dict(nm="2:4", allocation="dlp"), "use --allocation uniform"),
        (dict(allocation="atp", atp_step=-0.1), "--atp-step"),
        (dict(allocation="dlp", dlp_alpha=0.5), "--dlp-alpha"),
        (dict(allocation="atp", smooth=True), "--smooth applies"),
        (dict(nm="2:4", allocation="uniform", sparsity=0.6), "means sparsity 0.5"),
        (dict(nm="4:2", allocation="uniform"), "not N:M"),
        (dict(allocation="uniform", reverse=True), "--reverse"),
        (dict(n_calib=0), "--n-calib"),
        (dict(seqlen=1), "--seqlen"),
        (dict(damping=0.0), "--damping"),
        (dict(block_size=0), "--block-size"),
        (dict(calib="SHORT"), "fewer than one window"),
        (dict(scores="FIVE"), "5 blocks"),
        (dict(save="FOREIGN"), "not an earlier pruned model"),
        (dict(task="no-such-task"), "unknown task"),
        (dict(task="BADTASK"), "needs prompt"),
        (dict(task="capitals", task_items=0), "--task-items"),
    ],
)
def test_prune_bad_input(stand_ins, model_dir, tmp_path, kw, message):
    if kw.get("calib") == "SHORT":
        kw["calib"] = str(tmp_path / "short.txt")
        Path(kw["calib"]).write_text("the cat " * 4)
    if kw.get("scores") == "FIVE":
        kw["scores"] = write_scores(tmp_path / "five.json", [1.0, 2.0, 3.0, 4.0, 5.0])
    if kw.get("save") == "FOREIGN":
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "data.csv").write_text("x")
        kw["save"] = str(tmp_path / "foreign")
    if kw.get("task") == "BADTASK":
        kw["task"] = str(tmp_path / "bad.jsonl")
        Path(kw["task"]).write_text(json.dumps({"prompt": "the cat", "options": [" a", " b"], "answer": 2}) + "\n")
    with pytest.raises(UserError, match=message):
        PC.run(prune_args(model_dir, tmp_path, **kw))


def test_short_text_with_the_real_corpus(model_dir, tmp_path):
    pytest.importorskip("layerif.corpus")
    short = tmp_path / "short.txt"
    short.write_text("the cat is in the house . " * 4)
    with pytest.raises(UserError):
        PC.run(prune_args(model_dir, tmp_path, calib=str(short), seqlen=64))


def test_cli_options_build_the_args():
    import argparse

    from layerif.cli import add_dataclass_arguments, build_args

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, PC.PruneArgs)
    args = build_args(PC.PruneArgs, parser.parse_args(["--sparsity", "0.6", "--method", "sparsegpt", "--reverse",
                                                     "--nm", "2:4", "--n-calib", "8"]))
    assert (args.sparsity, args.method, args.reverse, args.nm, args.n_calib) == (0.6, "sparsegpt", True, "2:4", 8)
    args = build_args(PC.PruneArgs, parser.parse_args(["--allocation", "atp", "--atp-step", "0.01",
                                                     "--dlp-alpha", "0.2"]))
    assert (args.allocation, args.atp_step, args.dlp_alpha) == ("atp", 0.01, 0.2)
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, CP.CompareArgs)
    args = build_args(CP.CompareArgs, parser.parse_args(["--sparsities", "0.5,0.7", "--seeds", "1,2,3",
                                                       "--allocations", "uniform,layerif"]))
    assert (args.sparsities, args.seeds, args.allocations) == (["0.5", "0.7"], ["1", "2", "3"], ["uniform", "layerif"])


def compare_args(model_dir, tmp_path, **kw) -> CP.CompareArgs:
    base = dict(model=str(model_dir), device="cpu", scores=write_scores(tmp_path / "scores.json", [1.0, 5.0, 2.0]),
                methods=["magnitude", "wanda"], sparsities=["0.5"], seeds=["0", "1", "2"], n_calib=3, seqlen=16,
                eval_windows=2, task=write_task(tmp_path / "task.jsonl"), task_items=4, out=str(tmp_path / "cmp"))
    base.update(kw)
    return CP.CompareArgs(**base)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_compare_pruning(stand_ins, model_dir, tmp_path, monkeypatch):
    args = compare_args(model_dir, tmp_path)
    summary = CP.run(args)
    out = Path(args.out)
    rows = read_csv(out / "comparison.csv")
    assert len(rows) == 1 + 5 * 2 * 3  # dense + allocations × methods × seeds
    assert {r["allocation"] for r in rows} == {"dense", *COMPARE_SPARSITY}
    for r in rows:
        if r["allocation"] != "dense":
            assert float(r["achieved"]) == pytest.approx(0.5, abs=1 / 32)
            assert float(r["perplexity"]) > 1 and 0 <= float(r["accuracy"]) <= 1
    md = (out / "comparison.md").read_text()
    assert "## wanda" in md and "## magnitude" in md and "±" in md and "layerif-reversed" in md
    assert "- task: " + args.task in md
    assert (out / "comparison.png").stat().st_size > 0
    assert "comparison.csv" in summary and "## comparison.md" in (out / "report.md").read_text()
    (tmp_path / "before.md").write_text(md)
    # resume: nothing left to run
    monkeypatch.setattr(CP, "prune_model", lambda *a, **k: pytest.fail("resume re-ran a finished run"))
    CP.run(compare_args(model_dir, tmp_path, resume=True))
    assert len(read_csv(out / "comparison.csv")) == len(rows)
    with pytest.raises(UserError, match="other options"):
        CP.run(compare_args(model_dir, tmp_path, resume=True, epsilon=0.3))
    # resume with other --pairs: nothing re-run, the asked pair is in the paired table
    CP.run(compare_args(model_dir, tmp_path, resume=True, pairs=["owl:alpha"]))
    md = (out / "comparison.md").read_text()
    assert "| wanda 0.5 | perplexity (mean NLL, nats) | owl | alpha |" in md
    assert "| wanda 0.5 | perplexity (mean NLL, nats) | owl | alpha" not in (tmp_path / "before.md").read_text()
    for bad, why in ((["owl"], "not ALLOCATION:REFERENCE"), (["owl:owl"], "two different"),
                     (["owl:atp"], "'atp' is not among --allocations")):
        with pytest.raises(UserError, match=why):
            CP.run(compare_args(model_dir, tmp_path, resume=True, pairs=bad))
    # resume with a larger grid: only the new runs are made, every earlier row is kept
    made = []
    monkeypatch.setattr(CP, "prune_model", lambda *a, **k: made.append(a[1]))
    CP.run(compare_args(model_dir, tmp_path, resume=True, seeds=["0", "3"], methods=["wanda"]))
    grown = read_csv(out / "comparison.csv")
    assert len(made) == 5 and len(grown) == len(rows) + 5  # the 5 allocations of wanda, seed 3
    assert {r["seed"] for r in grown} == {"-", "0", "1", "2", "3"}
    assert "- seeds: 0, 1, 2, 3" in (out / "comparison.md").read_text()


def test_compare_pruning_smooths_every_allocation_with_a_metric(stand_ins, model_dir, tmp_path, monkeypatch):
    """--smooth reaches the map of every allocation with a per-block metric, none without one, and the notes say so."""
    seen: dict[str, bool] = {}
    real = PA.allocate_sparsity

    def spy(label, metric, target, weights, options, *a, **k):
        seen[label] = options.smooth
        return real(label, metric, target, weights, options, *a, **k)

    monkeypatch.setattr(PA, "allocate_sparsity", spy)
    labels = ["uniform", "atp", "owl", "dlp", "alpha", "layerif", "layerif-reversed"]
    CP.run(compare_args(model_dir, tmp_path, allocations=labels, methods=["magnitude"], seeds=["0"], smooth=True))
    assert seen == {"uniform": False, "atp": False, "owl": True, "dlp": True, "alpha": True, "layerif": True,
                    "layerif-reversed": True}
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "- smooth: Savitzky-Golay (7, 3) on the metric of every allocation" in md
    assert "uniform, atp have none" in md


def test_late_error_keeps_the_finished_rows_for_resume(stand_ins, model_dir, tmp_path, monkeypatch):
    """An error after the first pruned row keeps the rows in the staging cache (--out untouched, the message
    says how to resume); a --resume run, with --out spelled ./X, makes only the runs left."""
    from layerif import io as lio

    real, made = CP.prune_model, []

    def failing(*a, **k):
        if made:
            raise UserError("injected late failure")
        made.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(CP, "prune_model", failing)
    args = compare_args(model_dir, tmp_path, methods=["magnitude"], seeds=["0"], allocations=["uniform", "owl"])
    with pytest.raises(UserError, match="injected late failure; finished work kept in .*rerun with --resume"):
        CP.run(args)
    out = Path(args.out)
    assert not out.exists()
    cache = lio.sibling(out, "partial") / lio.CACHE_DIR
    assert [r["allocation"] for r in read_csv(cache / "comparison.csv")] == ["dense", "uniform"]
    # a refused resume (other options) keeps the cache too
    with pytest.raises(UserError, match="other options"):
        CP.run(compare_args(model_dir, tmp_path, methods=["magnitude"], seeds=["0"], allocations=["uniform", "owl"],
                            resume=True, epsilon=0.3))
    assert len(read_csv(cache / "comparison.csv")) == 2
    made.clear()
    monkeypatch.setattr(CP, "prune_model", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    monkeypatch.chdir(tmp_path)
    CP.run(compare_args(model_dir, tmp_path, methods=["magnitude"], seeds=["0"], allocations=["uniform", "owl"],
                        resume=True, out="./cmp"))
    assert len(made) == 1  # only owl was left
    assert [r["allocation"] for r in read_csv(out / "comparison.csv")] == ["dense", "uniform", "owl"]
    assert not lio.sibling(out, "partial").exists()


def test_search_bounds_are_checked_against_every_sparsity_before_the_model(stand_ins, model_dir, tmp_path,
                                                                          monkeypatch):
    from layerif import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    with pytest.raises(UserError, match=r"low \(0.65\) ≤ target \(0.6\)"):
        CP.run(compare_args(model_dir, tmp_path, sparsities=["0.7", "0.6"], search_low=0.65,
                            allocations=["uniform", "search-uniform"]))
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sparsities=["0.5", "1.0"]), "outside \\[0, 1\\)"),
        (dict(sparsities=["half"]), "--sparsities"),
        (dict(allocations=["uniform", "random"]), "unknown allocation"),
        (dict(methods=["pca"]), "unknown pruning method"),
        (dict(epsilon=2.0), "epsilon"),
        (dict(scores=None), "need --scores"),
        (dict(task_items=0), "--task-items"),
        (dict(task="nope"), "unknown task"),
    ],
)
def test_compare_bad_input(stand_ins, model_dir, tmp_path, kw, message):
    with pytest.raises(UserError, match=message):
        CP.run(compare_args(model_dir, tmp_path, **kw))


def test_comparison_summary_counts_wins_and_says_who_won():
    def row(method, sp, alloc, seed, ppl, acc):
        return {"method": method, "sparsity": sp, "allocation": alloc, "seed": seed, "achieved": sp,
                "perplexity": ppl, "accuracy": acc}

    rows = [row("dense", 0.0, "dense", "-", 10.0, 0.9)]
    # wanda 0.5: uniform best accuracy (mean 0.55 vs 0.5), layerif best perplexity; wanda 0.6: a tie in accuracy
    rows += [row("wanda", 0.5, "uniform", s, 30.0, a) for s, a in (("0", 0.5), ("1", 0.6))]
    rows += [row("wanda", 0.5, "layerif", s, 20.0, 0.5) for s in ("0", "1")]
    rows += [row("wanda", 0.6, "uniform", s, 50.0, 0.4) for s in ("0", "1")]
    rows += [row("wanda", 0.6, "layerif", s, 60.0, 0.4) for s in ("0", "1")]
    md = CP.markdown(rows, {"model": "tiny"})
    assert "| uniform | 2 | 1 |" in md and "| layerif | 1 | 1 |" in md
    assert "LayerIF does not win: uniform has the best accuracy most often (2 of 2; LayerIF 1)." in md


def test_a_new_allocation_is_one_registration(stand_ins, model_dir, tmp_path, monkeypatch):
    """An allocation added in one place (here: random ratios, fitted to the target) works in prune and compare-pruning."""
    from layerif import allocate

    rule = allocate.Allocation("random", None, sparsity=lambda m, target, w, o, rev: allocate.fit_weighted_mean(
        np.random.default_rng(0).random(len(w)), target, w))
    monkeypatch.setitem(allocate.ALLOCATIONS, "random", rule)
    PC.run(prune_args(model_dir, tmp_path, allocation="random", save=str(tmp_path / "pruned")))
    doc = json.loads((tmp_path / "pruned" / "allocation.json").read_text())
    assert np.average(doc["sparsity"], weights=doc["prunable_params"]) == pytest.approx(0.5)
    CP.run(compare_args(model_dir, tmp_path, allocations=["uniform", "random"], methods=["magnitude"], seeds=["0"]))
    assert {r["allocation"] for r in read_csv(tmp_path / "cmp" / "comparison.csv")} == {"dense", "uniform", "random"}


def test_a_new_pruner_is_one_registration(stand_ins, model_dir, tmp_path, monkeypatch):
    """A pruner added in one place (here: each row drops the inputs of least energy Σ x_j², as Wanda without |W|)
    works in prune with the recipe export, the level database (the sensitivity allocation) and validate's pruning
    sensitivity; its capabilities come from its record, not from its name."""
    from layerif.data import encode_split
    from layerif.validate import prune_sensitivity

    monkeypatch.setattr(P, "PRUNERS", dict(P.PRUNERS))  # the registration ends with this test
    P.register(P.Pruner("smallest-input", lambda W, ratio, stats, s: P.row_mask(stats.sq.expand_as(W), ratio),
                        needs_calibration=True, modifier="SmallestInputModifier"))

    out = tmp_path / "pruned"
    PC.run(prune_args(model_dir, tmp_path, method="smallest-input", allocation="sensitivity", search_windows=2,
                      search_dir=str(tmp_path / "s"), save=str(out)))
    doc = json.loads((out / "allocation.json").read_text())
    assert doc["method"] == "smallest-input" and doc["mean_achieved"] == pytest.approx(0.5, abs=1 / 32)
    assert np.argmin(doc["sparsity"]) == np.argmax(doc["sensitivity"]["kl"])  # measured through the level database
    assert list((tmp_path / "s" / "levels").glob("smallest-input-*/b*.safetensors"))
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())["sparsity_stage"]["sparsity_modifiers"]
    assert recipe["SmallestInputModifier"]["sparsity"] == pytest.approx(doc["sparsity"], abs=1e-6)

    model, tok = tiny_model("llama", n_layers=3), make_tokenizer()
    val = encode_split(tok, [{"prompt": "the capital of spain is", "completion": " madrid"}], "val")[0]
    sens = prune_sensitivity(model, tok, [0, 2], val, "smallest-input", 0.5, calib())
    assert all(r != 0 for r in sens["loss_rise"])
    with pytest.raises(ValueError, match="needs calibration"):  # the record says so: no silent fallback
        P.prune_model(model, [0.5] * 3, "smallest-input")
    mod = next(iter(P.prunable_modules(model).values()))[1]
    with pytest.raises(UserError, match="^unknown pruning method 'pca' \\(use magnitude, wanda, sparsegpt, smallest"):
        P.prune_module(mod, "pca", 0.5)  # once the else branch of SparseGPT


def test_prune_with_calib_c4_and_a_local_eval_file(stand_ins, model_dir, tmp_path, monkeypatch):
    """--calib c4 (the hub call answered by a local stand-in of C4's layout) and --eval a JSONL file with another
    text field; allocation.json records the data and the calibration size (given here, so 'given')."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for _ in range(30)]
    calls = []

    def load_dataset(path, *args, **kwargs):
        if path != "allenai/c4":  # the local JSONL builder is the real one
            return real(path, *args, **kwargs)
        calls.append(kwargs["data_files"])
        return datasets.Dataset.from_dict({"text": docs, "url": ["u"] * len(docs)})

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"body": " ".join(rng.choice(WORDS, size=200))}) + "\n" for _ in range(4)))
    out = tmp_path / "pruned"
    PC.run(prune_args(model_dir, tmp_path, calib="c4", eval=str(held_out), text_field="body", eval_windows=2,
                      save=str(out)))
    assert calls and all(c == {"train": "en/c4-train.00000-of-01024.json.gz"} for c in calls)
    doc = json.loads((out / "allocation.json").read_text())
    assert doc["calibration"] == {"calib": "c4", "eval": str(held_out), "n_calib": 4, "seqlen": 16, "size": "given"}
    assert np.isfinite(doc["perplexity"])
    with pytest.raises(UserError, match="has no field 'text'"):  # before the model loads
        PC.run(prune_args(tmp_path / "no-model", tmp_path, eval=str(held_out), eval_windows=2))


def test_prune_default_calibration_size_is_recorded(stand_ins, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "pruned"
    monkeypatch.setattr(PC.PruningOptions, "CPU_CALIBRATION", (3, 16))
    PC.run(prune_args(model_dir, tmp_path, n_calib=None, seqlen=None, save=str(out)))
    doc = json.loads((out / "allocation.json").read_text())
    assert (doc["calibration"]["n_calib"], doc["calibration"]["seqlen"], doc["calibration"]["size"]) == \
        (3, 16, "cpu default")
