"""compare-tasks and compare-estimators: agreement with per-task files, LiSSA in Gram form, the DataInf bound."""

from __future__ import annotations

import csv
import json
import shlex

import pytest
import torch

from conftest import TINY_VOCAB, make_tokenizer, tiny_model
from layerif import cli
from layerif.compare import block_influence, heatmap_figure, shares
from layerif.data import encode_split
from layerif.engine import per_sample_grads
from helpers import module_influence, stats_from_grads
from layerif.influence import ModuleStats, damping, datainf_bound, lissa_influence, lissa_residual, lissa_scale
from layerif.models import select_targets
from layerif.stability import spearman
from test_stability import random_texts

@pytest.fixture
def main():
    """The CLI (the comparison commands are registered in layerif.commands)."""
    return cli.main


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=4, seed=0).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    caps = [f"the capital of {c} is {p}" for c, p in (("france", "paris"), ("germany", "berlin"), ("italy", "rome"),
                                                      ("spain", "madrid"))] * 2
    arith = [f"{a} plus {b} equals {c}" for a, b, c in (("one", "two", "three"), ("two", "two", "four"),
                                                        ("four", "five", "nine"), ("three", "three", "six"))] * 2
    return (f"caps={_jsonl(d / 'ct.jsonl', caps)}:{_jsonl(d / 'cv.jsonl', caps[:2])}",
            f"{_jsonl(d / 'arith.jsonl', arith)}:{_jsonl(d / 'av.jsonl', arith[1:3])}")


def _one_line_error(capsys, rc, expect):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err


# ----------------------------------------------------------------------------- compare-tasks


def test_compare_tasks_agrees_with_per_task_scores(main, model_dir, two_tasks, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare-tasks", "--model", str(model_dir), "--tasks", ",".join(two_tasks), "--out", str(out),
                 "--quiet", "--batch-size", "8", "--top-k", "2", "--bootstrap", "20"]) == 0
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["tasks"] == ["caps", "arith"] and doc["layers"] == [0, 1, 2, 3]
    per_task = {t: json.loads((out / doc["folders"][t] / "scores.json").read_text()) for t in doc["tasks"]}
    for t, s in per_task.items():
        assert s["score"] == doc["score"][t] and doc["share"][t] == pytest.approx(shares(s["score"]))
        assert doc["rank_stability"][t] == s["stability"]["bootstrap"]["rank_stability"]
        assert (out / doc["folders"][t] / "report.html").exists()
        assert not (out / doc["folders"][t] / ".layerif-cache").exists()
    rho = spearman(per_task["caps"]["score"], per_task["arith"]["score"])
    assert doc["spearman"][0] == pytest.approx([1.0, rho]) and doc["spearman"][1] == pytest.approx([rho, 1.0])
    # recomputed split-half by default; the cross-task Spearman against the tasks' own reliabilities
    r = {t: per_task[t]["stability"]["split_half"]["spearman_brown"] for t in doc["tasks"]}
    assert per_task["caps"]["stability"]["split_half"]["method"] == "recomputed"
    (c,) = doc["cross_vs_within"]
    assert (c["a"], c["b"], c["within_a"], c["within_b"]) == ("caps", "arith", r["caps"], r["arith"])
    assert c["spearman"] == pytest.approx(rho)
    if r["caps"] > 0 and r["arith"] > 0:
        assert c["ceiling"] == pytest.approx((r["caps"] * r["arith"]) ** 0.5)
    assert "conditional on λ and the Hessian" in (out / "report.md").read_text()
    with open(out / "spearman.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["task", "caps", "arith"] and float(rows[1][2]) == pytest.approx(rho)
    # the heatmap shows exactly the per-task shares: rows blocks, columns tasks
    img = heatmap_figure(doc["tasks"], doc["layers"], doc["share"]).axes[0].images[0].get_array()
    for j, t in enumerate(doc["tasks"]):
        assert list(img[:, j]) == pytest.approx(shares(per_task[t]["score"]))
    top = doc["differing_blocks"][0]
    spread = [max(doc["share"][t][i] for t in doc["tasks"]) - min(doc["share"][t][i] for t in doc["tasks"])
              for i in range(4)]
    assert top["spread"] == pytest.approx(max(spread)) and top["block"] == spread.index(max(spread))
    assert (out / "task_heatmap.png").stat().st_size > 1000 and "caps" in (out / "report.md").read_text()
    assert "Spearman" in capsys.readouterr().out


def test_compare_tasks_needs_two_tasks(main, model_dir, two_tasks, tmp_path, capsys):
    rc = main(["compare-tasks", "--model", str(model_dir), "--tasks", two_tasks[0], "--out", str(tmp_path / "x"), "--quiet"])
    _one_line_error(capsys, rc, "--tasks needs at least two tasks")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tasks,expect", [
    ("a.jsonl:b.jsonl,{0}", "data file not found: a.jsonl"),
    ("{0},{0}", "appears twice"),
    ("{0},x.jsonl:", "use TRAIN:VAL"),
])
def test_compare_tasks_bad_specs(main, model_dir, two_tasks, tmp_path, capsys, tasks, expect):
    rc = main(["compare-tasks", "--model", str(model_dir), "--tasks", tasks.format(two_tasks[1]), "--out",
               str(tmp_path / "x"), "--quiet"])
    _one_line_error(capsys, rc, expect)


