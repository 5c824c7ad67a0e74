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
               "--method", "magnitude", "--bootstrap-blocks", "50", "--in-sample", "--out", str(out), "--quiet"])
    assert rc == 0
    est = json.loads((out / "estimators.json").read_text())
    doc = json.loads((out / "validation.json").read_text())
    assert doc["estimators"][:2] == ["datainf", "grad-dot"] and doc["scores"]["datainf"]["score"] == est["score"]["datainf"]
    assert est["validation"]["grad-dot"] == doc["spearman"]["grad-dot"]["score"]
    assert "fine_tune_gain_in_sample" in doc["spearman"]["grad-dot"]["score"] and doc["in_sample"] is not None
    assert est["n_train"] == doc["n_train"] == 3 and doc["gt_n_train"] == 3 and doc["gt_n_val"] == 1  # files split
    assert (out / "validation.png").exists() and (out / "spearman.csv").exists()
    assert "fine-tune gain at ρ =" in (out / "report.md").read_text()


@pytest.mark.parametrize("verdict,expect", [("as claimed", "'s S_l predicts fine-tune gain at ρ"),
                                            ("opposite", "'s S_l predicts the opposite of fine-tune gain"),
                                            ("inconclusive", "'s S_l neither predicts nor contradicts fine-tune gain")])
def test_the_reading_of_fine_tune_gain_follows_the_verdict(verdict, expect):
    from layerif.commands.validate import validation_reading

    r = {"rho": 0.5, "ci_low": -0.2 if verdict == "inconclusive" else 0.1, "ci_high": 0.9, "claimed_sign": 1,
         "verdict": verdict}
    doc = {"estimators": ["datainf"], "layers": [0, 1, 2], "bootstrap": {"level": 0.95},
           "prune_sensitivity": {"accuracy_change": None},
           "spearman": {"datainf": {"score": {"fine_tune_gain": r, "prune_loss_rise": r}}}}
    first = validation_reading(doc)[0]
    assert expect in first
    assert verdict == "as claimed" or "S_l predicts fine-tune gain at" not in first


# ----------------------------------------------------------------------------- out-of-sample records


def _text(r: dict) -> str:
    return r["text"] if "text" in r else r["prompt"] + r["completion"]


def _disjoint(named: dict[str, list[str]]) -> None:
    """Every pair of record sets shares no text (plain set intersections)."""
    names = list(named)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(named[a]) & set(named[b]), (a, b)


@pytest.mark.parametrize("task,n_train,n_val,gt", [("capitals", None, None, (None, None)),
                                                    ("opposites", 40, 10, (50, 20)), ("addition", 64, 16, (30, 8))])
def test_a_tasks_record_sets_are_disjoint_and_scoring_keeps_its_records(task, n_train, n_val, gt):
    from layerif.scores import ScoreArgs, raw_splits
    from layerif.tasks import TASKS, test_records

    args = ScoreArgs(task=task, n_train=n_train, n_val=n_val)
    d = V.draw_records(args, *gt)
    train, val, _, _ = raw_splits(args)
    assert d.train.records == train and d.val.records == val  # scoring: exactly the records it used before
    k_train, k_val = len(train), len(val)
    assert len(d.truth_train.records) == (gt[0] or k_train) and len(d.truth_val.records) == (gt[1] or k_val)
    tests = [r["prompt"] + r["options"][r["answer"]] for r in test_records(task, 100)]
    sets = {"scoring train": [_text(r) for r in d.train.records], "scoring val": [_text(r) for r in d.val.records],
            "truth train": [_text(r) for r in d.truth_train.records],
            "truth val": [_text(r) for r in d.truth_val.records], "test": tests}
    _disjoint(sets)
    assert all(len(set(v)) == len(v) for v in sets.values())  # no repeats inside a set either
    t = TASKS[task]  # and no underlying fact (both directions of a pair, a + b and b + a) in two sets
    fact = {(t.template.format(q), f" {a}"): i for i, g in enumerate(t.groups) for q, a in g}
    groups = {name: {fact[(r["prompt"], r["completion"])] for r in s.records}
              for name, s in (("train", d.train), ("val", d.val), ("truth train", d.truth_train),
                              ("truth val", d.truth_val))}
    _disjoint({k: list(v) for k, v in groups.items()})
    # the ground truth's items are the split's seeded order after scoring's, minus those sharing a scoring fact
    full = t.split("train", None, 0)
    assert d.truth_train.records == [full[i] for i in d.truth_train.index] and min(d.truth_train.index) >= k_train


def _files(tmp_path, n_train=10, n_val=6, repeat=2):
    train = [{"prompt": f"train question {i}", "completion": f" answer {i}"} for i in range(n_train)]
    val = [{"text": f"validation text {i}"} for i in range(n_val)]
    return (_jsonl(tmp_path / "train.jsonl", train + train[:repeat]), _jsonl(tmp_path / "val.jsonl", val),
            train + train[:repeat], val)


