"""The benchmarks cannot rot: every ``bench/*.py`` imports and answers ``--help`` (so a moved or renamed
library name fails ``make test``, not a benchmark run months later), and ``search_kl_check`` runs end to end on
a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def load(path: Path, monkeypatch):
    """Import a bench script as a module (its folder on sys.path, as when it runs), without running it."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def helps():
    """Every script's ``--help`` in a process of its own, started at once (each takes seconds importing torch)."""
    procs = {p.name: subprocess.Popen([sys.executable, str(p), "--help"], cwd=BENCH.parent, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in SCRIPTS}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def test_there_are_benches():
    assert {"bench_score.py", "search_kl_check.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_imports_and_answers_help(script, helps, monkeypatch):
    load(script, monkeypatch)
    out, _ = helps[script.name].communicate(timeout=300)
    assert helps[script.name].returncode == 0, out
    assert out.lstrip().lower().startswith("usage:"), out  # argparse answered; nothing ran


def test_search_kl_check_runs(tiny_model_dir, tmp_path, monkeypatch):
    """search_kl_check on a 3-block model: the block count comes from the model, every path from an option."""
    script = load(BENCH / "search_kl_check.py", monkeypatch)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"model": "tiny", "layers": [0, 1, 2], "score": [1.0, 5.0, 2.0]}))
    search = tmp_path / "search.json"
    search.write_text(json.dumps({"wanda 0.7 seed 0 from uniform": {"method": "wanda", "target": 0.7,
                                                                     "sparsity": [0.6, 0.8, 0.7]}}))
    out = tmp_path / "why" / "why.json"
    monkeypatch.setattr(sys, "argv", ["search_kl_check.py", "--model", str(tiny_model_dir), "--scores", str(scores),
                                      "--levels", str(tmp_path / "levels"), "--search", str(search), "--out", str(out),
                                      "--n-calib", "2", "--seqlen", "16", "--fitness-windows", "2"])
    script.main()
    doc = json.loads(out.read_text())["allocations"]
    assert set(doc) == {"uniform", "alpha", "layerif", "sensitivity", "search wanda 0.7 seed 0 from uniform"}
    assert all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in doc.values())
    assert doc["uniform"]["moved_levels"] == 0 and doc["search wanda 0.7 seed 0 from uniform"]["moved_levels"] == 4
    assert list((tmp_path / "levels").glob("wanda-*/b*.safetensors"))