def test_compare_tasks_unknown_task(main, two_tasks, tmp_path, capsys):
    pytest.importorskip("layerif.tasks")
    rc = main(["compare-tasks", "--tasks", f"{two_tasks[1]},no-such-task", "--out", str(tmp_path / "x"), "--quiet"])
    _one_line_error(capsys, rc, "unknown task 'no-such-task'")


def test_compare_builtin_tasks_with_a_label(main, model_dir, tmp_path):
    tasks = pytest.importorskip("layerif.tasks")
    a, b = list(tasks.TASKS)[:2]
    out = tmp_path / "cmp"
    assert main(["compare-tasks", "--model", str(model_dir), "--tasks", f"{a},other={b}", "--out", str(out), "--quiet",
                 "--n-train", "6", "--n-val", "2"]) == 0
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["tasks"] == [a, "other"] and doc["task_names"] == {a: a, "other": b}
    assert json.loads((out / "other" / "scores.json").read_text())["n_train"] == 6


# ----------------------------------------------------------------------------- estimators in Gram form


def _random_stats(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ModuleStats]:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    return G, v, stats_from_grads(G, v)


def lissa_dense(G, v, lam, sigma, T, batch=0, seed=0):
    """The LiSSA recursion on d-dimensional vectors, as written."""
    n = G.shape[0]
    gen = torch.Generator().manual_seed(seed)
    h = v.clone()
    for _ in range(T):
        if batch:
            rows = torch.randperm(n, generator=gen)[:batch]
            Hh = G[rows].T @ (G[rows] @ h) / batch + lam * h
        else:
            Hh = G.T @ (G @ h) / n + lam * h
        h = v + h - Hh / sigma
    return -(G @ h) / sigma


@pytest.mark.parametrize("batch", [0, 3])
def test_lissa_gram_form_equals_dense_recursion(batch):
    G, v, s = _random_stats(9, 14)
    lam = damping(s, 0.5)
    sigma = lissa_scale(s, lam, batch)
    got = lissa_influence(s, lam, 25, batch, seed=4)[:, 0]
    torch.testing.assert_close(got, lissa_dense(G, v, lam, sigma, 25, batch, seed=4), rtol=1e-9, atol=1e-12)


def test_lissa_converges_to_exact_and_reports_its_residual():
    G, v, s = _random_stats(30, 6, seed=1)
    lam = damping(s, 10.0)
    exact = module_influence(s, "exact", lam)
    assert lissa_residual(s, lam, 3) > lissa_residual(s, lam, 30) > 0
    assert lissa_residual(s, lam, 400) < 1e-12
    torch.testing.assert_close(lissa_influence(s, lam, 400), exact, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("c", [0.1, 1.0, 100.0])
def test_datainf_bound_holds_for_the_dense_operators(c):
    """lambda ||E - D||_2 <= beta with E, D formed as d x d matrices (n > d)."""
    G, v, s = _random_stats(25, 5, seed=2)
    n, d = G.shape
    lam = damping(s, c)
    eye = torch.eye(d, dtype=torch.float64)
    E = torch.linalg.inv(G.T @ G / n + lam * eye)
    D = sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in G) / n
    assert lam * float(torch.linalg.matrix_norm(E - D, ord=2)) <= datainf_bound(s, lam) * (1 + 1e-9)


def _small_llama(n_layers: int = 2):
    """hidden 8, one KV head of 4: k_proj has d = 32 parameters."""
    import transformers as tf

    torch.manual_seed(3)
    cfg = tf.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=8, num_hidden_layers=n_layers, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, intermediate_size=12)
    return tf.LlamaForCausalLM(cfg).float().eval()


def test_datainf_within_its_bound_of_exact_on_tiny_model_with_d_below_n():
    """Real gradients, d = 32 < n = 40. The bound |I_datainf(i) - I_exact(i)| <= ||g_i|| ||v|| beta / lambda holds
    at every damping; it is informative (beta << 1) only when lambda >> ||g||^2, i.e. c >> d. There DataInf is
    close to exact -- and clearly closer than grad-dot. At LayerIF's c = 0.1, beta ~ d / c >> 1 guarantees nothing,
    and DataInf is in fact about as far from exact as grad-dot is."""
    model, tok = _small_llama(), make_tokenizer()
    targets = select_targets(model, r"k_proj")
    train = encode_split(tok, [{"text": t} for t in random_texts(40, seed=3)], "train")[0]
    val = encode_split(tok, [{"text": t} for t in random_texts(4, seed=4)], "validation")[0]
    G, _ = per_sample_grads(model, targets, train, tok.pad_token_id, batch_size=20)
    V, _ = per_sample_grads(model, targets, val, tok.pad_token_id, batch_size=4)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    for t in targets:
        g, v = G[t.name].double(), V[t.name].double().sum(0)
        assert g.shape[1] == 32 < g.shape[0] == 40
        s = stats_from_grads(g, v)
        for c in (0.1, 300.0):
            lam = damping(s, c)
            di, ex, gd = (module_influence(s, e, lam)[:, 0] for e in ("datainf", "exact", "grad-dot"))
            beta = datainf_bound(s, lam)
            assert ((di - ex).abs() <= g.norm(dim=1) * v.norm() * beta / lam * (1 + 1e-9)).all()
            if c == 300.0:
                assert beta < 0.05 and rel(di, ex) < 0.01 and rel(di, ex) < 0.5 * rel(gd / lam, ex)
            else:
                assert beta > 10 and rel(di, ex) > 0.5


