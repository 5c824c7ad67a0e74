"""torch.distributed through the command line: 2 gloo ranks under torchrun equal one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerif import distributed
from layerif.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _records(tmp_path: Path) -> tuple[Path, Path]:
    words = ("one", "two", "three", "four", "five", "six", "seven")  # 7 train records: shards of 3 and 4
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"the capital of france is paris {w}"}) + "\n" for w in words))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "the capital of italy is", "completion": " rome"},
        {"prompt": "one plus two equals", "completion": " three"},
        {"prompt": "the capital of spain is", "completion": " madrid"})))
    return train, val


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_through_the_cli_equal_one_process(tiny_model_dir, tmp_path, capsys):
    train, val = _records(tmp_path)
    common = ["--model", str(tiny_model_dir), "--train", str(train), "--val", str(val), "--device", "cpu",
              "--per-val", "--batch-size", "2", "--quiet"]
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "layerif", "score", *common, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1  # rank 0 reports; rank 1 computed its shard silently
    assert main(["score", *common, "--mode", "materialized", "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two, one = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("two", "one"))
    assert two["mode"] == "streaming" and one["mode"] == "materialized"
    assert two["layers"] == one["layers"] and two["n_train"] == 7 and two["n_val"] == 3
    assert two["lambda"].keys() == one["lambda"].keys()
    for k in one["lambda"]:
        assert two["lambda"][k] == pytest.approx(one["lambda"][k], rel=1e-5)
    a, b = load_file(tmp_path / "two" / "influence.safetensors"), load_file(tmp_path / "one" / "influence.safetensors")
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].shape == b[k].shape
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5 * float(b[k].abs().max()))
    assert not (tmp_path / "two" / ".layerif-cache").exists()


def test_nccl_groups_communicate_on_this_ranks_gpu(monkeypatch):
    """The device logic NCCL takes, checked without a GPU: the group is cpu:gloo,cuda:nccl on LOCAL_RANK's GPU,
    and every collective runs on that GPU (the gloo test above runs the same code with the CPU as that device)."""
    chosen = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.backend_for(torch.device("cuda")) == "cpu:gloo,cuda:nccl" and chosen == [3]
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "cpu:gloo,cuda:nccl")
    assert distributed.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    assert distributed.comm_device() == torch.device("cpu")


def test_one_process_torchrun_joins_its_group_and_runs_the_collectives(monkeypatch):
    """A 1-process torchrun run (what bench/gpu_check.sh runs on one GPU) is in a group, so its collectives
    go through the backend rather than being skipped."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                     WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    calls = []
    real = distributed.dist.all_gather
    monkeypatch.setattr(distributed.dist, "all_gather", lambda *a, **k: calls.append(1) or real(*a, **k))
    with distributed.process_group(torch.device("cpu")) as joined:
        assert joined and distributed.world() == (0, 1)
        rows = torch.arange(6.0).view(3, 2)
        torch.testing.assert_close(distributed.all_gather_rows(rows), rows)
        torch.testing.assert_close(distributed.all_reduce_sum(rows.clone()), rows)
    assert calls and not distributed.dist.is_initialized()
