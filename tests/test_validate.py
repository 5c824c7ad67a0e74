"""``layerif validate`` against independent computations: plain loops, a hand-written Adam, whole-model pruning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from scipy.stats import spearmanr

from conftest import make_tokenizer, tiny_model
from layerif import validate as V
from layerif.cli import main
from layerif.data import encode_split
from layerif.evaluate import mc_accuracy
from layerif.models import select_targets
from layerif.prune import prune_model
from layerif.stability import spearman_interval
from layerif.train import TrainConfig

TRAIN = [("the capital of france is", " paris"), ("one plus two equals", " three"), ("the cat was in the", " house"),
         ("four plus five equals", " nine"), ("is this the answer ?", " yes"), ("the capital of italy is", " rome")]
VAL = [("the capital of spain is", " madrid"), ("six plus one equals", " seven"), ("the dog was in the", " house")]
MC = [{"prompt": "the capital of france is", "options": [" paris", " rome", " madrid"], "answer": 0},
      {"prompt": "one plus two equals", "options": [" four", " three", " one"], "answer": 1},
      {"prompt": "the capital of italy is", "options": [" berlin", " paris", " rome"], "answer": 2},
      {"prompt": "the cat was in the", "options": [" house", " city", " word"], "answer": 0}]


def _enc(tok, pairs):
    return encode_split(tok, [{"prompt": p, "completion": c} for p, c in pairs], "x")[0]


def _record_nll(model, tok, prompt, completion):
    """(summed NLL of the completion tokens, their count) for one record, plain forward."""
    p = tok(prompt)["input_ids"]
    ids = torch.tensor([p + tok(completion)["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    nll = -logp[torch.arange(len(targets)), targets][len(p) - 1 :]
    return nll.sum(), len(nll)


@torch.no_grad()
def plain_val_loss(model, tok, pairs=VAL):
    """Mean over records of each record's mean completion-token NLL."""
    return sum(float(s / n) for s, n in (_record_nll(model, tok, p, c) for p, c in pairs)) / len(pairs)


# ----------------------------------------------------------------------------- statistics


def test_spearman_interval_equals_plain_loop():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    b = b + a  # correlated
    rho, lo, hi = spearman_interval(a, b, B=300, seed=7)
    assert rho == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    idx = torch.randint(12, (300, 12), generator=torch.Generator().manual_seed(7))
    boot = [spearmanr(a[i], b[i]).statistic for i in idx]
    boot = torch.tensor([x for x in boot if x == x], dtype=torch.float64)
    ref = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert (lo, hi) == pytest.approx(ref.tolist(), abs=1e-12)
    assert lo <= rho <= hi


def test_verdict_and_claimed_signs():
    assert V.verdict(1, 0.2, 0.8) == "as claimed" and V.verdict(-1, 0.2, 0.8) == "opposite"
    assert V.verdict(1, -0.1, 0.5) == "inconclusive" and V.verdict(1, None, 0.5) == "undefined"
    S = [float(x) for x in range(10)]
    scores = {"e": {"score": S, "sum": [-x for x in S], "mean_abs": S}}
    truths = {"fine_tune_gain": [x**2 for x in S], "prune_loss_rise": [-x for x in S],
              "prune_accuracy_change": None}
    out = V.correlate(scores, truths, B=200)
    assert set(out["e"]["score"]) == {"fine_tune_gain", "prune_loss_rise"}  # no accuracy: skipped
    for agg in ("score", "sum", "mean_abs"):  # high S_l (or very negative sum) with large gain and a small loss rise
        for g in ("fine_tune_gain", "prune_loss_rise"):
            r = out["e"][agg][g]
            assert r["verdict"] == "as claimed" and abs(r["rho"]) == pytest.approx(1.0)
    assert out["e"]["score"]["fine_tune_gain"]["claimed_sign"] == 1
    assert out["e"]["sum"]["fine_tune_gain"]["claimed_sign"] == -1
    assert out["e"]["score"]["prune_loss_rise"]["claimed_sign"] == -1
    flipped = V.correlate({"e": {"score": [-x for x in S]}}, truths, B=200)
    assert flipped["e"]["score"]["fine_tune_gain"]["verdict"] == "opposite"


def test_profile_scores_are_the_score_aggregations():
    I = {0: torch.tensor([-1.0, 2.0, -3.0]), 1: torch.tensor([0.5, 0.5, -0.25])}
    out = V.profile_scores({"datainf": I}, [0, 1])["datainf"]
    assert out["score"] == pytest.approx([4.0, 0.25])  # -sum of the negative influences
    assert out["sum"] == pytest.approx([-2.0, 0.75])
    assert out["mean_abs"] == pytest.approx([2.0, 1.25 / 3])


