"""The scoring engine against independent computations: one-sample backward, plain loops, dense solves."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from layerif.data import encode, encode_split
from layerif.engine import per_sample_grads
from helpers import compute, factored_from_batches, flat_params, module_influence, stats_from_grads
from layerif.influence import damping
from layerif.models import LoadedModel, find_blocks, select_targets
from layerif.engine import plan_layouts
from layerif.scores import aggregate

TEXTS = [
    "the capital of france is paris",
    "one plus two equals three",
    "the cat was in the house with a dog",
    "four plus five equals nine .",
    "is this the answer ? yes",
    "the capital of italy is rome , the capital of spain is madrid",
    "seven eight nine ten",
    "a word , a letter , a number",
]


def one_sample_grads(model, tokenizer, text, targets):
    """Reference: one sample's mean next-token cross-entropy (in the model's dtype), plain backward, param.grad."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:])
    loss.backward()
    out = {t.name: torch.cat([p.grad.flatten() for p in t.module.parameters(recurse=False)]).clone() for t in targets}
    model.zero_grad(set_to_none=True)
    return out, float(loss.detach())


@pytest.mark.parametrize("family,bias", [("llama", False), ("llama", True), ("gpt2", False), ("opt", False)])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_per_sample_grads_equal_one_sample_backward(tokenizer, family, bias, batch_size):
    model = tiny_model(family, bias=bias, seed=1)
    targets = select_targets(model, "block")
    recs = [encode(tokenizer, {"text": t}) for t in TEXTS]
    grads, losses = per_sample_grads(model, targets, recs, tokenizer.pad_token_id, batch_size=batch_size)
    for i, text in enumerate(TEXTS):
        ref, ref_loss = one_sample_grads(model, tokenizer, text, targets)
        assert losses[i] == pytest.approx(ref_loss, rel=1e-5)
        for t in targets:
            torch.testing.assert_close(grads[t.name][i], ref[t.name], rtol=1e-4, atol=1e-6)


