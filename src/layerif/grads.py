"""Per-sample gradients of projection modules from one backward pass per batch.

For a linear module y = W x + b applied at tokens t, the gradient of sample i's
loss is ``g_i = sum_t delta_it x_it^T`` (plus ``sum_t delta_it`` for the bias),
where ``delta_it = dloss_i / dy_it``. A forward hook keeps each module's input,
a tensor hook on its output receives delta in the backward pass, and one einsum
per module gives all B per-sample gradients of the batch at once. Padded tokens
have delta = 0 (their labels are ignored and, with right padding and a causal
mask, no real token depends on them), so padding never changes a gradient.

The backward pass differentiates the *sum* of the per-sample mean losses with
respect to the input embeddings only, so no parameter ``.grad`` is allocated.

Flattening order of a module's gradient (the contract every caller shares):
the weight in its stored layout (``[out, in]`` for ``nn.Linear``, ``[in, out]``
for GPT-2's ``Conv1D``) flattened row-major, followed by the bias if any --
exactly ``torch.cat([p.flatten() for p in module.parameters(recurse=False)])``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .data import Encoded, batches, collate, per_sample_loss
from .models import Target


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def flat_params(module: nn.Module) -> torch.Tensor:
    """The module's own parameters flattened in the gradient contract's order, [d]."""
    return torch.cat([p.detach().flatten() for p in module.parameters(recurse=False)])


def per_sample_from_activations(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample gradients [B, d] from inputs x [B, T, in] and output gradients delta [B, T, out].

    Inputs flattened over (batch, token), as OPT's MLP does ([B*T, in]), are
    reshaped with ``batch`` = B.
    """
    x = x.float().reshape(batch, -1, x.shape[-1])
    delta = delta.float().reshape(batch, -1, delta.shape[-1])
    if _is_conv1d(module):
        w = torch.einsum("bti,bto->bio", x, delta)
    else:
        w = torch.einsum("bto,bti->boi", delta, x)
    parts = [w.reshape(w.shape[0], -1)]
    if getattr(module, "bias", None) is not None:
        parts.append(delta.sum(dim=1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@contextmanager
def capture(
    model: nn.Module, targets: Sequence[Target], sink: Callable[[Target, torch.Tensor], None]
) -> Iterator[None]:
    """Within the context, every backward pass of ``model`` calls ``sink(target, grads [B, d])`` per target.

    ``grads[i]`` is the gradient of the differentiated objective's i-th sample term
    w.r.t. the target's parameters (contract order above), in float32.
    """
    batch = [0]

    def record_batch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        batch[0] = first.shape[0]

    def make_hook(t: Target):
        def fwd(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x, b = inputs[0].detach(), batch[0]
            output.register_hook(lambda grad: sink(t, per_sample_from_activations(module, x, grad, b)))

        return fwd

    handles = [model.register_forward_pre_hook(record_batch, with_kwargs=True)]
    for t in targets:
        handles.append(t.module.register_forward_hook(make_hook(t)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def losses_and_backward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward a batch, backward the sum of per-sample losses to the input embeddings; returns losses [B].

    Parameters get no ``.grad``: only hooks installed by :func:`capture` see gradients.
    """
    embed = model.get_input_embeddings()
    with torch.no_grad():
        emb = embed(batch["input_ids"])
    emb = emb.detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False)
    losses = per_sample_loss(out.logits, batch["labels"])
    torch.autograd.grad(losses.sum(), emb)
    return losses.detach()


def per_sample_grads(
    model: nn.Module,
    targets: Sequence[Target],
    records: Sequence[Encoded],
    pad_id: int,
    batch_size: int = 8,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """All per-sample gradients of ``targets`` for ``records`` (small problems and tests).

    Returns ({target name: [n, d]}, losses [n]). Production code streams batches
    through :func:`capture` instead of holding everything.
    """
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    losses = []
    with capture(model, targets, lambda t, g: out[t.name].append(g.cpu())):
        for chunk in batches(list(records), batch_size):
            losses.append(losses_and_backward(model, collate(chunk, pad_id, device)).cpu())
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(losses)
