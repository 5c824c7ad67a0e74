"""Finite-difference test of the sign and scale of the influences.

The project's convention (README, :mod:`layerif.influence`): I_l(i) < 0 means that
up-weighting train sample i *lowers* the (summed) validation loss through block l.
Each estimator is the first-order effect of one optimisation step on the
up-weighted objective, restricted to block l's targeted modules:

* ``grad-dot``: one SGD step with learning rate eta on eps * loss_i:
  theta' = theta - eta * eps * g_i, so L_val(theta') - L_val(theta) ~ eta * eps * I_l(i);
* ``exact``: one damped Newton step, theta' = theta - eps * H_m^-1 g_im per module m,
  H_m = G_m^T G_m / n + lambda_m I with the estimator's own damping
  lambda_m = c * mean_i ||g_im||^2 / d_m, so the change is ~ eps * I_l(i);
* ``datainf``: the same with DataInf's preconditioner (1/n) sum_j (g_jm g_jm^T + lambda_m I)^-1.

Here the step is taken for real on a tiny float64 GPT-2 (plain one-sample
backward for the gradients, dense d x d matrices, a plain loop for the
validation loss) and the measured change is compared with eps * I from
:func:`layerif.scores.compute`. (GPT-2 because its LayerNorm runs in the model's
dtype; Llama's RMSNorm computes in float32 even in a float64 model, which puts a
1e-8 noise floor under the loss differences.) A global sign flip in the estimators makes the
measured and predicted changes opposite, and the test fails.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from layerif.data import encode_split
from layerif.models import LoadedModel, select_targets
from helpers import compute

TRAIN = [
    "the capital of france is paris",
    "one plus two equals three",
    "the cat was in the house with a dog",
    "four plus five equals nine .",
    "is this the answer ? yes",
]
VAL = ["the capital of italy is rome", "six plus one equals seven"]
C = 0.1  # --damping-scale
ETA = 1.0  # SGD learning rate of the grad-dot step


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


def _loss(model, ids):
    """One sample's mean next-token cross-entropy, as the library's per-sample loss."""
    return torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:])


@torch.no_grad()
def val_loss(model, tokenizer) -> float:
    """The summed validation loss, one record at a time."""
    return sum(float(_loss(model, _ids(tokenizer, t))) for t in VAL)


def sample_grads(model, tokenizer, targets) -> dict[str, torch.Tensor]:
    """{module: [n, d]} per-sample train gradients by one plain backward per record."""
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    for text in TRAIN:
        model.zero_grad(set_to_none=True)
        _loss(model, _ids(tokenizer, text)).backward()
        for t in targets:
            out[t.name].append(torch.cat([p.grad.flatten() for p in t.module.parameters(recurse=False)]).clone())
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def preconditioner(G: torch.Tensor, estimator: str) -> torch.Tensor:
    """The d x d matrix the estimator's step multiplies a gradient with (eta I for grad-dot)."""
    n, d = G.shape
    lam = C * float((G * G).sum(1).mean()) / d
    eye = torch.eye(d, dtype=G.dtype)
    if estimator == "grad-dot":
        return ETA * eye
    if estimator == "exact":
        return torch.linalg.inv(G.T @ G / n + lam * eye)
    return sum(torch.linalg.inv(torch.outer(g, g) + lam * eye) for g in G) / n  # datainf


def step(module, delta: torch.Tensor) -> None:
    """theta += delta, delta flat in the order of the module's own parameters."""
    with torch.no_grad():
        offset = 0
        for p in module.parameters(recurse=False):
            p += delta[offset : offset + p.numel()].view_as(p)
            offset += p.numel()


# exact and DataInf form dense d x d inverses: only the attention output projection (d = 1056) there
@pytest.mark.parametrize("estimator,target,eps", [("grad-dot", "attn", 1e-5), ("exact", r"attn\.c_proj", 1e-6),
                                                  ("datainf", r"attn\.c_proj", 1e-8)])
def test_upweighting_step_changes_val_loss_by_eps_times_influence(estimator, target, eps):
    model = tiny_model("gpt2", n_layers=2).double()
    tok = make_tokenizer()
    lm = LoadedModel(model=model, tokenizer=tok, name="tiny")
    train = encode_split(tok, [{"text": t} for t in TRAIN], "train")[0]
    val = encode_split(tok, [{"text": t} for t in VAL], "validation")[0]
    result = compute(lm, train, val, target, estimator, C, batch_size=2, mode="materialized")
    targets = select_targets(model, target)
    G = sample_grads(model, tok, targets)
    M = {t.name: preconditioner(G[t.name], estimator) for t in targets}
    base = val_loss(model, tok)
    for l in result.layers:
        block = [t for t in targets if t.block == l]
        measured = []
        for i in range(len(TRAIN)):
            deltas = {t.name: -eps * (M[t.name] @ G[t.name][i]) for t in block}
            for t in block:
                step(t.module, deltas[t.name])
            measured.append(val_loss(model, tok) - base)
            for t in block:
                step(t.module, -deltas[t.name])
        measured = torch.tensor(measured, dtype=torch.float64)
        predicted = eps * result.influence[l]
        scale = float(predicted.abs().max())
        assert scale > 0
        # same sign wherever the effect is not negligible, and the same size to first order
        big = predicted.abs() > 0.05 * scale
        assert torch.equal(torch.sign(measured[big]), torch.sign(predicted[big])), (estimator, l, measured, predicted)
        torch.testing.assert_close(measured, predicted, rtol=1e-3, atol=1e-3 * scale)
