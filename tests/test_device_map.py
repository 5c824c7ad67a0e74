"""A model spread by an accelerate device map scores exactly like the same model in one piece.

No CPU-only machine has two GPUs, so the closest honest stand-in is used: accelerate's own dispatch
(the `AlignDevicesHook` on every module, the same hooks a multi-GPU map installs) with one block
offloaded to disk, so its weights sit on ``meta`` between calls and each module computes on its hook's
execution device. The engine must take every buffer's device from where a module computes, never from
where its parameters happen to be stored.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import dispatch_model
from safetensors.torch import load_file

from conftest import make_tokenizer, tiny_model
from layerif.cli import main
from layerif.data import encode_pair
from layerif.models import LoadedModel, load_model, select_targets
from helpers import compute

RECORDS = [("the capital of france is", " paris"), ("the capital of italy is", " rome"),
           ("one plus two equals", " three"), ("the capital of spain is", " madrid"), ("two plus two equals", " four")]


@pytest.mark.parametrize("mode", ["materialized", "streaming"])
def test_a_dispatched_model_with_an_offloaded_block_scores_like_the_whole_model(mode, tmp_path):
    tok = make_tokenizer()
    enc = [encode_pair(tok, p, c) for p, c in RECORDS]
    train, val = enc[:3], enc[3:]
    whole = compute(LoadedModel(tiny_model("llama"), tok, "t"), train, val, per_val=True, mode=mode)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    spread = dispatch_model(tiny_model("llama"), device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    offloaded = [t for t in select_targets(spread, "attn") if t.block == 1]
    assert offloaded and all(p.device.type == "meta" for t in offloaded for p in t.module.parameters())
    assert {t.device for t in offloaded} == {torch.device("cpu")}  # the hook's execution device
    got = compute(LoadedModel(spread, tok, "t"), train, val, per_val=True, mode=mode)
    assert got.layers == whole.layers == [0, 1, 2]
    assert got.lambdas == pytest.approx(whole.lambdas, rel=1e-6)
    for layer in whole.layers:
        torch.testing.assert_close(got.influence[layer], whole.influence[layer], rtol=1e-5, atol=0.0)


def test_device_map_auto_through_the_cli_equals_the_plain_run(tiny_model_dir, tmp_path, capsys):
    """The CLI path of ``--device-map`` (on one CPU accelerate places everything on it: a path test)."""
    lm = load_model(str(tiny_model_dir), device="cpu", device_map="auto")
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in RECORDS[3:]))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in RECORDS[:3]))
    common = ["--model", str(tiny_model_dir), "--train", str(train), "--val", str(val), "--device", "cpu",
              "--per-val", "--quiet"]
    assert main(["score", *common, "--device-map", "auto", "--out", str(tmp_path / "mapped")]) == 0
    assert main(["score", *common, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    a, b = (load_file(tmp_path / d / "influence.safetensors") for d in ("mapped", "plain"))
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0.0)