def test_compare_estimators_d_below_n(main, tmp_path, capsys):
    d = tmp_path / "small"
    _small_llama(3).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    train = _jsonl(tmp_path / "t.jsonl", random_texts(40, seed=3))
    val = _jsonl(tmp_path / "v.jsonl", random_texts(4, seed=4))
    out = tmp_path / "est"
    argv = ["compare-estimators", "--model", str(d), "--train", train, "--val", val, "--target", "k_proj", "--out",
            str(out), "--quiet", "--batch-size", "20", "--damping-scale", "300", "--lissa-iterations", "200",
            "--bootstrap", "20", "--split-half", "--top-k", "2", "--peers", ""]
    assert main(argv) == 0
    doc = json.loads((out / "estimators.json").read_text())
    assert doc["estimators"] == ["datainf", "exact", "grad-dot", "lissa"] and len(doc["pairs"]) == 6
    assert max(doc["datainf_bound"]) < 0.05
    pair = {(p["a"], p["b"]): p for p in doc["pairs"]}
    assert pair["datainf", "exact"]["spearman"] == pytest.approx(1.0) and pair["datainf", "exact"]["top_k_overlap"] == 1.0
    assert pair["datainf", "exact"]["sample_spearman"] > 0.999
    assert pair["exact", "lissa"]["sample_spearman"] == pytest.approx(1.0)  # converged: residual ~ 0
    assert max(doc["lissa_residual"]) < 1e-6
    assert set(doc["rank_stability"]) == set(doc["split_half"]) == set(doc["estimators"])
    for e in doc["estimators"]:
        assert doc["split_half"][e]["method"] == "recomputed from Gram statistics"
    for f in ("estimators.csv", "agreement.csv", "estimators.png", "influence.safetensors", "report.md", "report.html"):
        assert (out / f).exists()
    assert "datainf" in capsys.readouterr().out
    # the report's command line parses back to the saved arguments; replay from config.json gives the same document
    from dataclasses import asdict

    from layerif.commands.compare_estimators import CompareEstimatorsArgs
    from layerif.report import command_line

    config = json.loads((out / "config.json").read_text())
    ns = cli.make_parser().parse_args(shlex.split(command_line(config))[1:])
    assert asdict(cli.build_args(CompareEstimatorsArgs, ns)) == config["args"]
    again = tmp_path / "again"
    assert main(["compare-estimators", "--config", str(out / "config.json"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / "estimators.json").read_text()) == doc


def test_block_influence_matches_engine_estimators():
    """datainf / exact / grad-dot from shared statistics are the engine's own (gram_influence), summed per block."""
    from layerif.influence import EstimatorConfig
    from layerif.models import Projection
    from layerif.scores import gram_influence

    _, _, s0 = _random_stats(8, 5, seed=5)
    _, _, s1 = _random_stats(8, 7, seed=6)
    stats = {"a": s0, "b": s1}
    targets = [Projection(0, "a", torch.nn.Linear(1, 1), "a"), Projection(0, "b", torch.nn.Linear(1, 1), "b")]
    for e in ("datainf", "exact", "grad-dot"):
        mod, _ = gram_influence(stats, targets, EstimatorConfig(e, 0.1))
        torch.testing.assert_close(block_influence(stats, targets, EstimatorConfig(e, 0.1))[0], mod["a"][0] + mod["b"][0])


@pytest.mark.parametrize("extra,expect", [
    (["--estimators", "datainf"], "at least two estimators"),
    (["--estimators", "datainf,ekfac"], "unknown estimator 'ekfac'"),
    (["--lissa-iterations", "0"], "--lissa-iterations must be >= 1"),
    (["--bootstrap", "-1"], "--bootstrap must be >= 2"),
])
def test_compare_estimators_bad_options(main, model_dir, two_tasks, tmp_path, capsys, extra, expect):
    train, val = two_tasks[1].split(":")
    rc = main(["compare-estimators", "--model", str(model_dir), "--train", train, "--val", val, "--out",
               str(tmp_path / "x"), "--quiet", *extra])
    _one_line_error(capsys, rc, expect)
    assert not (tmp_path / "x").exists()