# ----------------------------------------------------------------------------- measurements


def test_mean_loss_equals_one_record_loop():
    model, tok = tiny_model("llama", n_layers=2), make_tokenizer()
    got = V.mean_loss(model, _enc(tok, VAL), tok.pad_token_id, batch_size=2)
    assert got == pytest.approx(plain_val_loss(model, tok), rel=1e-5)


def plain_adam_block(model, tok, block_params, steps, batch, lr, seed):
    """Train ``block_params`` by a hand-written Adam (betas 0.9, 0.999, eps 1e-8), lr decaying as lr (K - s) / K,
    on the token-weighted mean completion NLL of each step's records, drawn in train_encoded's seeded order."""
    rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    m = [torch.zeros_like(p) for p in block_params]
    v = [torch.zeros_like(p) for p in block_params]
    for s in range(steps):
        while len(order) < batch:
            order += torch.randperm(len(TRAIN), generator=rng).tolist()
        chunk, order = order[:batch], order[batch:]
        parts = [_record_nll(model, tok, *TRAIN[i]) for i in chunk]
        loss = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        grads = torch.autograd.grad(loss, block_params)
        lr_s = lr * (steps - s) / steps
        with torch.no_grad():
            for p, g, m_, v_ in zip(block_params, grads, m, v):
                m_.mul_(0.9).add_(0.1 * g)
                v_.mul_(0.999).add_(0.001 * g * g)
                mhat, vhat = m_ / (1 - 0.9 ** (s + 1)), v_ / (1 - 0.999 ** (s + 1))
                p -= lr_s * mhat / (vhat.sqrt() + 1e-8)


def test_fine_tune_gain_equals_plain_adam_per_block():
    model, tok = tiny_model("llama", n_layers=2), make_tokenizer()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    targets = select_targets(model, "attn")
    config = TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup=0.0, weight_decay=0.0, max_grad_norm=0.0, seed=1)
    layers, gains, base = V.fine_tune_gain(model, targets, _enc(tok, TRAIN), _enc(tok, VAL), tok.pad_token_id, config)
    assert layers == [0, 1] and base == pytest.approx(plain_val_loss(model, tok), rel=1e-5)
    for k, p in model.named_parameters():  # weights and requires_grad restored
        assert torch.equal(p, before[k]) and p.requires_grad
    for l, gain in zip(layers, gains):
        ref = copy.deepcopy(model)
        params = [p for t in select_targets(ref, "attn") if t.block == l for p in t.module.parameters(recurse=False)]
        plain_adam_block(ref, tok, params, 3, 2, 1e-2, 1)
        assert gain == pytest.approx(base - plain_val_loss(ref, tok), rel=1e-3, abs=1e-6)
        assert abs(gain) > 1e-4  # the step did something


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_sensitivity_equals_pruning_the_whole_model_with_one_block_sparse(method):
    model, tok = tiny_model("llama", n_layers=3), make_tokenizer()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    windows = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    val = _enc(tok, VAL)
    out = V.prune_sensitivity(model, tok, [0, 2], val, method, 0.5, windows, MC, eval_batch_size=2)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k])
    base_loss, base_acc = plain_val_loss(model, tok), mc_accuracy(model, tok, MC)
    assert out["base_val_loss"] == pytest.approx(base_loss, rel=1e-5) and out["base_accuracy"] == base_acc
    for i, l in enumerate([0, 2]):
        ref = copy.deepcopy(model)
        prune_model(ref, [0.5 if b == l else 0.0 for b in range(3)], method, windows)
        assert out["loss_rise"][i] == pytest.approx(plain_val_loss(ref, tok) - base_loss, rel=1e-4, abs=1e-6)
        assert out["accuracy_change"][i] == pytest.approx(mc_accuracy(ref, tok, MC) - base_acc)
        assert abs(out["loss_rise"][i]) > 1e-6


