"""lm-evaluation-harness in and out (layerif.lm_eval_io), offline: local task YAMLs only (the tool's own export of
a built-in task, and the hand-made task of tests/data/lm_eval), tiny models, few documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer, tiny_model

pytest.importorskip("lm_eval", reason="needs the lmeval extra (make test installs it)")

from layerif import lm_eval_io  # noqa: E402
from layerif.errors import UserError  # noqa: E402
from layerif.evaluate import mc_correct  # noqa: E402
from layerif import tasks  # noqa: E402
from layerif.tasks import export_lm_eval, get_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "lm_eval"  # its YAMLs name their data files relative to ROOT
TINY = "layerif_test_tiny_mc"


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_lm_eval(tmp_path_factory.mktemp("lm") / "tasks", ["capitals"])[0].parents[1]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_records_are_the_yaml_documents(at_root):
    # by hand: the documents in file order; prompt from the YAML's Jinja template, each choice after lm-eval's
    # default target delimiter " "; no validation split, so the train file is cut 3/4 : 1/4
    train, test = jsonl(DATA / "tiny_train.jsonl"), jsonl(DATA / "tiny_test.jsonl")

    def record(d):
        options = [" " + c for c in d["choices"]]
        return {"prompt": f"question: {d['question']} answer:", "completion": options[d["label"]],
                "options": options, "answer": d["label"]}

    task = get_task(f"lm-eval:{TINY}", str(DATA))
    assert task.split("train") == [record(d) for d in train[:6]]
    assert task.split("validation") == [record(d) for d in train[6:]]
    assert task.split("test") == [record(d) for d in test]
    assert tasks.test_records(f"lm-eval:{TINY}", 4, include=str(DATA)) == [record(d) for d in test[:4]]
    assert task.mapping == {"train": "train[0:6]", "validation": "train[6:]", "test": "test"}
    with pytest.raises(UserError, match="holds 6 documents"):
        task.split("test", 7)
    assert len(task.split("test", 8, allow_repeats=True)) == 8

    from layerif.commands.score import ScoreArgs
    from layerif.results import config_doc

    doc = config_doc("score", ScoreArgs(task=f"lm-eval:{TINY}", lm_eval_include=str(DATA), out="x"))
    assert doc["lm_eval_splits"] == task.mapping  # the split mapping is in the run's config


def test_scoring_records_of_an_lm_eval_task(at_root):
    from layerif.commands.score import ScoreArgs
    from layerif.scores import raw_splits

    train, val, label, counts = raw_splits(ScoreArgs(task=f"lm-eval:{TINY}", lm_eval_include=str(DATA), out="x",
                                                     n_train=0, n_val=0))
    docs = jsonl(DATA / "tiny_train.jsonl")
    assert [(r["prompt"], r["completion"]) for r in train] == [
        (f"question: {d['question']} answer:", " " + d["choices"][d["label"]]) for d in docs[:6]]
    assert counts["validation"]["used"] == 2 and len(val) == 2


def test_exported_builtin_task_scorer_and_lm_eval_agree_item_by_item(exported):
    model, tok = tiny_model("llama", seed=1), make_tokenizer()
    n = 24
    results = lm_eval_io.evaluate(model, tok, ["layerif_capitals"], str(exported), limit=n)["layerif_capitals"]
    ours = [float(c) for c in mc_correct(model, tok, get_task("capitals").split("test", n))]
    assert results["items"]["acc"] == ours and results["n"] == n
    assert results["acc"] == pytest.approx(sum(ours) / n)
    # through --task lm-eval:NAME the records are the export's documents, the built-in test split's
    assert tasks.test_records("lm-eval:layerif_capitals", n, include=str(exported)) == get_task("capitals").split("test", n)


def test_lm_eval_of_in_memory_pruned_model_equals_saved_and_reloaded(tmp_path, at_root):
    from lm_eval.evaluator import simple_evaluate

    from layerif.prune import prune_model

    model, tok = tiny_model("llama", seed=2), make_tokenizer()
    prune_model(model, [0.5, 0.5, 0.5], "magnitude", None)
    mem = lm_eval_io.evaluate(model, tok, [TINY], str(DATA))[TINY]
    model.save_pretrained(tmp_path / "pruned")
    tok.save_pretrained(tmp_path / "pruned")
    saved = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'pruned'},dtype=float32,device=cpu",
                            tasks=[TINY], task_manager=lm_eval_io.task_manager([TINY], str(DATA)), num_fewshot=0,
                            log_samples=True, bootstrap_iters=0)
    samples = sorted(saved["samples"][TINY], key=lambda s: s["doc_id"])
    for m in ("acc", "acc_norm"):
        assert mem["items"][m] == [float(s[m]) for s in samples]
        assert mem[m] == pytest.approx(saved["results"][TINY][f"{m},none"])
    # by hand: the item is right when its gold option has the highest summed log-likelihood in the saved run
    gold = [max(range(len(s["resps"])), key=lambda k: s["resps"][k][0][0]) == s["target"] for s in samples]
    assert mem["items"]["acc"] == [float(g) for g in gold]


def test_mean_items_weigh_each_task_alike():
    res = {"a": {"n": 2, "acc": 0.5, "acc_norm": 0.5, "items": {"acc": [1.0, 0.0], "acc_norm": [1.0, 0.0]}},
           "b": {"n": 4, "acc": 1.0, "acc_norm": 0.25, "items": {"acc": [1.0] * 4, "acc_norm": [1.0, 0, 0, 0]}}}
    items = lm_eval_io.mean_items(res, "acc")
    assert sum(items) / len(items) == pytest.approx((0.5 + 1.0) / 2)
    assert lm_eval_io.summary(res)["lm_eval/mean/acc_norm"] == pytest.approx((0.5 + 0.25) / 2)
    assert lm_eval_io.task_names(["paper", "boolq,rte"]) == list(lm_eval_io.PAPER_TASKS)


def test_bad_lm_eval_input_is_one_line_before_the_model_loads(tmp_path, at_root):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    base = [sys.executable, "-m", "layerif", "prune", "--model", str(tmp_path / "no-such-model"),
            "--lm-eval-include", str(DATA), "--allocation", "uniform", "--method", "magnitude"]
    for extra, message in ((["--lm-eval-tasks", "layerif_test_tiny_gen"], "is generate_until, not multiple_choice"),
                           (["--task", "lm-eval:layerif_test_tiny_gen"], "is generate_until, not multiple_choice")):
        p = subprocess.run(base + extra, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and message in last and "Traceback" not in p.stderr, p.stderr[-2000:]
    # an unknown name is looked up in lm-eval's own tasks too (which also hold the paper's seven)
    lm_eval_io.check_tasks(lm_eval_io.PAPER_TASKS, str(DATA))
    with pytest.raises(UserError, match="unknown lm-eval task 'no_such_task'"):
        lm_eval_io.check_tasks(["no_such_task"], str(DATA))
    with pytest.raises(UserError, match="not a single task"):
        lm_eval_io.check_tasks(["mmlu"], str(DATA))


def test_without_the_extra_a_one_line_error(monkeypatch):
    from layerif.commands.prune import PruneArgs

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match=r"`lmeval` extra: pip install 'layerif\[lmeval\]'"):
        PruneArgs(lm_eval_tasks=["paper"]).lm_eval_names()


def test_compare_pruning_keeps_lm_eval_items(tmp_path, at_root, tiny_model_dir):
    from layerif.cli import main

    out = tmp_path / "cmp"
    code = main(["compare-pruning", "--model", str(tiny_model_dir), "--allocations", "uniform,alpha",
                 "--methods", "magnitude", "--sparsities", "0.5", "--seeds", "0", "--eval-windows", "1",
                 "--seqlen", "16", "--task", f"lm-eval:{TINY}", "--lm-eval-include", str(DATA), "--task-items", "6",
                 "--lm-eval-tasks", TINY, "--out", str(out)])
    assert code == 0
    items = json.loads((out / "items.json").read_text())
    for key, per_item in items.items():
        # the built-in scorer on the lm-eval task's records and lm-eval itself agree document by document
        assert per_item["correct"] == per_item[f"lm_eval/{TINY}/acc"], key
    md = (out / "comparison.md").read_text()
    assert f"| {TINY} acc ↑ | {TINY} acc_norm ↑ | mean acc ↑ | mean acc_norm ↑ |" in md and "| - | dense |" in md
    assert json.loads((out / "config.json").read_text())["lm_eval_splits"]["test"] == "test"


def test_paper_protocol_recipe_parses(tmp_path):
    """bench/paper_protocol.sh is valid bash and every `layerif` line in it parses with the tool's own parser
    (its commands and options exist, values of the right types); a stand-in `layerif` records the lines."""
    script = ROOT / "bench" / "paper_protocol.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    log, bin_ = tmp_path / "calls", tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "layerif").write_text('#!/bin/sh\nprintf "%s\\0" "$@" >> "$LAYERIF_LOG"\nprintf "END\\0" >> "$LAYERIF_LOG"\n')
    (bin_ / "layerif").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LAYERIF_LOG": str(log), "OUT": str(tmp_path / "o")}
    assert subprocess.run(["bash", str(script)], env=env, timeout=60).returncode == 0
    calls, call = [], []
    for part in log.read_text().split("\0")[:-1]:
        if part == "END":
            calls.append(call)
            call = []
        else:
            call.append(part)
    from layerif.cli import build_args, make_parser
    from layerif.commands.base import COMMANDS

    parser = make_parser()
    commands = [c[0] for c in calls]
    assert commands[:3] == ["plan", "score", "compare-pruning"] and commands.count("compare-moe") == 4
    for argv in calls:
        ns = parser.parse_args(argv)
        args = build_args(COMMANDS[ns.command].args, ns)
        if ns.command == "compare-pruning":
            assert lm_eval_io.task_names(args.lm_eval_tasks) == list(lm_eval_io.PAPER_TASKS)
            assert (args.calib, args.eval, args.sparsities, args.methods) == ("c4", "wikitext2", ["0.5", "0.7"],
                                                                               ["wanda", "sparsegpt"])
        if ns.command == "compare-moe":
            assert args.total_experts == 160


def test_compare_pruning_pairs_lm_eval_documents():
    """comparison.md pairs the LayerIF arm with uniform on the lm-eval documents: Δ is the hand mean of the
    per-document differences, per task and for the mean over tasks."""
    from layerif.commands.compare_pruning import markdown

    a = {"t": [1.0, 1.0, 0.0, 1.0], "u": [1.0, 0.0]}
    b = {"t": [0.0, 1.0, 0.0, 0.0], "u": [0.0, 0.0]}

    def row(alloc, seed, docs):
        res = {t: {"n": len(v), "acc": sum(v) / len(v), "acc_norm": sum(v) / len(v),
                   "items": {"acc": v, "acc_norm": v}} for t, v in docs.items()}
        return {"method": "wanda", "sparsity": 0.5, "allocation": alloc, "seed": seed, "achieved": 0.5,
                "perplexity": 10.0, "accuracy": 0.5, "seconds": 1.0, **lm_eval_io.summary(res),
                "items": {"nll": [1.0], "correct": [1.0, 0.0], **lm_eval_io.item_lists(res)}}

    rows = [row("layerif", s, a) for s in ("0", "1")] + [row("uniform", s, b) for s in ("0", "1")]
    md = markdown(rows, {"model": "m"})
    line = next(l for l in md.splitlines() if l.startswith("| wanda 0.5 | lm-eval t acc | layerif | uniform"))
    assert f"| {sum(x - y for x, y in zip(a['t'], b['t'])) / 4:+.4f} |" in line
    mean = next(l for l in md.splitlines() if l.startswith("| wanda 0.5 | lm-eval mean acc | layerif | uniform"))
    assert f"| {((0.75 - 0.25) + (0.5 - 0.0)) / 2:+.4f} |" in mean  # each task weighs 1/2
