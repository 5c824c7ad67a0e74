"""Streaming mode (no per-sample gradient storage) against the materialized engine, and 2-process gloo runs."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from layerif.data import encode_split
from layerif.grads import dense_from_activations, dots, sq_norms, weighted_sum
from layerif.models import LoadedModel, select_targets
from layerif.engine import plan_layouts
from helpers import compute
from layerif.scores import choose_mode
from test_engine import TEXTS


def _setup(family="llama", seed=0, bias=False):
    tok = make_tokenizer()
    lm = LoadedModel(tiny_model(family, seed=seed, bias=bias), tok, family)
    split = lambda texts: encode_split(tok, [{"text": t} for t in texts], "x")[0]  # noqa: E731
    return lm, split(TEXTS[:7]), split(TEXTS[4:])


@pytest.mark.parametrize("family,bias", [("llama", True), ("gpt2", False), ("opt", False)])
def test_batch_statistics_equal_dense(family, bias):
    model = tiny_model(family, bias=bias, seed=3)
    from layerif.models import select_targets

    for t in select_targets(model, "block"):
        g = torch.Generator().manual_seed(1)
        out_f, in_f = (t.module.weight.shape[::-1] if type(t.module).__name__ == "Conv1D" else t.module.weight.shape)
        for T in (1, 3, 40):  # short sequences take the ghost path, long ones the dense path
            x = torch.randn(4, T, in_f, generator=g)
            d = torch.randn(4, T, out_f, generator=g)
            G = dense_from_activations(t.module, x.double(), d.double())
            V = torch.randn(2, t.numel, generator=g)
            r = torch.randn(4, 2, generator=g)
            torch.testing.assert_close(sq_norms(t.module, x, d), (G * G).sum(1), rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(dots(t.module, x, d, V), G @ V.double().T, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(weighted_sum(t.module, x, d, r).double(), r.double().T @ G, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("estimator", ["datainf", "grad-dot"])
@pytest.mark.parametrize("per_val", [False, True])
def test_streaming_equals_materialized(family, estimator, per_val):
    lm, train, val = _setup(family, seed=2)
    a = compute(lm, train, val, "block", estimator, 0.1, per_val=per_val, batch_size=3, mode="materialized")
    b = compute(lm, train, val, "block", estimator, 0.1, per_val=per_val, batch_size=4, mode="streaming", val_chunk=2)
    assert b.meta["mode"] == "streaming" and a.meta["mode"] == "materialized"
    assert b.lambdas == pytest.approx(a.lambdas, rel=1e-5)
    for l in a.layers:
        ref = a.influence[l]
        torch.testing.assert_close(b.influence[l], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


def test_mode_choice():
    assert choose_mode("auto", "datainf", groups=1, world_size=1) == "materialized"
    assert choose_mode("auto", "datainf", groups=4, world_size=1) == "streaming"
    assert choose_mode("auto", "exact", groups=9, world_size=1) == "materialized"
    assert choose_mode("auto", "datainf", groups=1, world_size=2) == "streaming"
    from layerif.errors import UserError

    with pytest.raises(UserError):
        choose_mode("streaming", "exact", 1, 1)


def _worker(rank: int, world: int, port: int, path: str) -> None:
    """One rank, joined the way ``torchrun`` does it (environment variables, then :func:`process_group`)."""
    from layerif.distributed import process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")) as joined:
        assert joined
        lm, train, val = _setup("llama", seed=4)
        res = compute(lm, train, val, "attn", "datainf", 0.1, per_val=True, batch_size=2, mode="auto")
        if rank == 0:
            torch.save({"influence": res.influence, "mode": res.meta["mode"], "loss": res.train_loss}, path)


def test_two_gloo_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, port, path), nprocs=2, join=True)
    got = torch.load(path)
    lm, train, val = _setup("llama", seed=4)
    ref = compute(lm, train, val, "attn", "datainf", 0.1, per_val=True, batch_size=3, mode="materialized")
    assert got["mode"] == "streaming"
    torch.testing.assert_close(got["loss"], ref.train_loss, rtol=1e-6, atol=1e-8)
    for l in ref.layers:
        torch.testing.assert_close(got["influence"][l], ref.influence[l], rtol=1e-4,
                                   atol=1e-6 * float(ref.influence[l].abs().max()))


@pytest.mark.parametrize("mode", ["materialized", "streaming"])
def test_non_finite_gradients_are_reported_not_summed(mode):
    lm, train, val = _setup("llama", seed=5)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite loss for validation record 0; the first non-finite value "
                                                 r"appears in model\.layers\.1\.mlp\.down_proj \(block 1\)"):
        compute(lm, train, val, "attn", "datainf", 0.1, batch_size=3, mode=mode)


@pytest.mark.parametrize("mode", ["streaming", "materialized"])
def test_killed_run_resumes_from_completed_passes(tmp_path, monkeypatch, mode):
    import layerif.engine as engine

    lm, train, val = _setup("gpt2", seed=6)
    kw = dict(target="attn", estimator="datainf", damping_scale=0.1, batch_size=3, mode=mode, cache_dir=tmp_path / "c")
    if mode == "materialized":  # the budget of the largest module (and the Gram scratch): groups of one or two
        kw["max_memory_gb"] = 1.2 * max(plan_layouts(select_targets(lm.model, "attn"), train, val, False)[1].values()) / 1e9
    fresh = compute(lm, train, val, **{**kw, "cache_dir": None})
    module, name = engine, "run_pass"  # the one forward+backward pass of both engines
    real, calls = getattr(module, name), {"n": 0}

    def dies_on_third_pass(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(module, name, dies_on_third_pass)
    with pytest.raises(KeyboardInterrupt):
        compute(lm, train, val, **kw)
    monkeypatch.setattr(module, name, real)
    resumed = compute(lm, train, val, **kw)
    # streaming: validation pass and pass A come from the cache; materialized: the first module
    # group (its validation and train passes)
    assert resumed.passes == fresh.passes - 2
    for l in fresh.layers:
        torch.testing.assert_close(resumed.influence[l], fresh.influence[l])
    # other options: the cache is ignored and rebuilt
    other = compute(lm, train, val, **{**kw, "damping_scale": 0.2})
    assert other.passes == fresh.passes


@pytest.mark.parametrize("mode", ["materialized", "streaming"])
def test_bfloat16_model_accumulates_in_float(mode):
    """A bf16 forward/backward gives float64 influences and float statistics (hooks upcast x and δ),
    close to the float32 model's: only the bf16 rounding of the activations differs."""
    lm, train, val = _setup("llama", seed=4)
    ref = compute(lm, train, val, "attn", "datainf", 0.1, batch_size=4, mode=mode)
    lm.model.to(torch.bfloat16)
    low = compute(lm, train, val, "attn", "datainf", 0.1, batch_size=4, mode=mode)
    assert all(v > 0 and v == v for v in low.lambdas.values())
    for l in ref.layers:
        assert low.influence[l].dtype == torch.float64 and torch.isfinite(low.influence[l]).all()
        rel = float((low.influence[l] - ref.influence[l]).norm() / ref.influence[l].norm())
        assert rel < 0.02, rel  # measured about 0.004
