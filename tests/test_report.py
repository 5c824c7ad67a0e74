"""report.md / report.html: replayable command line, tables, embedded pictures, plain-language reading."""

from __future__ import annotations

import base64
import html
import json
import shlex
from dataclasses import asdict

import pytest

from conftest import make_tokenizer, tiny_model
from layerif import cli
from layerif.errors import UserError
from layerif.commands.report import ReportArgs, run
from layerif.commands.score import score_reading, validate_command
from layerif.report import block_ranges, command_line, render_report
from layerif.scores import ScoreArgs
from layerif.commands.score import run as run_score
from test_stability import random_texts


@pytest.fixture(scope="module")
def score_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    tiny_model("llama", n_layers=4, seed=0).save_pretrained(d / "model")
    make_tokenizer().save_pretrained(d / "model")
    for name, n, seed in (("train", 12, 1), ("val", 3, 2)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in random_texts(n, seed)))
    args = ScoreArgs(model=str(d / "model"), train=str(d / "train.jsonl"), val=str(d / "val.jsonl"), out=str(d / "out"),
                     estimator="exact", target="mlp", batch_size=4, bootstrap=30, split_half=True, top_k=2)
    run_score(args)
    return d / "out"


def test_score_report_names_the_supported_uses_and_the_validate_command(score_dir):
    md, page = render_report(score_dir)
    d = score_dir.parent
    line = shlex.join(["layerif", "validate", "--model", str(d / "model"), "--train", str(d / "train.jsonl"),
                       "--val", str(d / "val.jsonl"), "--target", "mlp"])
    assert "## What this profile is evidence for" in md
    assert "Supported use: choosing the blocks, and the LoRA capacity per block, to fine-tune (`layerif finetune`" in md
    assert "Not supported by evidence: pruning sparsity per block" in md
    assert f"`{line}`" in md and html.escape(line, quote=False) in page
    assert validate_command({"task": "capitals", "target": "lora", "lora_modules": ["q_proj", "v_proj"]}) == \
        "layerif validate --task capitals --target q_proj,v_proj"  # validate measures the base projections


def test_block_ranges():
    assert block_ranges([12, 7, 8, 9, 3]) == "3, 7–9 and 12"
    assert block_ranges([22, 23, 24]) == "22–24"
    assert block_ranges([5]) == "5"


def test_command_line_parses_back_to_the_config(score_dir):
    config = json.loads((score_dir / "config.json").read_text())
    line = command_line(config)
    assert line.startswith("layerif score ") and "--estimator exact" in line and "--split-half" in line
    assert "--damping-scale" not in line  # defaults are left out
    argv = shlex.split(line)[1:]
    ns = cli.make_parser().parse_args(argv)
    assert asdict(cli.build_args(ScoreArgs, ns)) == config["args"]


def test_score_report_has_tables_pictures_and_reading(score_dir):
    md, page = render_report(score_dir)
    doc = json.loads((score_dir / "scores.json").read_text())
    assert (score_dir / "report.md").read_text() == md and (score_dir / "report.html").read_text() == page
    for l in doc["layers"]:
        assert f"\n| {l} | " in md
    assert "![S_l per block with bootstrap intervals](layer_scores.png)" in md and "(stability.png)" in md
    for png in ("layer_scores.png", "stability.png"):
        assert base64.b64encode((score_dir / png).read_bytes()).decode() in page
    assert "src='layer_scores.png'" not in page  # self-contained
    assert "The ranking is" in md and "Two disjoint halves" in md and "layerif score --config" in md
    for paragraph in score_reading(doc):
        assert paragraph in md


def test_report_command_rerenders_the_same(score_dir):
    md = (score_dir / "report.md").read_text()
    (score_dir / "report.md").unlink()
    (score_dir / "report.html").unlink()
    assert "report.md" in run(ReportArgs(dir=str(score_dir)))
    assert (score_dir / "report.md").read_text() == md and (score_dir / "report.html").exists()


def _doc(score, stability=None):
    d = {"task": "arith", "layers": list(range(len(score))), "score": score}
    return d | ({"stability": stability} if stability else {})


def test_reading_words():
    concentrated = score_reading(_doc([1.0, 1.0, 10.0, 12.0, 11.0, 0.5, 0.5, 1.0]))
    assert concentrated[0].startswith("Blocks 3–4 carry most helpful influence for task arith: 62% of the total S in 2 of 8")
    assert "--bootstrap 200 --split-half" in concentrated[-1]
    spread = score_reading(_doc([3.0, 3.0, 3.0, 3.0, 3.5, 3.0, 3.0, 3.0, 3.0, 3.0]))
    assert spread[0].startswith("Helpful influence for task arith is spread out")
    boot = {"top_k": 2, "B": 100, "rank_stability": 0.93, "layers": [0, 1, 2], "p_top_k": [0.05, 0.97, 0.98]}
    text = score_reading(_doc([1.0, 5.0, 6.0], {"bootstrap": boot}))[1]
    assert text.startswith("The ranking is stable (0.93") and "Blocks 1–2 are in the top 2 in at least 90%" in text
    assert "No block has helpful influence" in score_reading(_doc([0.0, 0.0]))[0]


def test_generic_folder_and_bad_folder(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (tmp_path / "config.json").write_text(json.dumps({"command": "frobnicate", "args": {"ratio": 0.25, "fast": True,
                                                                                         "models": ["a", "b"]}}))
    (tmp_path / "comparison.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    (tmp_path / "comparison.csv").write_text("x,y\n1,2\n")
    fig, _ = plt.subplots()
    fig.savefig(tmp_path / "picture.png")
    md, page = render_report(tmp_path)
    assert "layerif frobnicate --ratio 0.25 --fast --models a,b" in md
    assert "| 1 | 2 |" in md and "![picture](picture.png)" in md and "data:image/png;base64," in page
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no layerif results"):
        render_report(tmp_path / "empty")
    with pytest.raises(UserError, match="is not a folder"):
        render_report(tmp_path / "nope")


def test_a_command_registers_its_own_report_renderer(tmp_path):
    from layerif.command_registry import COMMANDS, register
    from layerif.report import heading, paragraph

    def render(folder, config):
        return "toy", [heading("toy report", 1), paragraph(f"args {config['args']['n']}")]

    (tmp_path / "config.json").write_text(json.dumps({"command": "toy-report", "args": {"n": 3}, "version": "0"}))
    assert "toy-report" not in COMMANDS
    register("toy-report", ReportArgs, lambda a: "", "a toy", report=render)
    try:
        md, page = render_report(tmp_path)
    finally:
        del COMMANDS["toy-report"]
    assert md == "# toy report\n\nargs 3\n" and "<p>args 3</p>" in page
    md, _ = render_report(tmp_path)  # no longer registered: the generic report
    assert md.startswith("# layerif toy-report: ") and "## What was run" in md
