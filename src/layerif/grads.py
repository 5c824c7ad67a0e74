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

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .data import Encoded, batches, collate, per_sample_loss, upcast
from .models import Projection, input_device, is_conv1d, weight_out_in


def _shaped(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, T, f] float32 (float64 for a float64 model) view of an activation (OPT's MLP flattens to [B*T, f])."""
    return upcast(x).reshape(batch, -1, x.shape[-1])


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def augment(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs [..., in] with a column of ones appended when the module has a bias: [..., in (+1)].

    With it, the bias gradient is one more weight column: g = sum_t delta_t x'_t^T.
    """
    if not _has_bias(module):
        return x
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)


def to_matrices(module: nn.Module, flat: torch.Tensor) -> torch.Tensor:
    """Flat gradient-shaped vectors [k, d] (contract order) as [k, out, in (+1)] matrices."""
    out, inp = module.weight.shape[::-1] if is_conv1d(module) else module.weight.shape
    w = flat[:, : out * inp]
    w = w.reshape(-1, inp, out).transpose(1, 2) if is_conv1d(module) else w.reshape(-1, out, inp)
    if _has_bias(module):
        w = torch.cat([w, flat[:, out * inp :, None]], dim=2)
    return w


def from_matrices(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_matrices`: [k, out, in (+1)] -> flat [k, d] in contract order."""
    inp = W.shape[2] - _has_bias(module)
    w = W[:, :, :inp]
    w = w.transpose(1, 2) if is_conv1d(module) else w
    parts = [w.reshape(W.shape[0], -1)]
    if _has_bias(module):
        parts.append(W[:, :, inp])
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def dense_from_activations(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients [B, d] from inputs x [B, T, in] and output gradients delta [B, T, out]."""
    return from_matrices(module, torch.einsum("bto,bti->boi", delta, augment(module, x)))


def weighted_sum(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """sum_i r[i, j] g_i for each column j of r [B, k]: [k, d], without forming any g_i."""
    return from_matrices(module, torch.einsum("bk,bto,bti->koi", r, delta, augment(module, x)))


def sq_norms(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||g_i||^2 for each sample of a batch, [B] float64.

    Ghost norm sum_{t,s} (x_t . x_s)(delta_t . delta_s) when T^2 (in + out) < in * out,
    else through the dense per-sample gradients.
    """
    xa = augment(module, x)
    T, inp, out = x.shape[1], xa.shape[2], delta.shape[2]
    if T * T * (inp + out) < inp * out:
        xx = torch.einsum("bti,bsi->bts", xa.double(), xa.double())
        dd = torch.einsum("bto,bso->bts", delta.double(), delta.double())
        return (xx * dd).sum(dim=(1, 2))
    g = dense_from_activations(module, x, delta).double()
    return (g * g).sum(dim=1)


def dots(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """g_i . v_j for each sample i of a batch and row j of V [k, d]: [B, k] float64, without forming g_i.

    g_i . v = sum_t delta_t^T M x'_t with M the [out, in (+1)] matrix form of v.
    """
    xa, d64 = augment(module, x).double(), delta.double()
    M = to_matrices(module, V).double()
    return torch.stack([((d64 @ M[j]) * xa).sum(dim=(1, 2)) for j in range(M.shape[0])], dim=1)


@dataclass
class Factored:
    """Per-sample gradients kept as their token factors: g_i = sum_{t in i} delta_t x_t^T.

    ``x`` [N, in (+1 with a bias, see :func:`augment`)], ``delta`` [N, out] over
    the N real tokens of all samples, ``sample`` [N] the sample index of each token.
    Dot products between such gradients never form g:
    g_i . g_j = sum_{t in i, s in j} (x_t . x_s)(delta_t . delta_s).
    """

    x: torch.Tensor
    delta: torch.Tensor
    sample: torch.Tensor
    n: int
    module: nn.Module

    @classmethod
    def allocate(cls, module: nn.Module, n_tokens: int, n: int, dtype: torch.dtype, device: torch.device,
                 zeros: Callable[..., torch.Tensor] = torch.zeros) -> "Factored":
        """Empty factors for ``n_tokens`` real tokens of n samples, filled by :meth:`fill` (``zeros`` allocates)."""
        out_f, in_f = weight_out_in(module).shape
        return cls(zeros(n_tokens, in_f + _has_bias(module), dtype=dtype, device=device),
                   zeros(n_tokens, out_f, dtype=dtype, device=device),
                   zeros(n_tokens, dtype=torch.long, device=device), n, module)

    def fill(self, at: int, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, offset: int) -> int:
        """Write one batch's real tokens (x [B, T, in], delta [B, T, out], mask [B, T]; its samples start at
        ``offset``) from token row ``at``; returns the next free row."""
        keep = mask.bool()
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(keep)
        m = int(keep.sum())
        self.x[at : at + m] = augment(self.module, x[keep])
        self.delta[at : at + m] = delta[keep]
        self.sample[at : at + m] = rows[keep] + offset
        return at + m


def _segment_sum(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Sum rows of values [N, ...] into n groups by index [N]."""
    out = torch.zeros((n, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


def gram_chunk(scratch_bytes: float, fixed: float, per: float, square: float = 0.0) -> int:
    """The largest chunk c >= 1 with ``fixed + per * c + square * c**2 <= scratch_bytes`` (1 if none fits)."""
    room = scratch_bytes - fixed
    if square:
        c = (-per + math.sqrt(per * per + 4 * square * max(room, 0.0))) / (2 * square)
    else:
        c = room / per
    return max(1, int(c))


def gram(a: torch.Tensor | Factored, b: torch.Tensor | Factored, scratch_bytes: float = 2.0**28,
         track: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """All dot products a_i . b_j as [n_a, n_b] float64; each side dense [n, d] or :class:`Factored`.

    The float64 working copies (chunks of a and b, their products) hold at most ``scratch_bytes`` at a
    time besides the result (never less than one column or token per chunk); each is passed to
    ``track`` (e.g. :meth:`layerif.budget.Meter.track`) when made.
    """
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        n_a, n_b = a.shape[0], b.shape[0]
        out = torch.zeros(n_a, n_b, dtype=torch.float64, device=a.device)
        w = gram_chunk(scratch_bytes, 8.0 * n_a * n_b, 8.0 * (n_a + n_b))  # columns: both chunks + their product
        for c in range(0, a.shape[1], w):
            ac, bc = track(a[:, c : c + w].double()), track(b[:, c : c + w].double())
            out += track(ac @ bc.T)
            del ac, bc  # before the next chunk is made
        return out
    if isinstance(a, torch.Tensor):
        return gram(b, a, scratch_bytes, track).T
    if isinstance(b, torch.Tensor):  # factored x dense: g_i . v_j = sum_t delta_t^T V_j x_t
        out = torch.zeros(a.n, b.shape[0], dtype=torch.float64, device=a.x.device)
        n_out, n_in = a.delta.shape[1], a.x.shape[1]
        # tokens per chunk: V_j as a matrix, the chunk's x and delta, delta @ V_j, its product with x, the sums
        c = gram_chunk(scratch_bytes, 8.0 * (n_out * n_in + a.n), 8.0 * (n_out + 3 * n_in + 1))
        for j in range(b.shape[0]):
            M = track(to_matrices(a.module, b[j : j + 1])[0].double())
            for i in range(0, a.x.shape[0], c):
                xa, da = track(a.x[i : i + c].double()), track(a.delta[i : i + c].double())
                per_token = track(track(track(da @ M) * xa).sum(dim=1))
                out[:, j] += track(_segment_sum(per_token, a.sample[i : i + c], a.n))
                del xa, da, per_token
            del M
        return out
    out = torch.zeros(a.n, b.n, dtype=torch.float64, device=a.x.device)
    width = a.x.shape[1] + a.delta.shape[1] + b.x.shape[1] + b.delta.shape[1]
    # tokens per chunk on each side: both sides' factors, x_a x_b^T, delta_a delta_b^T and their product,
    # and the two segment sums ([n_a, c] and [n_b, n_a])
    c = gram_chunk(scratch_bytes, 8.0 * a.n * b.n, 8.0 * (width + a.n), 8.0 * 3)
    for i in range(0, a.x.shape[0], c):
        xa, da, sa = track(a.x[i : i + c].double()), track(a.delta[i : i + c].double()), a.sample[i : i + c]
        for j in range(0, b.x.shape[0], c):
            xb, db, sb = track(b.x[j : j + c].double()), track(b.delta[j : j + c].double()), b.sample[j : j + c]
            tok = track(track(xa @ xb.T) * track(da @ db.T))  # [c_a, c_b]
            out += track(_segment_sum(track(_segment_sum(tok, sa, a.n)).T, sb, b.n)).T
            del xb, db, tok
        del xa, da
    return out


def _finite(t: Projection, delta: torch.Tensor) -> torch.Tensor:
    """``delta`` [B, T, out], or :class:`NonFinite` naming its first non-finite row and ``t`` (backward order:
    the first target the non-finite gradient reaches)."""
    bad = (~torch.isfinite(delta).flatten(1).all(dim=1)).nonzero()
    if len(bad):
        raise NonFinite("gradient", int(bad[0, 0]), f"{t.name} (block {t.block})")
    return delta


@contextmanager
def capture(
    model: nn.Module, targets: Sequence[Projection], sink: Callable[[Projection, torch.Tensor, torch.Tensor], None]
) -> Iterator[None]:
    """Within the context, every backward pass of ``model`` calls ``sink(target, x, delta)`` per target.

    ``x`` [B, T, in] is the module's input and ``delta`` [B, T, out] the gradient of
    the differentiated objective w.r.t. its output, both float32 (float64 for a
    float64 model); sample i's
    parameter gradient is ``dense_from_activations(module, x, delta)[i]``.
    """
    batch = [0]

    def record_batch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        batch[0] = first.shape[0]

    def make_hook(t: Projection):
        def fwd(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x, b = _shaped(inputs[0].detach(), batch[0]), batch[0]
            output.register_hook(lambda grad: sink(t, x, _finite(t, _shaped(grad, b))))

        return fwd

    handles = [model.register_forward_pre_hook(record_batch, with_kwargs=True)]
    for t in targets:
        handles.append(t.module.register_forward_hook(make_hook(t)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record_losses(model: nn.Module, records: list[Encoded], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Per-sample losses [n] (float64, :func:`layerif.data.per_sample_loss`) of ``records``, forward only."""
    device = input_device(model)
    out = [per_sample_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits,
                           b["labels"]).double().cpu()
           for b in (collate(chunk, pad_id, device) for chunk in batches(records, batch_size))]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def pass_bytes(model: nn.Module, batch_size: int, tokens: int) -> float:
    """Estimated peak bytes of one forward + backward pass of a [batch_size, tokens] batch (activations kept
    for the backward pass; parameters not included).

    Per token and block about 14 hidden-size and 4 intermediate-size values, the
    float32 logits with their softmax and gradient (3 x vocabulary), and the
    attention matrices (heads x tokens per token: kept for every block with
    ``eager`` attention, one block at a time otherwise). An estimate, meant to
    catch batches an order of magnitude too large before the kernel does.
    """
    c = model.config
    get = lambda *keys: next((getattr(c, k) for k in keys if isinstance(getattr(c, k, None), int)), 0)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head") or 1
    vocab = get("vocab_size")
    item = next(model.parameters()).element_size()
    bt = batch_size * tokens
    eager = getattr(c, "_attn_implementation", "eager") == "eager"
    attn = batch_size * heads * tokens * tokens * item * (2 * layers if eager else 2)
    return float(bt * item * layers * (14 * hidden + 4 * inter) + bt * 4 * 3 * vocab + attn)


def available_bytes(device: torch.device) -> float | None:
    """Memory a pass may use: free memory of a CUDA device, MemAvailable of the machine for the CPU, None if unknown."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_pass_memory(model: nn.Module, splits: dict[str, Sequence[Encoded]], batch_size: int) -> None:
    """Refuse, with a :class:`UserError`, a batch whose estimated pass memory (:func:`pass_bytes`) exceeds the
    available memory (:func:`available_bytes`) -- instead of the process being killed by the kernel."""
    from .errors import UserError
    from .models import input_device

    free = available_bytes(input_device(model))
    if free is None:
        return
    for split, records in splits.items():
        for chunk in batches(list(records), batch_size):
            need = pass_bytes(model, len(chunk), max(len(e.input_ids) for e in chunk))
            if need > free:
                longest = max(len(e.input_ids) for e in chunk)
                size = lambda b: f"{b / 1e9:.1f} GB" if b >= 1e8 else f"{b / 1e6:.2g} MB"  # noqa: E731
                raise UserError(f"a batch of {len(chunk)} {split} records of up to {longest} tokens needs about "
                                f"{size(need)} for its forward and backward pass, more than the {size(free)} "
                                "available; lower --batch-size or pass --max-length")


class NonFinite(FloatingPointError):
    """A non-finite loss or gradient in a batch: its ``row`` and the module where the first
    non-finite value appears (forward order for a loss, backward order for a gradient)."""

    def __init__(self, what: str, row: int, module: str | None) -> None:
        super().__init__(f"non-finite {what} for batch row {row}" + (f" ({module})" if module else ""))
        self.what, self.row, self.module = what, row, module

    def at(self, split: str, first: int) -> FloatingPointError:
        """The error for the run, with the record's index in its split (``first`` = index of batch row 0)."""
        where = f"; the first non-finite value appears in {self.module}" if self.module else ""
        return FloatingPointError(f"non-finite {self.what} for {split} record {first + self.row}{where}")


def _where(model: nn.Module, name: str) -> str:
    """``name (block b)`` for a module inside the decoder blocks, else ``name (outside the decoder blocks)``."""
    from .models import find_blocks

    prefix = find_blocks(model)[0] + "."
    if name.startswith(prefix):
        return f"{name} (block {name[len(prefix):].split('.')[0]})"
    return f"{name} (outside the decoder blocks)"


def first_nonfinite_module(model: nn.Module, batch: dict[str, torch.Tensor], row: int) -> str | None:
    """Forward batch row ``row`` alone, watching every module's output; the first module (in execution
    order) whose output holds a non-finite value, as :func:`_where` names it, or None."""
    found: list[str] = []

    def hook(name: str):
        def check(module: nn.Module, inputs: tuple, output: object) -> None:
            outs = output if isinstance(output, (tuple, list)) else (output,)
            if not found and any(isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all()
                                 for o in outs):
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"][row : row + 1], attention_mask=batch["attention_mask"][row : row + 1],
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _where(model, found[0]) if found else None


def losses_and_backward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward a batch, backward the sum of per-sample losses to the input embeddings; returns losses [B].

    Parameters get no ``.grad``: only hooks installed by :func:`capture` see gradients.
    A non-finite loss raises :class:`NonFinite` naming the row and the first module
    whose output is non-finite (:func:`first_nonfinite_module`), before any backward.
    """
    embed = model.get_input_embeddings()
    with torch.no_grad():
        emb = embed(batch["input_ids"])
    emb = emb.detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], use_cache=False)
    losses = per_sample_loss(out.logits, batch["labels"])
    bad = (~torch.isfinite(losses.detach())).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise NonFinite("loss", row, first_nonfinite_module(model, batch, row))
    torch.autograd.grad(losses.sum(), emb)
    return losses.detach()