# ----------------------------------------------------------------------------- command


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_validate_command_writes_its_outputs(tiny_model_dir, tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in TRAIN])
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": c} for p, c in VAL])
    mc = _jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "out"
    rc = main(["validate", "--model", str(tiny_model_dir), "--train", train, "--val", val, "--accuracy-task", mc,
               "--steps", "2", "--ft-batch-size", "2", "--method", "wanda", "--n-calib", "2", "--seqlen", "16",
               "--bootstrap-blocks", "50", "--out", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads((out / "validation.json").read_text())
    assert doc["layers"] == [0, 1, 2] and len(doc["fine_tune_gain"]) == 3
    assert len(doc["prune_sensitivity"]["loss_rise"]) == 3 and len(doc["prune_sensitivity"]["accuracy_change"]) == 3
    for e in ("datainf", "exact", "grad-dot"):
        for a in ("score", "sum", "mean_abs"):
            for g in ("fine_tune_gain", "prune_loss_rise", "prune_accuracy_change"):
                r = doc["spearman"][e][a][g]
                assert {"rho", "ci_low", "ci_high", "claimed_sign", "verdict"} <= r.keys()
    assert (out / "validation.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "fine-tune gain at ρ =" in report and "layerif validate" in report
    assert "predicts fine-tune gain" in capsys.readouterr().out


def test_accuracy_task_none_measures_no_accuracy(tiny_model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in TRAIN])
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": c} for p, c in VAL])
    out = tmp_path / "out"
    rc = main(["validate", "--model", str(tiny_model_dir), "--train", train, "--val", val, "--accuracy-task", "none",
               "--steps", "2", "--ft-batch-size", "2", "--method", "magnitude", "--bootstrap-blocks", "50",
               "--out", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads((out / "validation.json").read_text())
    assert doc["pruning"]["accuracy_task"] is None and doc["pruning"]["task_items"] == 0


@pytest.mark.parametrize("extra,expect", [(["--sparsity", "1.5"], "--sparsity"), (["--target", "lora"], "lora"),
                                          (["--accuracy-task", "nosuchtask"], "unknown task"),
                                          (["--estimators", "bogus"], "unknown estimator"),
                                          (["--steps", "0"], "--steps")])
def test_bad_options_are_one_line_errors(extra, expect, tmp_path, capsys):
    rc = main(["validate", "--task", "capitals", "--out", str(tmp_path / "o"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cross_vs_within_is_the_attenuation_bound():
    from layerif.stability import cross_vs_within

    rows = cross_vs_within(["a", "b", "c"], [[1, 0.5, 0.9], [0.5, 1, 0.2], [0.9, 0.2, 1]],
                           {"a": 0.81, "b": 0.64, "c": None})
    assert [(r["a"], r["b"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = rows[0]
    assert ab["ceiling"] == pytest.approx(0.72) and ab["disattenuated"] == pytest.approx(0.5 / 0.72)
    assert ab["below_ceiling"] is True and ab["within_a"] == 0.81
    assert rows[1]["ceiling"] is None and rows[1]["disattenuated"] is None and rows[1]["below_ceiling"] is None


def test_compare_estimators_validate_writes_the_validation_beside_the_agreement(tiny_model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in TRAIN])
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": p, "completion": c} for p, c in VAL])
    mc = _jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "est"
    rc = main(["compare-estimators", "--model", str(tiny_model_dir), "--train", train, "--val", val, "--validate",
               "--estimators", "datainf,grad-dot", "--accuracy-task", mc, "--steps", "2", "--ft-batch-size", "2",
               "--method", "magnitude", "--bootstrap-blocks", "50", "--out", str(out), "--quiet"])
    assert rc == 0
    est = json.loads((out / "estimators.json").read_text())
    doc = json.loads((out / "validation.json").read_text())
    assert doc["estimators"][:2] == ["datainf", "grad-dot"] and doc["scores"]["datainf"]["score"] == est["score"]["datainf"]
    assert est["validation"]["grad-dot"] == doc["spearman"]["grad-dot"]["score"]
    assert (out / "validation.png").exists() and (out / "spearman.csv").exists()
    assert "fine-tune gain at ρ =" in (out / "report.md").read_text()


@pytest.mark.parametrize("verdict,expect", [("as claimed", "'s S_l predicts fine-tune gain at ρ"),
                                            ("opposite", "'s S_l predicts the opposite of fine-tune gain"),
                                            ("inconclusive", "'s S_l neither predicts nor contradicts fine-tune gain")])
def test_the_reading_of_fine_tune_gain_follows_the_verdict(verdict, expect):
    from layerif.report import validation_reading

    r = {"rho": 0.5, "ci_low": -0.2 if verdict == "inconclusive" else 0.1, "ci_high": 0.9, "claimed_sign": 1,
         "verdict": verdict}
    doc = {"estimators": ["datainf"], "layers": [0, 1, 2], "bootstrap": {"level": 0.95},
           "prune_sensitivity": {"accuracy_change": None},
           "spearman": {"datainf": {"score": {"fine_tune_gain": r, "prune_loss_rise": r}}}}
    first = validation_reading(doc)[0]
    assert expect in first
    assert verdict == "as claimed" or "S_l predicts fine-tune gain at" not in first
