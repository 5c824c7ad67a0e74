"""The Kronfluence peer (EK-FAC) on layerif's loss and targets: identity = grad-dot, same damping, model untouched."""

from __future__ import annotations

import pytest
import torch

from layerif import ekfac
from layerif.models import select_targets
from helpers import compute
from test_streaming import _setup

pytestmark = pytest.mark.skipif(not ekfac.available(), reason=f"Kronfluence not installed: {ekfac.INSTALL}")


@pytest.mark.parametrize("per_val", [False, True])
def test_identity_strategy_equals_grad_dot(per_val):
    lm, train, val = _setup("llama", seed=1, bias=True)
    targets = select_targets(lm.model, "attn")
    got, _, _ = ekfac.kronfluence_influence(lm.model, targets, train, val, lm.tokenizer.pad_token_id, "identity",
                                         per_val=per_val, batch_size=3)
    ref = compute(lm, train, val, "attn", "grad-dot", per_val=per_val, batch_size=4, mode="materialized")
    for t in targets:
        want = ref.influence[t.block]
        blocks = sum(got[s.name] for s in targets if s.block == t.block)
        torch.testing.assert_close(blocks if per_val else blocks[0], want, rtol=1e-5,
                                   atol=1e-6 * float(want.abs().max()))


def test_ekfac_damping_is_lambda_and_large_damping_tends_to_grad_dot():
    lm, train, val = _setup("llama", seed=2)
    targets = select_targets(lm.model, "mlp")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    kinds = [type(t.module) for t in targets]
    inf, lam, passes = ekfac.kronfluence_influence(lm.model, targets, train, val, lm.tokenizer.pad_token_id, "ekfac",
                                           per_val=True, batch_size=4)
    ref = compute(lm, train, val, "mlp", "exact", per_val=True, batch_size=4, mode="materialized")
    for t in targets:
        assert lam[t.name] == pytest.approx(ref.lambdas[t.name], rel=1e-5)
        assert inf[t.name].shape == (len(val), len(train)) and torch.isfinite(inf[t.name]).all()
    # The model is as it was: same modules, same weights, same requires_grad.
    assert [type(t.module) for t in select_targets(lm.model, "mlp")] == kinds
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in lm.model.parameters())
    # Damping far above the Fisher's eigenvalues: (F + lambda)^-1 -> 1 / lambda, so lambda * I -> -g . v.
    big, lam_big, _ = ekfac.kronfluence_influence(lm.model, targets, train, val, lm.tokenizer.pad_token_id, "ekfac",
                                               damping_scale=1e6, per_val=True, batch_size=4)
    gd, _, _ = ekfac.kronfluence_influence(lm.model, targets, train, val, lm.tokenizer.pad_token_id, "identity",
                                        per_val=True, batch_size=4)
    for t in targets:
        torch.testing.assert_close(big[t.name] * lam_big[t.name], gd[t.name], rtol=1e-4,
                                   atol=1e-4 * float(gd[t.name].abs().max()))


def test_estimator_ekfac_through_compute():
    lm, train, val = _setup("llama", seed=3)
    targets = select_targets(lm.model, "attn")
    res = compute(lm, train, val, "attn", "ekfac", per_val=True, batch_size=4)
    inf, lam, passes = ekfac.kronfluence_influence(lm.model, targets, train, val, lm.tokenizer.pad_token_id, "ekfac",
                                                   per_val=True, batch_size=4)
    assert res.meta["mode"] == "ekfac" and res.passes == passes == 4 and res.lambdas == pytest.approx(lam)
    for l in res.layers:
        want = sum(inf[t.name] for t in targets if t.block == l)
        torch.testing.assert_close(res.influence[l], want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
    ref = compute(lm, train, val, "attn", "grad-dot", batch_size=4)
    torch.testing.assert_close(res.train_loss, ref.train_loss, rtol=1e-5, atol=1e-7)


def test_ekfac_without_kronfluence_says_how_to_install(monkeypatch):
    from layerif.errors import UserError

    lm, train, val = _setup("llama", seed=3)
    monkeypatch.setattr(ekfac, "available", lambda: False)
    with pytest.raises(UserError, match="pip install --no-deps kronfluence"):
        compute(lm, train, val, "attn", "ekfac", batch_size=4)


def test_compare_estimators_includes_ekfac_when_installed(tiny_model_dir, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from layerif.cli import main
    from layerif.data import encode_split
    from layerif.models import LoadedModel, load_model

    texts = ["the capital of france is paris", "one plus two equals three", "the cat is in the house",
             "berlin is the capital of germany", "four plus five equals nine"]
    train, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    val.write_text(json.dumps({"text": "rome is the capital of italy"}) + "\n")
    out = tmp_path / "est"
    assert main(["compare-estimators", "--model", str(tiny_model_dir), "--train", str(train), "--val", str(val),
                 "--estimators", "exact,grad-dot", "--batch-size", "3", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    doc = json.loads((out / "estimators.json").read_text())
    assert doc["estimators"] == ["exact", "grad-dot", "ekfac"] and len(doc["pairs"]) == 3
    lm = load_model(str(tiny_model_dir), device="cpu")
    tr = encode_split(lm.tokenizer, [{"text": t} for t in texts], "train")[0]
    va = encode_split(lm.tokenizer, [{"text": "rome is the capital of italy"}], "validation")[0]
    ref = compute(LoadedModel(lm.model, lm.tokenizer, lm.name), tr, va, "attn", "ekfac", batch_size=3)
    got = load_file(out / "influence.safetensors")
    for l in ref.layers:
        torch.testing.assert_close(got[f"ekfac.layer.{l}"].double(), ref.influence[l], rtol=1e-5,
                                   atol=1e-6 * float(ref.influence[l].abs().max()))
