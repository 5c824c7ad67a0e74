"""``layerif plan``: the plan of a run from its config and record lengths, no weights; its buffer bytes are the
engines' own (held to :data:`layerif.budget.METER` exactly); a plan that does not fit stops a run in one line."""

from __future__ import annotations

import gc
import json
import math
import time

import pytest

from conftest import make_tokenizer
from layerif.budget import METER, streaming_bytes
from layerif.engine import EngineConfig, materialized_plan
from layerif.cli import main
from layerif.models import select_targets
from layerif.plan import Machine, make_plan
from helpers import compute
from test_streaming import _setup

BIG = Machine("cpu", 1e12)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _llama_folder(path, **shape) -> str:
    """A config-only Llama folder (config.json, no weights, no tokenizer)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 128,
           "max_position_embeddings": 256, "torch_dtype": "float32"} | shape
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


@pytest.mark.parametrize("mode,layout,per_val", [("materialized", "dense", False), ("materialized", "factored", True),
                                                 ("materialized", "dense", True), ("streaming", "auto", False),
                                                 ("streaming", "auto", True)])
@pytest.mark.parametrize("tight", [False, True])
def test_plan_buffer_bytes_equal_the_engines_tracked_allocations(mode, layout, per_val, tight):
    """The plan's buffer bytes (all groups and chunks) are exactly the bytes the engine allocates through METER,
    for both engines and both layouts, with one group and with several; the streaming peak is the plan's too."""
    lm, train, val = _setup("llama", seed=8, bias=True)
    kw = dict(target="block", estimator="datainf", per_val=per_val, layout=layout, mode=mode, val_chunk=4)
    targets = select_targets(lm.model, "block")
    if mode == "streaming":  # room for one and a half of the largest target's buffers
        budget = 1.5 * max(streaming_bytes(t, len(train), 1, True) for t in targets)
    else:  # the same, with the Gram products' scratch (an eighth of the budget) aside
        budget = 1.5 * max(materialized_plan(targets, train, val, per_val, layout, 1e12).cost.values()) * 8 / 7
    max_memory_gb = budget / 1e9 if tight else 1e3
    doc = make_plan(lm.model, train, val, BIG, EngineConfig("block", per_val=per_val, max_memory_gb=max_memory_gb,
                                                           layout=layout, mode=mode, val_chunk=4))
    plan = doc["engines"][mode]
    assert doc["engine"] == mode and plan["fits"]
    assert (plan["groups"] > 1) == tight
    gc.collect()
    METER.reset()
    start = METER.live
    result = compute(lm, train, val, batch_size=3, max_memory_gb=max_memory_gb, **kw)
    assert result.meta["mode"] == mode and result.passes == plan["passes"]
    assert METER.allocated["buffer"] == plan["buffers"]["total_allocated_bytes"]
    if mode == "streaming":
        assert METER.peak - start == plan["peak_buffer_bytes"]
    else:
        assert set(plan["layouts"]) == ({layout} if layout != "auto" else set(plan["layouts"]))
        assert METER.peak - start <= plan["peak_buffer_bytes"]


def test_the_engine_and_auto_share_one_materialized_plan():
    """``compute`` chooses the mode from the same plan the engine runs (groups with the scratch aside)."""
    lm, train, val = _setup("llama", seed=8)
    doc = make_plan(lm.model, train, val, BIG, EngineConfig("block", max_memory_gb=1e3))
    assert doc["engine"] == "materialized" and doc["engines"]["materialized"]["groups"] == 1


@pytest.mark.embedded
def test_plan_on_the_embedded_model(capsys, tmp_path):
    start = time.perf_counter()
    code, out, err = _cli(capsys, "plan", "--out", str(tmp_path / "p"), "--n-train", "8", "--n-val", "4")
    assert code == 0, err
    assert time.perf_counter() - start < 10
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["model"]["blocks"] == 30 and doc["targets"]["modules"] == 120
    assert doc["engine"] in ("materialized", "streaming") and doc["fits"]
    assert "SmolLM2" in out and "wrote" in out


def test_plan_on_a_config_only_folder(capsys, tmp_path):
    folder = _llama_folder(tmp_path / "tiny")
    start = time.perf_counter()
    code, out, err = _cli(capsys, "plan", "--model", folder, "--out", str(tmp_path / "p"), "--n-train", "8",
                          "--n-val", "4", "--target", "mlp")
    assert code == 0, err
    assert time.perf_counter() - start < 10
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert doc["model"]["blocks"] == 3 and doc["targets"]["modules"] == 9
    assert doc["targets"]["shapes"] == {"gate_proj 48x32": 3, "up_proj 48x32": 3, "down_proj 32x48": 3}
    assert any("no tokenizer" in n for n in doc["notes"])