def test_a_user_files_record_sets_are_a_seeded_split_by_distinct_text(tmp_path):
    from layerif.scores import ScoreArgs

    train_path, val_path, train, val = _files(tmp_path)
    d = V.draw_records(ScoreArgs(train=train_path, val=val_path))
    truth = {_text(r) for r in d.truth_train.records} | {_text(r) for r in d.truth_val.records}
    # defaults: half of each file's distinct records; scoring: every other record, in file order (repeats kept)
    assert len(d.truth_train.records) == 5 and len(d.truth_val.records) == 3
    assert d.train.index == [i for i, r in enumerate(train) if _text(r) not in truth]
    assert d.val.index == [i for i, r in enumerate(val) if _text(r) not in truth]
    assert [train[i] for i in d.truth_train.index] == d.truth_train.records
    _disjoint({"scoring train": [_text(r) for r in d.train.records], "scoring val": [_text(r) for r in d.val.records],
               "truth train": [_text(r) for r in d.truth_train.records],
               "truth val": [_text(r) for r in d.truth_val.records]})
    again = V.draw_records(ScoreArgs(train=train_path, val=val_path))
    other = V.draw_records(ScoreArgs(train=train_path, val=val_path, seed=1))
    assert again.truth_train.index == d.truth_train.index and other.truth_train.index != d.truth_train.index
    capped = V.draw_records(ScoreArgs(train=train_path, val=val_path, n_train=2), 7, 1)
    held = {_text(x) for x in capped.truth_train.records}
    kept = [i for i, r in enumerate(train) if _text(r) not in held]
    assert capped.train.index == kept[:2]
    assert capped.counts["train"] == {"available": len(kept), "used": 2, "held_out": 12 - len(kept)}


def test_the_same_file_as_train_and_val_still_gives_disjoint_ground_truth(tmp_path):
    from layerif.scores import ScoreArgs

    path, _, recs, _ = _files(tmp_path, n_train=8, repeat=0)
    d = V.draw_records(ScoreArgs(train=path, val=path))
    assert len(d.truth_val.records) == 4 and len(d.truth_train.records) == 2  # half, then half of what is left
    _disjoint({"scoring": [_text(r) for r in d.train.records + d.val.records],
               "truth train": [_text(r) for r in d.truth_train.records],
               "truth val": [_text(r) for r in d.truth_val.records]})


