"""LoRA-MoE adapter, training loop and the moe / compare-moe commands, on tiny random-weight models."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, make_tokenizer, tiny_model

from layerif import moe
from layerif.commands import compare_moe
from layerif.commands import moe as moe_cmd
from layerif.commands import prune as prune_cmd  # before the tasks fixture stands in a small task module
from layerif.errors import UserError
from layerif.moe import (
    MoeConfig,
    adapter_state,
    apply_lora_moe,
    aux_loss,
    load_adapter,
    moe_layers,
    peft_lora_kwargs,
    peft_rank_pattern,
    read_allocation,
    remove_lora_moe,
    save_adapter,
    target_names,
    trainable_parameters,
)
from layerif.models import weight_out_in
from layerif.train import TrainConfig, train

NO_DROPOUT = MoeConfig(rank=4, alpha=8.0, dropout=0.0, aux_loss_coef=0.0)


def ids(seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every adapter tensor (B included) random values, so the adapter changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_state(model).values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


RECORDS = [
    {"prompt": f"the capital of {c} is", "completion": f" {city}", "options": [" paris", " berlin", " rome", " madrid"],
     "answer": i}
    for i, (c, city) in enumerate([("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid")])
]


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("family, expected", [
    ("llama", ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    ("opt", ["model.decoder.layers.1.self_attn.v_proj", "model.decoder.layers.1.self_attn.q_proj"]),
    ("gpt2", ["transformer.h.1.attn.c_attn"]),  # fused QKV
    ("gpt_neox", ["gpt_neox.layers.1.attention.query_key_value"]),
])
def test_default_targets_are_query_and_value(family, expected):
    names = target_names(tiny_model(family))
    assert len(names) == 3 and names[1] == expected


def test_target_options():
    model = tiny_model("llama")
    assert [n.rsplit(".", 2)[-2:] for n in target_names(model, "attn")[0]] == [
        ["self_attn", "q_proj"], ["self_attn", "k_proj"], ["self_attn", "v_proj"], ["self_attn", "o_proj"]]
    assert [n.rsplit(".", 1)[-1] for n in target_names(model, "mlp")[0]] == ["gate_proj", "up_proj", "down_proj"]
    assert len(target_names(model, "all")[0]) == 7
    assert [n.rsplit(".", 1)[-1] for n in target_names(model, "k_proj, o_proj")[2]] == ["k_proj", "o_proj"]
    assert [n.rsplit(".", 1)[-1] for n in target_names(model, r"mlp\.(up|down)")[0]] == ["up_proj", "down_proj"]
    with pytest.raises(UserError, match="matches no projection"):
        target_names(model, "nothing_here")
    with pytest.raises(UserError, match="valid regex"):
        target_names(model, "q_proj(")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fresh_adapter_leaves_the_model_unchanged_and_remove_restores_it(family):
    model = tiny_model(family)
    x = ids()
    before = logits(model, x)
    apply_lora_moe(model, [2, 3, 1], [2, 2, 1], MoeConfig(rank=4))
    assert torch.equal(logits(model, x), before)  # B = 0
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "router"}
    randomize(model)
    assert not torch.allclose(logits(model, x), before)
    remove_lora_moe(model)
    assert torch.equal(logits(model, x), before)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- routing math


@pytest.mark.parametrize("family, n, k", [("llama", 4, 2), ("llama", 3, 3), ("gpt2", 5, 2), ("llama", 4, 1)])
def test_top_k_routing_equals_a_per_token_loop(family, n, k):
    model = apply_lora_moe(tiny_model(family), [n] * 3, [k] * 3, NO_DROPOUT)
    randomize(model)
    layer = model.get_submodule(target_names(tiny_model(family))[1][0])
    x = torch.randn(2, 5, weight_out_in(layer.base).shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = layer(x)
        base = layer.base(x)
    scale = NO_DROPOUT.alpha / NO_DROPOUT.rank
    A, B, R = layer.lora_A.detach(), layer.lora_B.detach(), layer.router.detach()
    for b in range(2):
        for t in range(5):
            xt = x[b, t]
            p = torch.softmax(R @ xt, dim=0)
            chosen = sorted(range(n), key=lambda e: -p[e])[:k]
            total = sum(p[e] for e in chosen)
            want = base[b, t] + scale * sum((p[e] / total) * (B[e] @ (A[e] @ xt)) for e in chosen)
            torch.testing.assert_close(got[b, t], want, rtol=1e-5, atol=1e-5)


def test_load_balancing_loss_by_hand():
    cfg = MoeConfig(rank=4, alpha=8.0, dropout=0.0, aux_loss_coef=0.5)
    model = apply_lora_moe(tiny_model("llama"), [3, 4, 1], [2, 2, 1], cfg)
    randomize(model)
    inputs: dict[str, torch.Tensor] = {}
    names = list(moe_layers(model))
    hooks = [model.get_submodule(n).base.register_forward_hook(
        lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach())) for n in names]
    x = ids(length=6)
    mask = torch.ones_like(x)
    mask[1, 4:] = 0  # two padding tokens in the second row
    model.train()
    model(input_ids=x, attention_mask=mask)
    for h in hooks:
        h.remove()
    losses = []
    real = mask.reshape(-1).bool()
    for n in names:
        layer = model.get_submodule(n)
        if layer.router is None:
            assert layer.last_aux is None
            continue
        p = torch.softmax(inputs[n].reshape(-1, inputs[n].shape[-1])[real] @ layer.router.detach().t(), dim=-1)
        top = p.topk(2, dim=-1).indices
        frac = torch.stack([(top == e).any(dim=-1).float().sum() for e in range(layer.n_experts)]) / (2 * real.sum())
        want = layer.n_experts * (frac * p.mean(dim=0)).sum()
        torch.testing.assert_close(layer.last_aux.detach(), want)
        losses.append(want)
    torch.testing.assert_close(aux_loss(model).detach(), 0.5 * torch.stack(losses).mean())
    model.eval()
    model(input_ids=x)
    assert aux_loss(model) is None  # eval mode: no auxiliary loss


# ----------------------------------------------------------------------------- equal to PEFT


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_expert_top1_equals_peft_lora(family):
    from peft import LoraConfig, get_peft_model

    ours = apply_lora_moe(tiny_model(family), [1] * 3, [1] * 3, NO_DROPOUT)
    randomize(ours)
    kwargs = peft_lora_kwargs(ours)
    assert kwargs["fan_in_fan_out"] == (family == "gpt2")
    theirs = get_peft_model(tiny_model(family), LoraConfig(**kwargs))
    with torch.no_grad():
        for name, layer in moe_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[0])
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[0])
    x = ids(length=9)
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=1e-5, atol=1e-5)


def test_trainable_parameter_count_and_peft_rank_pattern_ablation():
    from peft import LoraConfig, get_peft_model

    experts, r = [1, 3, 2], 4
    model = apply_lora_moe(tiny_model("llama"), experts, [1, 2, 2], NO_DROPOUT)
    # q_proj: 32 -> 32; v_proj: 32 -> 16 (2 key/value heads of 8)
    dims = [(32, 32), (32, 16)]
    want = sum(n * r * (d_in + d_out) + (n * d_in if n > 1 else 0) for n in experts for d_in, d_out in dims)
    assert trainable_parameters(model) == want
    routers = sum(n * 32 for n in experts if n > 1) * len(dims)
    names = target_names(tiny_model("llama"))
    pattern = peft_rank_pattern(experts, r, names)
    assert pattern == {name: r * experts[l] for l, block in enumerate(names) for name in block}
    ablation = get_peft_model(tiny_model("llama"), LoraConfig(**peft_lora_kwargs(model)))
    assert trainable_parameters(ablation) == want - routers
    for l, block in enumerate(names):
        for name in block:
            peft_layer = ablation.base_model.model.get_submodule(name)
            assert peft_layer.r["default"] == r * experts[l]
            assert peft_layer.scaling["default"] == pytest.approx(NO_DROPOUT.alpha / r)
    with pytest.raises(UserError):
        peft_rank_pattern([1, 2], r, names)


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_reproduces_logits(tmp_path, family):
    model = apply_lora_moe(tiny_model(family), [2, 1, 3], [2, 1, 2], MoeConfig(rank=4, targets="all"), seed=5)
    randomize(model)
    x = ids(length=8)
    want = logits(model, x)
    folder = save_adapter(model, tmp_path / "adapter", {"args": {"allocation": "test"}})
    doc = read_allocation(folder)
    assert doc["layers"] == [0, 1, 2] and doc["experts"] == [2, 1, 3] and doc["top_k"] == [2, 1, 2]
    assert doc["args"] == {"allocation": "test"} and doc["adapter"]["targets"] == "all"
    loaded = load_adapter(tiny_model(family), folder)
    assert torch.equal(logits(loaded, x), want)
    save_adapter(loaded, folder, overwrite=True)  # overwriting an earlier adapter folder is allowed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_bad_adapter_input(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(UserError, match="3 blocks"):
        apply_lora_moe(model, [2, 2], [2, 2])
    with pytest.raises(UserError, match="top-3"):
        apply_lora_moe(model, [2, 2, 2], [2, 3, 2])
    with pytest.raises(UserError, match="rank"):
        apply_lora_moe(model, [1, 1, 1], [1, 1, 1], MoeConfig(rank=0))
    assert not hasattr(model, "_layerif_lora_moe") and all(p.requires_grad for p in model.parameters())
    apply_lora_moe(model, [1, 2, 1], [1, 2, 1])
    folder = save_adapter(model, tmp_path / "a")
    with pytest.raises(UserError, match="another model"):
        load_adapter(tiny_model("llama", n_layers=4), folder)
    with pytest.raises(UserError, match="another model"):
        load_adapter(tiny_model("llama"), _with_other_targets(folder, tmp_path / "b"))
    with pytest.raises(UserError, match="not a LoRA-MoE adapter folder"):
        load_adapter(tiny_model("llama"), tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not an earlier adapter folder"):
        save_adapter(model, tmp_path / "other")


def _with_other_targets(folder: Path, dest: Path) -> Path:
    """A copy of an adapter folder whose allocation.json claims other target modules."""
    import shutil

    shutil.copytree(folder, dest)
    doc = json.loads((dest / "allocation.json").read_text())
    doc["adapter"]["targets"] = "mlp"
    (dest / "allocation.json").write_text(json.dumps(doc))
    return dest


# ----------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_is_reproducible(tokenizer):
    from layerif.data import collate, encode, per_sample_loss

    batch = collate([encode(tokenizer, r) for r in RECORDS], tokenizer.pad_token_id)

    def completion_loss(model) -> float:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return float(per_sample_loss(out.logits, batch["labels"]).mean())

    def run(seed: int) -> tuple[list[float], float, float]:
        model = apply_lora_moe(tiny_model("llama"), [2, 3, 1], [2, 2, 1], MoeConfig(rank=4, dropout=0.1), seed=seed)
        before = completion_loss(model)
        cfg = TrainConfig(steps=20, batch_size=2, lr=5e-2, warmup=0.2, seed=seed)
        losses = train(model, tokenizer, RECORDS, cfg, extra_loss=lambda: aux_loss(model)).losses
        return losses, before, completion_loss(model)

    losses, before, after = run(0)
    assert len(losses) == 20
    assert after < before - 0.2
    assert sum(losses[-5:]) < sum(losses[:5])
    assert run(0)[0] == losses
    assert run(1)[0] != losses


def test_gradient_accumulation_equals_one_large_batch(tokenizer):
    def run(batch_size: int, grad_accum: int):
        model = apply_lora_moe(tiny_model("llama"), [2, 3, 1], [2, 2, 1], NO_DROPOUT)
        records = RECORDS + [{"prompt": "one plus two equals", "completion": " three"}]  # unequal lengths
        cfg = TrainConfig(steps=3, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup=0.0)
        return train(model, tokenizer, records, cfg).losses, adapter_state(model)

    big, state_big = run(4, 1)
    small, state_small = run(2, 2)
    assert small == pytest.approx(big, rel=1e-5)
    for k in state_big:
        torch.testing.assert_close(state_small[k], state_big[k], rtol=1e-4, atol=1e-6)


def test_training_bad_input(tokenizer):
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="no trainable parameters"):
        train(model, tokenizer, RECORDS, TrainConfig(steps=1))
    apply_lora_moe(model, [1, 1, 1], [1, 1, 1])
    with pytest.raises(UserError, match="--steps"):
        train(model, tokenizer, RECORDS, TrainConfig(steps=0))
    with pytest.raises(UserError, match="--warmup"):
        train(model, tokenizer, RECORDS, TrainConfig(warmup=2.0))
    with pytest.raises(UserError, match="split is empty"):
        train(model, tokenizer, [], TrainConfig(steps=1))


# ----------------------------------------------------------------------------- commands


def fake_tasks_module() -> types.ModuleType:
    """A stand-in for layerif.tasks: get_task(name).split(split, n, seed, allow_repeats) -> multiple-choice records."""
    mod = types.ModuleType("layerif.tasks")

    class Task:
        name = "capitals"

        def split(self, split, n, seed, allow_repeats=False):
            return [RECORDS[(i + seed) % 4] for i in range(n)]

    def get_task(name, include=None):
        if name != "capitals":
            raise UserError(f"unknown task {name!r}")
        return Task()

    mod.get_task = get_task
    return mod


@pytest.fixture
def tasks(monkeypatch):
    monkeypatch.setitem(sys.modules, "layerif.tasks", fake_tasks_module())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", n_layers=3).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return str(folder)


def write_scores(path: Path, score: list[float], model: str = "tiny") -> str:
    path.write_text(json.dumps({"model": model, "task": "capitals", "target": "attn", "estimator": "datainf",
                                "layers": list(range(len(score))), "score": score}))
    return str(path)


def write_validation(folder: Path, gains: list[float], model: str = "tiny") -> str:
    """A validation folder whose validation.json holds the measured fine-tune gain per block (the gain metric)."""
    folder.mkdir()
    (folder / "validation.json").write_text(json.dumps({"model": model, "task": "capitals", "target": "attn",
                                                        "layers": list(range(len(gains))), "fine_tune_gain": gains}))
    return str(folder)


SMALL = dict(n_train=8, n_test=4, steps=3, batch_size=4, rank=2, eval_batch_size=8, max_new_tokens=2, device="cpu")


def test_moe_command_saves_a_loadable_adapter(tasks, model_dir, tmp_path):
    from layerif.models import load_model

    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5])
    args = moe_cmd.MoeArgs(model=model_dir, scores=scores, total_experts=9, save=str(tmp_path / "adapter"), **SMALL)
    summary = moe_cmd.run(args)
    assert "allocation layerif" in summary and "accuracy" in summary and "exact match" in summary
    doc = read_allocation(tmp_path / "adapter")
    assert sum(doc["experts"]) == 9 and doc["experts"][1] == max(doc["experts"]) and doc["experts"][0] == 1
    assert doc["top_k"] == [1 if n == 1 else 2 for n in doc["experts"]]
    assert doc["args"]["allocation"] == "layerif" and len(doc["result"]["losses"]) == 3
    assert set(doc["peft"]["rank_pattern"].values()) == {2 * n for n in doc["experts"]}
    lm = load_model(model_dir, device="cpu")
    x = ids()
    base = logits(lm.model, x)
    load_adapter(lm.model, tmp_path / "adapter")
    assert not torch.allclose(logits(lm.model, x), base)  # the trained adapter is back


@pytest.mark.parametrize("allocation", ["alpha", "uniform"])
def test_moe_command_baselines_need_no_scores(tasks, model_dir, allocation):
    summary = moe_cmd.run(moe_cmd.MoeArgs(model=model_dir, task="capitals", allocation=allocation, **SMALL))
    assert f"allocation {allocation}" in summary and "T=15" in summary  # default T = 5 × blocks


def test_compare_moe_writes_the_table_and_plot(tasks, model_dir, tmp_path):
    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5])
    out = tmp_path / "cmp"
    args = compare_moe.CompareMoeArgs(model=model_dir, scores=scores, out=str(out), **{**SMALL, "steps": 2})
    md = compare_moe.run(args)
    assert {p.name for p in out.iterdir()} >= {"comparison.csv", "comparison.md", "experts_per_layer.png",
                                               "allocations.json", "config.json", "report.md", "report.html"}
    rows = (out / "comparison.csv").read_text().splitlines()
    assert rows[0] == "allocation,beta,seed,accuracy,exact_match,final_loss,trainable_params,seconds"
    assert len(rows) == 1 + 1 + 4 * 3  # header, base, 4 allocations × 3 seeds
    assert rows[2].startswith("layerif,2.5,0,") and rows[5].startswith("uniform,-,0,")  # one β: labels unchanged
    for a in ("layerif", "layerif-reversed", "alpha", "uniform"):
        assert f"| {a} |" in md
    assert any(v in md for v in ("LayerIF has the best", "LayerIF ties", "LayerIF does not win", "No allocation wins"))
    allocs = json.loads((out / "allocations.json").read_text())
    assert allocs["layerif-reversed"]["experts"] != allocs["layerif"]["experts"]
    assert all(sum(a["experts"]) == 15 for a in allocs.values())


@pytest.mark.parametrize("accuracy, verdict", [
    ({"layerif": 0.9, "uniform": 0.8}, "LayerIF has the best mean accuracy, 0.1000 above the next best"),
    ({"layerif": 0.7, "uniform": 0.8},
     "LayerIF does not win: uniform has the best mean accuracy, 0.1000 above LayerIF"),
    ({"layerif": 0.8, "uniform": 0.8, "alpha": 0.5}, "LayerIF ties for the best mean accuracy with uniform"),
    ({"layerif": 0.8, "uniform": 0.8}, "No allocation wins"),
    ({"layerif@β=1": 0.9, "layerif@β=0": 0.8, "uniform": 0.8},
     "LayerIF@β=1 has the best mean accuracy, 0.1000 above the next best"),
])
def test_comparison_verdict_is_honest(accuracy, verdict):
    import numpy as np

    rows = [{"allocation": "base", "seed": "-", "accuracy": 0.5, "exact_match": 0.0}]
    rows += [{"allocation": a, "seed": str(seed), "accuracy": acc + 0.01 * (seed - 1), "exact_match": 0.0,
              "final_loss": 1.0, "trainable_params": 10, "seconds": 1.0}
             for a, acc in accuracy.items() for seed in range(3)]
    md = compare_moe.markdown(rows, {a: np.array([1, 2]) for a in accuracy}, {"model": "m"})
    assert verdict in md
    assert f"| {max(accuracy, key=accuracy.get)} | **" in md  # the best mean accuracy is bold


@pytest.mark.parametrize("kw, message", [
    (dict(total_experts=2), "smaller than the number of blocks"),
    (dict(beta=-1.0), "beta"),
    (dict(allocation="spectral"), "unknown allocation"),
    (dict(scores=None), "needs --scores"),
    (dict(scores="four"), "scores file for another model"),
    (dict(reverse=True, allocation="uniform"), "--reverse"),
    (dict(steps=0), "--steps"),
    (dict(task="nope"), "unknown task"),
    (dict(allocation="gain"), "needs --validation"),
    (dict(allocation="gain", validation="four"), "measured blocks"),
])
def test_moe_command_bad_input(tasks, model_dir, tmp_path, kw, message):
    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5])
    if kw.get("scores") == "four":
        kw["scores"] = write_scores(tmp_path / "four.json", [0.1, 2.0, 0.5, 1.0])
    if kw.get("validation") == "four":
        kw["validation"] = write_validation(tmp_path / "four", [0.1, 0.9, 0.3, 0.2])
    with pytest.raises(UserError, match=message):
        moe_cmd.run(moe_cmd.MoeArgs(model=model_dir, **{"scores": scores, **SMALL, **kw}))


def test_cli_one_line_error_and_exit_2(tasks, model_dir, tmp_path, monkeypatch, capsys):
    from layerif import cli

    monkeypatch.setattr(cli, "load_commands", lambda: None)  # only the moe commands (imported above): the stand-in tasks
    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5, 1.0])
    assert cli.main(["moe", "--model", model_dir, "--scores", scores, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' own loading bar may come first)
    assert err.startswith("layerif moe: error:") and "scores file for another model" in err
    assert cli.main(["moe", "--model", model_dir, "--allocation", "spectral", "--quiet"]) == 2
    assert "unknown allocation 'spectral'" in capsys.readouterr().err.strip().splitlines()[-1]
    ns = cli.make_parser().parse_args(["compare-moe", "--allocations", "uniform,alpha", "--seeds", "0,1,2"])
    args = cli.build_args(compare_moe.CompareMoeArgs, ns)
    assert args.allocations == ["uniform", "alpha"] and args.seeds == ["0", "1", "2"]


# ----------------------------------------------------------------------------- gain allocation and β sweep


def test_gain_allocation_by_hand(tasks, model_dir, tmp_path):
    from layerif.allocate import allocate_experts

    gains = [0.1, 0.9, 0.3]
    # w = (g − min g)^1 = [0, 0.8, 0.2]; T − L = 6 units: quotas [0, 4.8, 1.2] → ⌊⌋ = [0, 4, 1], the missing unit to
    # the largest fractional part (block 1) → [0, 5, 1]; plus the one expert every block has:
    want = [1, 6, 2]
    assert allocate_experts("gain", gains, 3, 9, beta=1.0).tolist() == want
    folder = write_validation(tmp_path / "val", gains)
    summary = moe_cmd.run(moe_cmd.MoeArgs(model=model_dir, task="capitals", allocation="gain", validation=folder,
                                          total_experts=9, beta=1.0, save=str(tmp_path / "adapter"), **SMALL))
    assert "allocation gain" in summary and "g_l" in summary
    doc = read_allocation(tmp_path / "adapter")
    assert doc["experts"] == want and doc["metric"] == pytest.approx(gains)
    assert doc["args"]["validation"] == folder


def test_arms_of_a_beta_sweep():
    assert compare_moe.arms_of(["layerif", "uniform"], [2.5]) == {"layerif": ("layerif", 2.5), "uniform": ("uniform", None)}
    arms = compare_moe.arms_of(["layerif-reversed", "uniform", "gain"], [0.0, 1.0, 0.125])
    assert list(arms) == ["layerif-reversed@β=0", "layerif-reversed@β=1", "layerif-reversed@β=0.125", "uniform",
                          "gain@β=0", "gain@β=1", "gain@β=0.125"]
    assert all(compare_moe.allocation_of(a) == alloc for a, (alloc, _) in arms.items())
    assert compare_moe.number(1 / 3) == repr(1 / 3)  # a label reads back as its β


def test_compare_moe_beta_sweep(tasks, model_dir, tmp_path, monkeypatch):
    calls = []

    def counting_fit(s, args, experts, seed):
        calls.append((tuple(experts.tolist()), seed))
        return moe_cmd.fit(s, args, experts, seed)

    monkeypatch.setattr(compare_moe, "fit", counting_fit)
    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5])
    out = tmp_path / "cmp"
    args = compare_moe.CompareMoeArgs(model=model_dir, scores=scores, validation=write_validation(tmp_path / "val", [0.1, 0.3, 0.9]),
                                      allocations=["layerif", "gain", "uniform"], betas=["0", "1"], seeds=["0"],
                                      out=str(out), **{**SMALL, "steps": 2})
    md = compare_moe.run(args)
    allocs = json.loads((out / "allocations.json").read_text())
    assert list(allocs) == ["layerif@β=0", "layerif@β=1", "gain@β=0", "gain@β=1", "uniform"]
    assert allocs["layerif@β=0"]["experts"] == allocs["gain@β=0"]["experts"] == allocs["uniform"]["experts"] == [5, 5, 5]
    assert allocs["layerif@β=1"]["experts"] == [1, 11, 3] and allocs["gain@β=1"]["experts"] == [1, 3, 11]
    assert {sum(a["experts"]) for a in allocs.values()} == {15}  # equal budgets
    assert allocs["layerif@β=1"]["beta"] == 1.0 and allocs["uniform"]["beta"] is None
    assert sorted(calls) == sorted([((5, 5, 5), 0), ((1, 11, 3), 0), ((1, 3, 11), 0)])  # β = 0 runs are uniform's
    import csv

    rows = {r["allocation"]: r for r in csv.DictReader((out / "comparison.csv").open(encoding="utf-8"))}
    assert [rows[a]["beta"] for a in allocs] == ["0", "1", "0", "1", "-"]
    for a in ("layerif@β=0", "gain@β=0"):  # β = 0 is uniform
        assert {k: rows[a][k] for k in ("accuracy", "exact_match", "final_loss")} == \
            {k: rows["uniform"][k] for k in ("accuracy", "exact_match", "final_loss")}
    items = json.loads((out / "items.json").read_text())
    assert set(items) == {"base|-", *(f"{a}|0" for a in allocs)}
    assert "β = 0, 1" in md and "layerif@β=0 has the expert counts of uniform" in md
    for subject, ref in (("layerif@β=1", "uniform"), ("gain@β=1", "uniform"), ("layerif@β=1", "gain@β=1")):
        assert f"| test items | accuracy | {subject} | {ref}" in md
    assert "LayerIF@β=1 " in md or "No allocation wins" in md  # a verdict on each LayerIF arm


@pytest.mark.parametrize("argv, message", [
    (["moe", "--allocation", "gain"], "the gain metric needs --validation"),
    (["compare-moe", "--allocations", "gain,uniform"], "the gain metric needs --validation"),
    (["moe", "--allocation", "gain", "--validation", "no/such/validation.json"], "not found"),
    (["compare-moe", "--allocations", "uniform", "--validation", "SCORES"], "is not a layerif validation.json"),
    (["compare-moe", "--allocations", "layerif,uniform", "--scores", "SCORES", "--betas", "0,-1"], "beta -1"),
])
def test_gain_and_beta_inputs_fail_in_one_line_before_the_model_loads(tasks, model_dir, tmp_path, monkeypatch, capsys,
                                                                      argv, message):
    from layerif import cli, models

    monkeypatch.setattr(cli, "load_commands", lambda: None)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    scores = write_scores(tmp_path / "scores.json", [0.1, 2.0, 0.5])
    argv = [scores if a == "SCORES" else a for a in argv]
    assert cli.main([*argv, "--model", model_dir, "--out" if argv[0] == "compare-moe" else "--seed",
                     str(tmp_path / "out") if argv[0] == "compare-moe" else "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"layerif {argv[0]}: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_new_allocation_with_a_new_metric_is_one_registration(tasks, model_dir, tmp_path, monkeypatch):
    """An allocation whose metric is of a new kind (here: the mean |W| of each block's projections) is one
    registration that carries its measurement; prune and moe measure it through the same function."""
    import numpy as np

    from layerif import allocate
    from layerif.models import iter_projections, load_model

    monkeypatch.setitem(allocate.ALLOCATIONS, "norm", allocate.Allocation(
        "norm", "weight-norm",
        measure=lambda s: np.array([float(torch.cat([p.module.weight.detach().abs().flatten()
                                                     for p in iter_projections(s.model) if p.block == l]).mean())
                                    for l in range(3)]),
        sparsity=lambda m, target, w, o, rev: allocate.linear_sparsity(m, target, o.epsilon, w),
        experts=lambda m, n, total, beta, rev: allocate.layerif_experts(m, total, beta)))

    model = load_model(model_dir, device="cpu").model
    want = []  # the metric by a plain loop over the weights
    for l in range(3):
        total, count = 0.0, 0
        for name, param in model.named_parameters():
            if f"layers.{l}." in name and name.endswith("proj.weight"):
                total += float(param.detach().abs().double().sum())
                count += param.numel()
        want.append(total / count)
    prune_cmd.run(prune_cmd.PruneArgs(model=model_dir, device="cpu", allocation="norm", method="magnitude", sparsity=0.5,
                                      n_calib=2, seqlen=16, save=str(tmp_path / "pruned")))
    pruned = json.loads((tmp_path / "pruned" / "allocation.json").read_text())
    assert pruned["metric"] == pytest.approx(want, rel=1e-5)
    assert np.average(pruned["sparsity"], weights=pruned["prunable_params"]) == pytest.approx(0.5)
    assert list(np.argsort(pruned["sparsity"])) == list(np.argsort(want))  # the linear map keeps the metric's order
    moe_cmd.run(moe_cmd.MoeArgs(model=model_dir, task="capitals", allocation="norm", total_experts=9,
                                save=str(tmp_path / "adapter"), **SMALL))
    doc = read_allocation(tmp_path / "adapter")
    assert doc["metric"] == pytest.approx(want, rel=1e-5) and sum(doc["experts"]) == 9
    # LayerIF's expert map: w_l = (m_l − min m)^β, so the block of the least metric keeps its one expert only
    assert np.argmax(doc["experts"]) == np.argmax(want) and doc["experts"][int(np.argmin(want))] == 1