def test_plan_on_a_7b_llama_config_for_a_gpu(capsys, tmp_path):
    folder = _llama_folder(tmp_path / "7b", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                           max_position_embeddings=4096)
    start = time.perf_counter()
    code, out, err = _cli(capsys, "plan", "--model", folder, "--out", str(tmp_path / "p"), "--device", "cuda",
                          "--gpu-memory", "141", "--gpu", "H200", "--n-train", "16", "--n-val", "4")
    assert code == 0, err
    assert time.perf_counter() - start < 10
    doc = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert 6.7e9 < doc["model"]["parameters"] < 6.8e9
    weights = doc["model"]["bytes_by_dtype"]
    assert list(weights) == ["bfloat16"] and 0 <= weights["bfloat16"] - 2 * doc["model"]["parameters"] < 1e6  # buffers
    assert doc["targets"]["shapes"]["q_proj 4096x4096"] == 32
    assert doc["seconds"] > 0 and "estimate" in doc["throughput_source"]
    code, out, err = _cli(capsys, "plan", "--model", folder, "--out", str(tmp_path / "p2"), "--device", "cuda",
                          "--gpu-memory", "141", "--world-size", "4", "--n-train", "16", "--n-val", "4")
    assert code == 0, err
    assert json.loads((tmp_path / "p2" / "plan.json").read_text())["engine"] == "streaming"


def _refused_before_any_weight(capsys, tmp_path, monkeypatch, model: list[str], max_memory: str) -> None:
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    for command in ("plan", "score"):
        code, out, err = _cli(capsys, command, *model, "--out", str(tmp_path / command), "--n-train", "8",
                              "--n-val", "4", "--max-memory", max_memory)
        assert code == 2
        line = err.strip().splitlines()[-1]
        assert "does not fit" in line and "--max-memory" in line and "--mode streaming" in line
        assert "--world-size" in line and "--target" in line
        assert not (tmp_path / command).exists()


def test_an_impossible_budget_is_refused_in_one_line_before_any_weight(capsys, tmp_path, monkeypatch):
    folder = _llama_folder(tmp_path / "tiny")
    make_tokenizer().save_pretrained(folder)  # score reads the tokenizer before it would load the weights
    _refused_before_any_weight(capsys, tmp_path, monkeypatch, ["--model", folder], "0.000001")


@pytest.mark.embedded
def test_an_impossible_budget_on_the_embedded_model_is_refused(capsys, tmp_path, monkeypatch):
    _refused_before_any_weight(capsys, tmp_path, monkeypatch, [], "0.001")


def test_calibration_is_kept_in_the_user_cache_and_times_the_cpu_stages(tmp_path, monkeypatch):
    from layerif.plan import calibrate, calibration_path, throughput

    monkeypatch.setenv("LAYERIF_CACHE", str(tmp_path / "cache"))
    assert throughput("cpu", "H100")[0] is None
    lm, train, val = _setup("llama", seed=8)
    assert make_plan(lm.model, train, val, BIG)["seconds"] is None
    cal = calibrate(hidden=(64,), tokens=(4,))
    assert calibration_path() == tmp_path / "cache" / "calibration.json" and calibration_path().exists()
    (point,) = cal["engine"]
    assert point["hidden"] == 64 and point["tokens_per_batch"] == 32 and point["pass"] > 0 and point["algebra"] > 0
    rates, source = throughput("cpu", "H100", 999, 7.0)  # one point: every shape takes its rates
    assert rates == (point["pass"], point["algebra"]) and "estimate" in source
    doc = make_plan(lm.model, train, val, BIG)
    assert doc["seconds"] == pytest.approx(sum(s["flops"] / (rates[1] if n == "Gram products" else rates[0])
                                               for n, s in doc["stages"].items()))


def test_rates_between_calibrated_shapes_are_weighted_geometric_means():
    """At a calibrated shape its own rates; between two widths, the geometric mean weighted by inverse squared
    log-distance (by hand); outside the grid, the edge's rates."""
    from layerif.plan import interpolate_rates

    pts = [{"hidden": 256, "tokens_per_batch": 64, "pass": 1e9, "algebra": 4e9},
           {"hidden": 1024, "tokens_per_batch": 64, "pass": 16e9, "algebra": 1e9}]
    assert interpolate_rates(pts, 256, 64) == (1e9, 4e9)
    mid = interpolate_rates(pts, 512, 64)  # log-midpoint: equal weights
    assert mid == pytest.approx((4e9, 2e9))
    w1, w2 = 1 / math.log(384 / 256) ** 2, 1 / math.log(1024 / 384) ** 2
    expect = math.exp((w1 * math.log(1e9) + w2 * math.log(16e9)) / (w1 + w2))
    assert interpolate_rates(pts, 384, 64)[0] == pytest.approx(expect)
    assert interpolate_rates(pts, 8192, 10_000) == (16e9, 1e9)  # clamped to the corner point


def test_score_dry_run_is_plan(capsys, tmp_path):
    folder = _llama_folder(tmp_path / "tiny")
    make_tokenizer().save_pretrained(folder)
    code, out, err = _cli(capsys, "score", "--dry-run", "--model", folder, "--out", str(tmp_path / "s"),
                          "--n-train", "8", "--n-val", "4", "--max-memory", "1")
    assert code == 0, err
    doc = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert doc["budget_bytes"] == 1e9 and doc["fits"]
    assert not (tmp_path / "s" / "scores.json").exists()
