"""The command line: outputs on a local model folder, and a one-line error with exit 2 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import make_tokenizer, tiny_model
from layerif.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=3, seed=0).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"the capital of france is paris {w}"} for w in
                                               ("one", "two", "three", "four", "five", "six")])
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": "the capital of italy is", "completion": " rome"},
                                          {"prompt": "one plus two equals", "completion": " three"}])
    return train, val


def test_score_writes_all_outputs(model_dir, data, tmp_path, capsys):
    train, val = data
    out = tmp_path / "out"
    rc = main(["score", "--model", str(model_dir), "--train", str(train), "--val", str(val), "--out", str(out),
               "--quiet", "--per-val", "--batch-size", "4"])
    assert rc == 0
    doc = json.loads((out / "scores.json").read_text())
    for key in ("model", "task", "target", "estimator", "damping_scale", "n_train", "n_val", "layers", "score",
                "aggregations", "lambda", "seconds", "version"):
        assert key in doc
    assert doc["layers"] == [0, 1, 2] and len(doc["score"]) == 3 and doc["n_train"] == 6 and doc["n_val"] == 2
    assert doc["n_train_distinct"] == 6 and doc["n_val_distinct"] == 2  # no repeated record
    assert doc["aggregations"]["helpful"] == doc["score"]
    assert len(doc["lambda"]) == 3 * 4 and all(v > 0 for v in doc["lambda"].values())
    inf = load_file(out / "influence.safetensors")
    assert inf["layer.0"].shape == (2, 6)
    for i, l in enumerate(doc["layers"]):
        s = float(-inf[f"layer.{l}"].sum(0).clamp(max=0).sum())
        assert s == pytest.approx(doc["score"][i], rel=1e-5)
    assert (out / "scores.csv").read_text().splitlines()[0].startswith("layer,score")
    assert (out / "layer_scores.png").stat().st_size > 1000
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["per_val"] is True
    printed = capsys.readouterr().out
    assert "block" in printed and "wrote" in printed
    assert "Supported use: choosing the blocks" in printed and "Not supported by evidence: pruning" in printed
    assert f"layerif validate --model {model_dir} --train {train} --val {val} --target attn\n" in printed
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_config_replays_the_run(model_dir, data, tmp_path):
    train, val = data
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["score", "--model", str(model_dir), "--train", str(train), "--val", str(val), "--out", str(a),
                 "--quiet", "--estimator", "exact", "--target", "mlp"]) == 0
    assert main(["score", "--config", str(a / "config.json"), "--out", str(b), "--quiet"]) == 0
    sa, sb = (json.loads((d / "scores.json").read_text()) for d in (a, b))
    assert sa["score"] == sb["score"] and sb["estimator"] == "exact" and sb["target"] == "mlp"


def _bad(tmp_path, model_dir, data, capsys, extra, expect):
    train, val = data
    out = tmp_path / "never"
    argv = ["score", "--model", str(model_dir), "--train", str(train), "--val", str(val), "--out", str(out), "--quiet"]
    rc = main(argv + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert expect in err
    assert not out.exists()


@pytest.mark.parametrize("extra,expect", [
    (["--estimator", "lissa-ish"], "unknown estimator"),
    (["--damping-scale", "0"], "--damping-scale must be > 0"),
    (["--damping-scale", "-1"], "--damping-scale must be > 0"),
    (["--target", "nomatch_[xyz]+"], "matches no projection"),
    (["--target", "attn["], "neither"),
    (["--model", "/nonexistent/model/folder"], "model folder not found"),
    (["--train", "/nonexistent/train.jsonl"], "data file not found"),
])
def test_bad_options(tmp_path, model_dir, data, capsys, extra, expect):
    _bad(tmp_path, model_dir, data, capsys, extra, expect)


def test_bad_records(tmp_path, model_dir, data, capsys):
    train, val = data
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    neither = _jsonl(tmp_path / "neither.jsonl", [{"question": "x"}])
    short = _jsonl(tmp_path / "short.jsonl", [{"text": "cat"}])
    _bad(tmp_path, model_dir, data, capsys, ["--train", str(empty)], "train split is empty")
    _bad(tmp_path, model_dir, data, capsys, ["--val", str(neither)], "neither 'text' nor 'prompt'+'completion'")
    _bad(tmp_path, model_dir, data, capsys, ["--train", str(short)], "fewer than 2 tokens")


def test_out_is_a_file(tmp_path, model_dir, data, capsys):
    train, val = data
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc = main(["score", "--model", str(model_dir), "--train", str(train), "--val", str(val), "--out", str(f), "--quiet"])
    assert rc == 2 and "is a file" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_unknown_task(capsys):
    assert main(["score", "--task", "no-such-task", "--quiet"]) == 2
    assert "no-such-task" in capsys.readouterr().err


def test_max_length_reports_truncation(model_dir, data, tmp_path, capsys):
    from layerif import progress

    train, val = data
    rc = main(["score", "--model", str(model_dir), "--train", str(train), "--val", str(val), "--out",
               str(tmp_path / "o"), "--max-length", "6"])
    progress.enable(False)
    assert rc == 0
    assert "6 of 6 train, 2 of 2 validation records; 6 truncated to 6 tokens" in capsys.readouterr().err
    doc = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert doc["records"] == {"train": {"available": 6, "used": 6, "truncated": 6},
                              "validation": {"available": 2, "used": 2, "truncated": 0}, "max_length": 6}
    assert "6 truncated to 6 tokens" in (tmp_path / "o" / "report.md").read_text()


def test_console_script_exit_status_and_no_traceback(tmp_path):
    """The installed entry point: one line on stderr, exit 2, no traceback."""
    p = subprocess.run([sys.executable, "-m", "layerif", "score", "--damping-scale", "0", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "layerif score: error: --damping-scale must be > 0 (got 0.0)"


@pytest.mark.parametrize("argv,expect", [
    (["prune", "--sparsity", "x"], "layerif prune: error: argument --sparsity: invalid float value"),
    (["prune", "--no-such-option", "1"], "layerif prune: error: unrecognized arguments: --no-such-option 1"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_unparsable_command_lines(capsys, argv, expect):
    """argparse's own errors keep the contract too: one line, exit status 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and expect in err, err