def test_prompt_completion_loss_only_on_completion(tokenizer):
    model = tiny_model("llama", seed=2)
    targets = select_targets(model, "attn")
    rec = {"prompt": "the capital of france is", "completion": " paris"}
    enc = encode(tokenizer, rec)
    grads, losses = per_sample_grads(model, targets, [enc], tokenizer.pad_token_id)
    ids = torch.tensor([enc.input_ids])
    labels = torch.tensor([enc.labels])
    for p in model.parameters():
        p.requires_grad_(True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert float(losses[0].detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    for t in targets:
        torch.testing.assert_close(grads[t.name][0], t.module.weight.grad.flatten(), rtol=1e-4, atol=1e-6)


def test_flat_params_order_matches_gradient_order():
    model = tiny_model("gpt2")
    t = select_targets(model, "attn")[0]
    assert flat_params(t.module).numel() == t.numel


# ----------------------------------------------------------------------------- estimators vs plain loops


def datainf_loop(G: torch.Tensor, v: torch.Tensor, c: float) -> torch.Tensor:
    """The DataInf formula as written, one sample at a time (float64)."""
    n, d = G.shape
    lam = c * sum(float(G[i] @ G[i]) / d for i in range(n)) / n
    h = torch.zeros(d, dtype=torch.float64)
    for j in range(n):
        gj = G[j]
        h += v - (v @ gj) / (lam + gj @ gj) * gj
    h /= n * lam
    return torch.stack([-(h @ G[i]) for i in range(n)])


def exact_dense(G: torch.Tensor, v: torch.Tensor, c: float) -> torch.Tensor:
    """(G^T G / n + lambda I)^-1 v by a dense d x d solve."""
    n, d = G.shape
    lam = c * float((G * G).sum(1).mean()) / d
    H = G.T @ G / n + lam * torch.eye(d, dtype=torch.float64)
    h = torch.linalg.solve(H, v)
    return -(G @ h)


@pytest.mark.parametrize("n,d,k", [(5, 3, 1), (7, 40, 1), (12, 9, 4), (3, 100, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [0.1, 1.0])
def test_estimators_equal_reference(n, d, k, seed, c):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    V = torch.randn(k, d, generator=g, dtype=torch.float64)
    stats = stats_from_grads(G, V)
    lam = damping(stats, c)
    assert lam == pytest.approx(c * float((G * G).sum(1).mean()) / d, rel=1e-12)
    di = module_influence(stats, "datainf", lam)
    ex = module_influence(stats, "exact", lam)
    gd = module_influence(stats, "grad-dot", lam)
    for j in range(k):
        torch.testing.assert_close(di[:, j], datainf_loop(G, V[j], c), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ex[:, j], exact_dense(G, V[j], c), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(gd[:, j], -(G @ V[j]), rtol=1e-12, atol=1e-12)


def test_datainf_is_exact_for_one_sample():
    """With n = 1, DataInf's rank-one inverse is the exact Sherman-Morrison inverse."""
    G = torch.randn(1, 6, dtype=torch.float64)
    v = torch.randn(6, dtype=torch.float64)
    s = stats_from_grads(G, v)
    lam = damping(s, 0.3)
    torch.testing.assert_close(module_influence(s, "datainf", lam), module_influence(s, "exact", lam))


# ----------------------------------------------------------------------------- end to end on a tiny model


def _lm(family="llama", seed=0):
    return LoadedModel(model=tiny_model(family, seed=seed), tokenizer=make_tokenizer(), name=f"tiny-{family}")


def _split(tok, texts):
    return encode_split(tok, [{"text": t} for t in texts], "x")[0]


def reference_layer_influence(lm, train_texts, val_texts, target, estimator, c):
    """Plain reference: one-sample backward for every record, the formulas per module, summed per block."""
    targets = select_targets(lm.model, target)
    tr = [one_sample_grads(lm.model, lm.tokenizer, t, targets)[0] for t in train_texts]
    va = [one_sample_grads(lm.model, lm.tokenizer, t, targets)[0] for t in val_texts]
    out: dict[int, torch.Tensor] = {}
    for t in targets:
        G = torch.stack([g[t.name] for g in tr]).double()
        v = torch.stack([g[t.name] for g in va]).double().sum(0)
        I = datainf_loop(G, v, c) if estimator == "datainf" else exact_dense(G, v, c)
        out[t.block] = out.get(t.block, 0) + I
    return out


@pytest.mark.parametrize("family,target,estimator", [("llama", "attn", "datainf"), ("gpt2", "block", "datainf"),
                                                     ("qwen2", "mlp", "exact")])
def test_compute_equals_plain_reference(family, target, estimator):
    lm = _lm(family)
    train, val = TEXTS[:6], TEXTS[6:]
    res = compute(lm, _split(lm.tokenizer, train), _split(lm.tokenizer, val), target, estimator, 0.1, batch_size=4)
    ref = reference_layer_influence(lm, train, val, target, estimator, 0.1)
    assert res.layers == sorted(ref)
    for l in res.layers:
        torch.testing.assert_close(res.influence[l], ref[l], rtol=2e-4, atol=1e-7)
        s = float(-torch.clamp(ref[l], max=0).sum())
        assert res.score[res.layers.index(l)] == pytest.approx(s, rel=2e-4, abs=1e-9)


@pytest.mark.parametrize("family,target", [("llama", "attn"), ("gpt2", "block")])
@pytest.mark.parametrize("mode", ["materialized", "streaming"])
def test_float64_model_equals_plain_reference_to_rounding(family, target, mode):
    """In float64 the batched engine and the one-sample loops agree to ~1e-12: any float32 gap is rounding."""
    lm = _lm(family, seed=7)
    lm.model.double()
    train, val = TEXTS[:6], TEXTS[6:]
    res = compute(lm, _split(lm.tokenizer, train), _split(lm.tokenizer, val), target, "datainf", 0.1,
                  batch_size=4, mode=mode)
    ref = reference_layer_influence(lm, train, val, target, "datainf", 0.1)
    for l in res.layers:
        torch.testing.assert_close(res.influence[l], ref[l], rtol=1e-9, atol=1e-9 * float(ref[l].abs().max()))


def test_per_val_summed_equals_default_and_multi_pass_equals_single_pass():
    lm = _lm("llama", seed=3)
    train, val = _split(lm.tokenizer, TEXTS[:6]), _split(lm.tokenizer, TEXTS[5:])
    base = compute(lm, train, val, "block", "datainf", 0.1, batch_size=4)
    pv = compute(lm, train, val, "block", "datainf", 0.1, per_val=True, batch_size=3)
    one_module = max(plan_layouts(select_targets(lm.model, "block"), train, val, False)[1].values()) / 1e9
    tiny_budget = compute(lm, train, val, "block", "datainf", 0.1, batch_size=2, max_memory_gb=1.2 * one_module,
                          mode="materialized")
    assert tiny_budget.passes > base.passes
    for l in base.layers:
        assert pv.influence[l].shape == (len(val), len(train))
        torch.testing.assert_close(pv.influence[l].sum(0), base.influence[l], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(tiny_budget.influence[l], base.influence[l], rtol=1e-6, atol=1e-10)
    assert pv.score == pytest.approx(base.score, rel=1e-6)


def test_padding_and_batch_size_invariance():
    lm = _lm("gpt2", seed=4)
    train, val = _split(lm.tokenizer, TEXTS[:6]), _split(lm.tokenizer, TEXTS[6:])
    runs = [compute(lm, train, val, "attn", "exact", 0.1, batch_size=b) for b in (1, 4, 6)]
    for r in runs[1:]:
        for l in r.layers:
            torch.testing.assert_close(r.influence[l], runs[0].influence[l], rtol=1e-5, atol=1e-9)


def test_aggregations():
    agg = aggregate(torch.tensor([-1.0, 2.0, -0.5, 0.0], dtype=torch.float64))
    assert agg == {"helpful": 1.5, "sum": 0.5, "mean_abs": 0.875, "helpful_share": 0.5}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "opt", "gpt_neox"])
def test_layer_discovery(family):
    model = tiny_model(family, n_layers=3)
    prefix, blocks = find_blocks(model)
    assert len(blocks) == 3
    attn = select_targets(model, "attn")
    mlp = select_targets(model, "mlp")
    block = select_targets(model, "block")
    assert {t.block for t in attn} == {0, 1, 2} and {t.block for t in mlp} == {0, 1, 2}
    assert len(block) == len(attn) + len(mlp)
    assert all(t.name.startswith(prefix) for t in block)
    expected_attn = {"llama": 4, "mistral": 4, "qwen2": 4, "gpt2": 2, "opt": 4, "gpt_neox": 2}[family]
    assert len(attn) == 3 * expected_attn


@pytest.mark.parametrize("family,bias", [("llama", True), ("gpt2", False), ("opt", False)])
def test_factored_gram_equals_dense(tokenizer, family, bias):
    from layerif.grads import capture, dense_from_activations, gram, losses_and_backward
    from layerif.data import collate

    model = tiny_model(family, bias=bias, seed=5)
    targets = select_targets(model, "block")
    recs = [encode(tokenizer, {"text": t}) for t in TEXTS]
    dense = {t.name: [] for t in targets}
    parts = {t.name: [] for t in targets}
    for chunk in (recs[:3], recs[3:]):
        batch = collate(chunk, tokenizer.pad_token_id)

        def sink(t, x, d, mask=batch["attention_mask"]):
            dense[t.name].append(dense_from_activations(t.module, x, d))
            parts[t.name].append((x, d, mask))

        with capture(model, targets, sink):
            losses_and_backward(model, batch)
    for t in targets:
        G = torch.cat(dense[t.name])
        F = factored_from_batches(t.module, parts[t.name], len(recs))
        v = torch.randn(3, t.numel)
        for got, ref in ((gram(F, F), gram(G, G)), (gram(F, v), gram(G, v)), (gram(v, F), gram(v, G)),
                         (gram(F, F, scratch_bytes=0), gram(G, G)), (gram(F, v, scratch_bytes=0), gram(G, v)),
                         (gram(G, G, scratch_bytes=0), gram(G, G))):  # scratch 0: one token / column a chunk
            # dense G is formed in float32, the factored Gram in float64
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("per_val", [False, True])
def test_factored_layout_equals_dense_layout(per_val):
    lm = _lm("gpt2", seed=6)
    train, val = _split(lm.tokenizer, TEXTS[:6]), _split(lm.tokenizer, TEXTS[5:])
    a = compute(lm, train, val, "block", "exact", 0.1, per_val=per_val, batch_size=4, layout="dense")
    b = compute(lm, train, val, "block", "exact", 0.1, per_val=per_val, batch_size=3, layout="factored")
    for l in a.layers:
        torch.testing.assert_close(a.influence[l], b.influence[l], rtol=1e-4, atol=1e-6 * float(a.influence[l].abs().max()))


def test_lora_target_after_finetuning_equals_reference():
    from layerif.lora import prepare_lora

    lm = _lm("llama", seed=7)
    train, val = TEXTS[:6], TEXTS[6:]
    lm = prepare_lora(lm, _split(lm.tokenizer, train), ["q_proj", "v_proj"], rank=2, steps=5, lr=1e-2, batch_size=3, seed=0)
    targets = select_targets(lm.model, "lora")
    assert len(targets) == 3 * 2 * 2  # blocks x (q, v) x (A, B)
    assert all(float(t.module.weight.abs().sum()) > 0 for t in targets)
    res = compute(lm, _split(lm.tokenizer, train), _split(lm.tokenizer, val), "lora", "datainf", 0.1, batch_size=4)
    ref = reference_layer_influence(lm, train, val, "lora", "datainf", 0.1)
    for l in res.layers:
        torch.testing.assert_close(res.influence[l], ref[l], rtol=2e-4, atol=1e-8)