@pytest.mark.parametrize("extra,expect", [
    (["--gt-n-train", "0"], "--gt-n-train and --gt-n-val must be >= 1"),
    (["--gt-n-val", "-3"], "--gt-n-train and --gt-n-val must be >= 1"),
    (["--n-train", "800"], "needs 800 capitals train items unused by scoring"),  # 806 distinct
    (["--n-train", "0"], "unused by scoring"),  # scoring takes the whole split
    (["--n-val", "300", "--gt-n-val", "200"], "needs 200 capitals validation items"),
    (["--n-train", "1000", "--allow-repeats"], "unused by scoring"),
])
def test_too_few_records_for_the_ground_truth_is_one_line_before_the_model(extra, expect, tmp_path, capsys):
    rc = main(["validate", "--task", "capitals", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"),
               "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,expect", [(["--gt-n-val", "6"], "takes 6 (it needs 1 to 5"),
                                          (["--gt-n-train", "10"], "takes 10 (it needs 1 to 9")])
def test_too_few_distinct_file_records_is_one_line(extra, expect, tmp_path, capsys):
    train_path, val_path, _, _ = _files(tmp_path)
    rc = main(["validate", "--train", train_path, "--val", val_path, "--model", str(tmp_path / "no-model"),
               "--out", str(tmp_path / "o"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    rc = main(["compare-estimators", "--validate", "--train", train_path, "--val", val_path, "--model",
               str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), "--quiet", *extra])
    assert rc == 2 and expect in capsys.readouterr().err


def test_in_sample_reproduces_the_earlier_reading_and_validation_json_names_the_records(tiny_model_dir, tmp_path):
    """--in-sample: the in-sample ground truth is the unchanged functions on the scoring records (bit for bit);
    the default reading is the same functions on the drawn ground-truth records."""
    import hashlib

    from layerif.datasets_io import calibration_windows
    from layerif.options import ModelOptions
    from layerif.results import block_gains
    from layerif.scores import ScoreArgs, load_splits
    from layerif.tasks import TASKS, test_records

    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir), "--task", "capitals", "--n-train", "10", "--n-val", "5", "--steps", "2",
              "--ft-batch-size", "2", "--method", "wanda", "--n-calib", "2", "--seqlen", "16", "--task-items", "8",
              "--bootstrap-blocks", "50", "--estimators", "datainf,grad-dot", "--quiet"]
    assert main(["validate", *common, "--gt-n-train", "12", "--gt-n-val", "6", "--in-sample", "--out", str(out)]) == 0
    doc = json.loads((out / "validation.json").read_text())

    lm = ModelOptions(model=str(tiny_model_dir)).load()
    tok, pad = lm.tokenizer, lm.tokenizer.pad_token_id
    args = ScoreArgs(task="capitals", n_train=10, n_val=5)
    train, val, _, _ = load_splits(args, tok)  # the scoring records, as score reads them
    targets = select_targets(lm.model, "attn")
    config = TrainConfig(steps=2, batch_size=2, lr=1e-4, warmup=0.0, weight_decay=0.0, max_grad_norm=0.0, seed=0)
    windows = calibration_windows(tok, "builtin", 2, 16, 0, "text")
    mc = test_records("capitals", 8)
    layers, gains, base = V.fine_tune_gain(lm.model, targets, train, val, pad, config)
    pruned = V.prune_sensitivity(lm.model, tok, layers, val, "wanda", 0.5, windows, mc)
    inside = doc["in_sample"]
    assert doc["layers"] == layers and inside["fine_tune_gain"] == gains and inside["base"]["val_loss"] == base
    assert inside["prune_sensitivity"]["loss_rise"] == pruned["loss_rise"]
    assert doc["prune_sensitivity"]["accuracy_change"] == pruned["accuracy_change"]

    d = V.draw_records(args, 12, 6)
    truth_train = encode_split(tok, d.truth_train.records, "x")[0]
    truth_val = encode_split(tok, d.truth_val.records, "x")[0]
    _, gains_out, base_out = V.fine_tune_gain(lm.model, targets, truth_train, truth_val, pad, config)
    pruned_out = V.prune_sensitivity(lm.model, tok, layers, truth_val, "wanda", 0.5, windows, mc)
    assert doc["fine_tune_gain"] == gains_out and doc["base"]["val_loss"] == base_out != base
    assert doc["prune_sensitivity"]["loss_rise"] == pruned_out["loss_rise"] and gains_out != gains
    # block_gains (the gain allocations, compare-finetune) reads the out-of-sample gain
    assert block_gains(out, 3)[0].tolist() == gains_out
    for e in ("datainf", "grad-dot"):  # a correlation for each reading
        assert {"fine_tune_gain", "fine_tune_gain_in_sample", "prune_loss_rise_in_sample"} <= doc["spearman"][e]["score"].keys()
        rho = spearmanr(doc["scores"][e]["score"], gains).statistic
        assert doc["spearman"][e]["score"]["fine_tune_gain_in_sample"]["rho"] == pytest.approx(rho)

    rec = doc["records"]  # which records served what
    assert rec["reading"] == "out of sample and in sample" and (doc["gt_n_train"], doc["gt_n_val"]) == (12, 6)
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()[:12]
    full = {s: TASKS["capitals"].split(s, None, 0) for s in ("train", "validation")}
    for use, split, count in (("scoring", "train", 10), ("scoring", "validation", 5), ("ground_truth", "train", 12),
                              ("ground_truth", "validation", 6)):
        entry = rec[use][split]
        assert entry["count"] == count == len(entry["index"]) == len(entry["hash"])
        assert entry["hash"] == [sha(_text(full[split][i])) for i in entry["index"]]
    assert rec["scoring"]["train"]["index"] == list(range(10)) and min(rec["ground_truth"]["train"]["index"]) >= 10
    assert rec["accuracy"]["count"] == 8 and rec["accuracy"]["shared_with_scoring"] == 0
    assert rec["accuracy"]["hash"] == [sha(r["prompt"] + r["options"][r["answer"]]) for r in mc]
    csv_head = (out / "validation.csv").read_text().splitlines()[0]
    assert "fine_tune_gain_in_sample" in csv_head and "prune_loss_rise_in_sample" in csv_head
    report = (out / "report.md").read_text()
    assert "out of sample" in report and "fine-tune gain (in sample)" in report

    plain = tmp_path / "plain"  # the default: out of sample only, the same numbers
    assert main(["validate", *common, "--gt-n-train", "12", "--gt-n-val", "6", "--out", str(plain)]) == 0
    pdoc = json.loads((plain / "validation.json").read_text())
    assert pdoc["in_sample"] is None and pdoc["records"]["reading"] == "out of sample"
    assert pdoc["fine_tune_gain"] == gains_out and "fine_tune_gain_in_sample" not in pdoc["spearman"]["datainf"]["score"]


def test_accuracy_items_shared_with_the_scoring_records_are_counted(tiny_model_dir, tmp_path):
    train_path, val_path, train, _ = _files(tmp_path)
    mc = [{"prompt": r["prompt"], "options": [r["completion"], " other"], "answer": 0} for r in train[:10]]
    out = tmp_path / "out"
    assert main(["validate", "--model", str(tiny_model_dir), "--train", train_path, "--val", val_path,
                 "--accuracy-task", _jsonl(tmp_path / "mc.jsonl", mc), "--steps", "1", "--ft-batch-size", "2",
                 "--method", "magnitude", "--bootstrap-blocks", "20", "--out", str(out), "--quiet"]) == 0
    rec = json.loads((out / "validation.json").read_text())["records"]
    texts = {r["prompt"] + r["options"][0] for r in mc}
    scoring = {_text(train[i]) for i in rec["scoring"]["train"]["index"]}
    truth = {_text(train[i]) for i in rec["ground_truth"]["train"]["index"]}
    assert rec["accuracy"]["shared_with_scoring"] == len(texts & scoring) > 0
    assert rec["accuracy"]["shared_with_ground_truth"] == len(texts & truth) > 0