def test_help_shows_each_default_once():
    """An option whose help text states its default in its own words gets no second ``(default: …)``."""
    from layerif.cli import make_parser, with_default

    assert with_default("tokens per window", 512) == "tokens per window (default: 512)"
    assert with_default("model (default: embedded)", None) == "model (default: embedded)"
    assert with_default("stages", ["a", "b"]) == "stages (default: a,b)"
    parser = make_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, command in sub.choices.items():
        for action in command._actions:
            text = (action.help or "").lower()
            assert text.count("(default:") <= 1, (name, action.option_strings, text)
            if "(default:" in text:
                assert "default" not in text.split("(default:")[0], (name, action.option_strings, text)


def test_score_takes_the_estimator_options(model_dir, data, tmp_path):
    """`layerif score --estimator lissa --lissa-iterations T --lissa-batch b`: S_l equals LiSSA with those options
    on per-sample gradients formed here (seed: --bootstrap-seed, as compare-estimators)."""
    from helpers import stats_from_grads
    from layerif.engine import per_sample_grads
    from layerif.influence import damping, lissa_influence
    from layerif.models import load_model, select_targets
    from layerif.scores import ScoreArgs, load_splits

    train, val = data
    out = tmp_path / "lissa"
    assert main(["score", "--model", str(model_dir), "--train", str(train), "--val", str(val), "--out", str(out),
                 "--quiet", "--estimator", "lissa", "--lissa-iterations", "3", "--lissa-batch", "2",
                 "--bootstrap-seed", "5", "--target", "mlp"]) == 0
    doc = json.loads((out / "scores.json").read_text())
    lm = load_model(str(model_dir), device="cpu")
    tr, va, _, _ = load_splits(ScoreArgs(train=str(train), val=str(val)), lm.tokenizer)
    targets = select_targets(lm.model, "mlp")
    G, _ = per_sample_grads(lm.model, targets, tr, lm.tokenizer.pad_token_id)
    V, _ = per_sample_grads(lm.model, targets, va, lm.tokenizer.pad_token_id)
    want, default = [0.0] * 3, [0.0] * 3
    for l in range(3):
        I = I100 = 0
        for t in (t for t in targets if t.block == l):
            s = stats_from_grads(G[t.name], V[t.name].sum(0))
            I = I + lissa_influence(s, damping(s, 0.1), 3, 2, seed=5)[:, 0]
            I100 = I100 + lissa_influence(s, damping(s, 0.1), 100, 2, seed=5)[:, 0]
        want[l], default[l] = float(-I.clamp(max=0).sum()), float(-I100.clamp(max=0).sum())
    assert doc["score"] == pytest.approx(want, rel=1e-4)
    assert doc["score"] != pytest.approx(default, rel=1e-3)  # the options reached the estimator
