"""Block-by-block calibration: the statistics of each projection's inputs over calibration windows.

As the Wanda / SparseGPT reference code: the calibration windows are run through block l to collect its
inputs' statistics (:class:`InputStats`); the caller may change block l (prune it) before the outputs of block
l become the inputs of block l + 1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from . import progress
from .models import find_blocks, projections, weight_out_in

class InputStats:
    """Statistics of a projection's inputs, accumulated by a forward hook over calibration tokens.

    ``sq``: Σ_t x_tj² [in] (Wanda's ‖X_j‖₂²); ``hessian``: Σ_t x_t x_tᵀ [in, in] (SparseGPT),
    only when asked for. float32, on the module's device.
    """

    def __init__(self, module: nn.Module, hessian: bool):
        n_in = weight_out_in(module).shape[1]
        dev = module.weight.device
        self.sq = torch.zeros(n_in, device=dev)
        self.hessian = torch.zeros(n_in, n_in, device=dev) if hessian else None

    def hook(self, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.sq += (x * x).sum(dim=0)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, the other positional arguments, the other keyword arguments) of a block call."""
    if args:
        return args[0], args[1:], dict(kwargs)
    rest = dict(kwargs)
    return rest.pop("hidden_states"), (), rest


def _block_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor) -> tuple[list, list]:
    """Inputs of block 0 for each window, and each block's other call arguments.

    The other arguments (attention mask, position embeddings, ...) depend only on
    the window length, so they are recorded once, from a forward pass on the first
    window, separately for every block (families such as Gemma pass each block its
    own mask).
    """
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []

    def catch(module, args, kwargs):
        hidden.append(_split_call(args, kwargs)[0])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(input_ids=w.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    calls: list = [None] * len(blocks)

    def record(idx):
        def hook(module, args, kwargs):
            calls[idx] = _split_call(args, kwargs)[1:]

        return hook

    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(input_ids=windows[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


@torch.no_grad()
def calibrate(
    model: nn.Module, windows: torch.Tensor, hessian: bool = False, update: bool = True
) -> Iterator[tuple[int, nn.Module, dict[str, InputStats]]]:
    """Sequential block-by-block calibration, as the Wanda / SparseGPT reference code.

    ``windows``: token ids [n, seqlen], unpadded. Yields ``(block index, block,
    {name relative to the block: InputStats})`` for each block in order, after the
    windows' hidden states have passed through it; the caller may change the
    block's weights before asking for the next one. With ``update`` the block is
    then run again so the next block sees the outputs of the changed block;
    without it (the block was left alone) the outputs of the first run are used.
    """
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] tensor, got {tuple(windows.shape)}")
    _, blocks = find_blocks(model)
    hidden, calls = _block_inputs(model, blocks, windows)
    for idx, block in enumerate(progress.track(blocks, desc="calibrating blocks", unit="block")):
        args, kwargs = calls[idx]
        stats = {rel: InputStats(mod, hessian) for rel, mod in projections(block).items()}
        handles = [mod.register_forward_hook(stats[rel].hook) for rel, mod in projections(block).items()]
        outputs = []
        try:
            for h in hidden:
                out = _block_out(block(h, *args, **kwargs))
                if not update:
                    outputs.append(out)
        finally:
            for h in handles:
                h.remove()
        yield idx, block, stats
        hidden = [_block_out(block(h, *args, **kwargs)) for h in hidden] if update else outputs
