"""A LoRA mixture of experts with its own number of experts in every decoder block.

For each targeted projection ``base`` of block l (``nn.Linear`` or GPT-2's
``Conv1D``, found generically by :func:`layerif.models.find_blocks` and
:func:`layerif.models.projections`) the adapter holds n_l LoRA experts
(A_e: [r, d_in], B_e: [d_out, r]) and, when n_l > 1, a bias-free router
R: [n_l, d_in]. For a token x (a row of the input)::

    p = softmax(R x)                           # router probabilities, [n_l]
    S = the top-k experts of p, w_e = p_e / Σ_{j∈S} p_j for e ∈ S
    y = base(x) + (alpha / r) · Σ_{e∈S} w_e · B_e A_e dropout(x)

A block with one expert has no router (its weight is 1 for every token). The
base model is frozen; A is initialised as PEFT does (Kaiming-uniform, a = √5),
B = 0, so the wrapped model computes exactly what the base model does until it
is trained. The router is initialised like ``nn.Linear``.

Load balancing (optional, ``aux_loss_coef`` > 0): in training mode each routed
module computes the Switch-Transformer loss generalised to top-k (as Mixtral),
``n · Σ_e f_e · P_e`` with f_e the fraction of the k·N routing slots that went to
expert e and P_e the mean router probability of e over the N real tokens
(padding excluded via the ``attention_mask`` the model is called with); it is
1 for a perfectly balanced router. :func:`aux_loss` returns ``aux_loss_coef``
times its mean over routed modules, to be added to the task loss.

The commands ``layerif moe`` and ``layerif compare-moe`` are in
:mod:`layerif.commands.moe` and :mod:`layerif.commands.compare_moe`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import __version__, results
from .errors import UserError
from .io import staged_folder, write_safetensors
from .models import find_blocks, is_conv1d, select_targets, weight_out_in
from .results import ALLOCATION_FILE, check_save_dir, write_saved

ADAPTER_FILE = "adapter.safetensors"
NEEDS_SCORES = "the layerif allocation needs --scores scores.json (from `layerif score`)"
_ATTR = "_layerif_lora_moe"  # where apply_lora_moe keeps its bookkeeping on the model


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class MoeConfig:
    """The adapter's hyper-parameters (the per-block expert counts are given separately)."""

    rank: int = 8  # r of every expert
    alpha: float = 16.0  # scale = alpha / r
    dropout: float = 0.05  # dropout on the experts' input (not the router's)
    targets: str = "qv"  # which projections of each block (see target_names)
    aux_loss_coef: float = 0.01  # load-balancing loss weight; 0 = off

    def check(self) -> None:
        """Bad values are a :class:`UserError`."""
        if self.rank < 1:
            raise UserError(f"--rank must be ≥ 1 (got {self.rank})")
        if not self.alpha > 0:
            raise UserError(f"--lora-alpha must be > 0 (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not self.aux_loss_coef >= 0:
            raise UserError(f"--aux-loss-coef must be ≥ 0 (got {self.aux_loss_coef})")


def target_names(model: nn.Module, targets: str = "qv") -> list[list[str]]:
    """Fully qualified names of the projections of an unwrapped model to adapt, one list per decoder block.

    ``targets`` is any spelling of :func:`layerif.models.select_targets` (default
    ``qv``: the query and value projections, or the fused QKV projection where a
    family has no separate ones); a block where nothing matches is a :class:`UserError`.
    """
    _, blocks = find_blocks(model)
    out: list[list[str]] = [[] for _ in blocks]
    for t in select_targets(model, targets, every_block=True, option="--targets"):
        out[t.block].append(t.name)
    return out


def _check_allocation_shape(experts: Sequence[int], top_k: Sequence[int], n_blocks: int) -> None:
    if len(experts) != n_blocks or len(top_k) != n_blocks:
        raise UserError(f"the allocation has {len(experts)} expert counts and {len(top_k)} top-k values; "
                        f"the model has {n_blocks} blocks")
    for l, (n, k) in enumerate(zip(experts, top_k)):
        if int(n) != n or int(k) != k or n < 1 or not 1 <= k <= n:
            raise UserError(f"block {l}: {n} experts with top-{k} (need n ≥ 1 and 1 ≤ k ≤ n)")


# ----------------------------------------------------------------------------- the layer


class _TokenMask:
    """The ``attention_mask`` of the model's current call, for the load-balancing loss."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")


class LoraMoeLayer(nn.Module):
    """A frozen projection plus n LoRA experts mixed by a top-k router (module docstring).

    Parameters: ``lora_A`` [n, r, d_in], ``lora_B`` [n, d_out, r] and, for n > 1,
    ``router`` [n, d_in]; all float32 on the base weight's device. Input
    [..., d_in] in the base's dtype, output [..., d_out] in the base's dtype.
    After a training-mode forward with n > 1 and ``aux_loss_coef`` > 0,
    ``last_aux`` holds the load-balancing loss (a scalar), else ``None``.
    """

    def __init__(self, base: nn.Module, n_experts: int, top_k: int, config: MoeConfig, tokens: _TokenMask,
                 generator: torch.Generator) -> None:
        super().__init__()
        d_out, d_in = weight_out_in(base).shape
        self.base = base
        self.n_experts, self.top_k, self.rank = int(n_experts), int(top_k), config.rank
        self.scale = config.alpha / config.rank
        self.aux_loss_coef = config.aux_loss_coef
        self.dropout = nn.Dropout(config.dropout)
        self._tokens = tokens
        self.last_aux: torch.Tensor | None = None
        a = torch.empty(self.n_experts, config.rank, d_in)
        for e in range(self.n_experts):  # per expert, so the fan-in is d_in as in PEFT
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5), generator=generator)
        device = base.weight.device
        self.lora_A = nn.Parameter(a.to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.n_experts, d_out, config.rank, device=device))
        if self.n_experts > 1:
            r = torch.empty(self.n_experts, d_in)
            nn.init.kaiming_uniform_(r, a=math.sqrt(5), generator=generator)
            self.router = nn.Parameter(r.to(device))
        else:
            self.register_parameter("router", None)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Mixing weights [N, n] of tokens x [N, d_in]: renormalised top-k probabilities, 0 elsewhere.

        Sets ``last_aux`` (see the class docstring).
        """
        self.last_aux = None
        if self.router is None:
            return torch.ones(x.shape[0], 1, device=x.device, dtype=torch.float32)
        probs = torch.softmax(x.float() @ self.router.float().t(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(dim=-1, keepdim=True))
        if self.training and self.aux_loss_coef > 0:
            chosen = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
            mask = self._tokens.mask
            real = (mask.reshape(-1, 1).to(probs.dtype) if mask is not None and mask.numel() == x.shape[0]
                    else torch.ones(x.shape[0], 1, device=x.device))
            n_real = real.sum().clamp(min=1)
            frac = (chosen * real).sum(dim=0) / (n_real * self.top_k)
            mean_p = (probs * real).sum(dim=0) / n_real
            self.last_aux = self.n_experts * (frac * mean_p).sum()
        return gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        gates = self.gates(flat).to(flat.dtype)  # [N, n]
        h = torch.einsum("nd,erd->ner", self.dropout(flat), self.lora_A) * gates.unsqueeze(-1)  # [N, n, r]
        b = self.lora_B.transpose(1, 2).reshape(self.n_experts * self.rank, -1)  # rows (e, r) -> [n·r, d_out]
        delta = h.reshape(flat.shape[0], -1) @ b
        return out + (self.scale * delta).to(out.dtype).reshape(out.shape)


@dataclass
class _Adapter:
    """What :func:`apply_lora_moe` attaches to the model (needed to save, count, and remove)."""

    config: MoeConfig
    experts: list[int]
    top_k: list[int]
    layers: dict[str, LoraMoeLayer]  # fully qualified name of the wrapped projection -> layer
    block_of: dict[str, int]  # same name -> block index
    requires_grad: dict[str, bool]  # the model's parameters' flags before freezing
    hook: torch.utils.hooks.RemovableHandle


def _adapter(model: nn.Module) -> _Adapter:
    adapter = getattr(model, _ATTR, None)
    if adapter is None:
        raise ValueError("the model has no LoRA-MoE adapter (apply_lora_moe first)")
    return adapter


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return model.get_submodule(parent), leaf


def apply_lora_moe(model: nn.Module, experts: Sequence[int], top_k: Sequence[int], config: MoeConfig = MoeConfig(),
                   seed: int = 0) -> nn.Module:
    """Freeze ``model`` and wrap its targeted projections with :class:`LoraMoeLayer` (in place).

    ``experts[l]`` / ``top_k[l]``: experts and router top-k of block l (one value
    per decoder block). The adapter weights are initialised from ``seed`` (the
    global RNG is untouched). Returns ``model``; it computes the same outputs as
    before until trained. Bad shapes or values are a :class:`UserError`.
    """
    if hasattr(model, _ATTR):
        raise ValueError("the model already has a LoRA-MoE adapter (remove_lora_moe first)")
    config.check()
    _, blocks = find_blocks(model)
    _check_allocation_shape(experts, top_k, len(blocks))
    names = target_names(model, config.targets)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = _TokenMask()
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, LoraMoeLayer] = {}
    block_of: dict[str, int] = {}
    for l, block_names in enumerate(names):
        for name in block_names:
            parent, leaf = _parent(model, name)
            layer = LoraMoeLayer(getattr(parent, leaf), experts[l], top_k[l], config, tokens, gen)
            layer.train(model.training)
            setattr(parent, leaf, layer)
            layers[name], block_of[name] = layer, l
    hook = model.register_forward_pre_hook(tokens.capture, with_kwargs=True)
    setattr(model, _ATTR, _Adapter(config, [int(n) for n in experts], [int(k) for k in top_k], layers, block_of,
                                   flags, hook))
    return model


def remove_lora_moe(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lora_moe`: the original projections and ``requires_grad`` flags come back."""
    adapter = _adapter(model)
    for name, layer in adapter.layers.items():
        parent, leaf = _parent(model, name)
        setattr(parent, leaf, layer.base)
    adapter.hook.remove()
    delattr(model, _ATTR)
    for n, p in model.named_parameters():
        p.requires_grad_(adapter.requires_grad.get(n, p.requires_grad))
    return model


def moe_layers(model: nn.Module) -> dict[str, LoraMoeLayer]:
    """The adapted projections of a model wrapped by :func:`apply_lora_moe`, by fully qualified name."""
    return dict(_adapter(model).layers)


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """``aux_loss_coef`` × the mean load-balancing loss of the last training forward, or ``None`` if none."""
    adapter = _adapter(model)
    values = [layer.last_aux for layer in adapter.layers.values() if layer.last_aux is not None]
    if not values:
        return None
    return adapter.config.aux_loss_coef * torch.stack(values).mean()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (for an adapted model: the adapter's only).

    For the LoRA-MoE adapter this is Σ over adapted projections of block l of
    n_l · r · (d_in + d_out), plus n_l · d_in for the router where n_l > 1.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors by name: ``<projection>.lora_A`` / ``.lora_B`` / ``.router``."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in _adapter(model).layers.items():
        for part, tensor in layer.named_parameters(recurse=False):
            out[f"{name}.{part}"] = tensor.detach()
    return out


# ----------------------------------------------------------------------------- PEFT export


def peft_rank_pattern(experts: Sequence[int], base_rank: int, module_names: Sequence[Sequence[str]]) -> dict[str, int]:
    """PEFT ``rank_pattern`` for a plain-LoRA ablation: rank ``base_rank · n_l`` for every module of block l.

    ``module_names[l]`` lists block l's module names (as :func:`target_names`).
    A rank-(n·r) LoRA has exactly the A and B parameters of n rank-r experts, so
    the ablation matches the MoE's parameter count less its routers.
    """
    if len(experts) != len(module_names):
        raise UserError(f"{len(experts)} expert counts for {len(module_names)} blocks")
    return {name: int(base_rank * n) for n, names in zip(experts, module_names) for name in names}


def peft_lora_kwargs(model: nn.Module) -> dict:
    """Keyword arguments of ``peft.LoraConfig`` for the plain-LoRA ablation of the model's adapter.

    Same modules, rank ``r · n_l`` (:func:`peft_rank_pattern`) and ``lora_alpha``
    ``alpha · n_l`` per module, so every module keeps the experts' scale alpha / r.
    """
    adapter = _adapter(model)
    c = adapter.config
    names: list[list[str]] = [[] for _ in adapter.experts]
    for name, l in adapter.block_of.items():
        names[l].append(name)
    return {
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": list(adapter.layers),
        "rank_pattern": peft_rank_pattern(adapter.experts, c.rank, names),
        "alpha_pattern": {n: c.alpha * adapter.experts[l] for n, l in adapter.block_of.items()},
        "fan_in_fan_out": any(is_conv1d(layer.base) for layer in adapter.layers.values()),
    }


# ----------------------------------------------------------------------------- save / load


def save_adapter(model: nn.Module, folder: str | Path, allocation: dict | None = None, overwrite: bool = False,
                 source: str | None = None) -> Path:
    """Write ``adapter.safetensors`` and ``allocation.json`` into ``folder``; returns it.

    allocation.json holds ``layers``, ``experts`` and ``top_k`` per block, the
    adapter config (``adapter``), the wrapped ``modules``, the PEFT ablation
    (``peft``: :func:`peft_lora_kwargs`) and every key of ``allocation`` (the
    arguments and metric that made it, results). The folder is built under a
    temporary name and then renamed over ``folder`` (a failed save leaves the old
    folder, or none). ``folder`` follows :func:`layerif.results.check_save_dir`
    (``overwrite``; never the base model ``source``).
    """
    adapter = _adapter(model)
    check = partial(check_save_dir, what="adapter folder", overwrite=overwrite, model=source)
    dest = check(folder)
    doc = {
        **(allocation or {}),
        "layers": list(range(len(adapter.experts))),
        "experts": adapter.experts,
        "top_k": adapter.top_k,
        "adapter": asdict(adapter.config),
        "modules": list(adapter.layers),
        "peft": peft_lora_kwargs(model),
        "version": __version__,
    }
    with staged_folder(dest, "--save", check) as tmp:
        write_safetensors(tmp / ADAPTER_FILE, adapter_state(model), metadata={"format": "layerif-lora-moe"})
        write_saved(tmp, doc, "adapter folder")
    return dest


def read_allocation(folder: str | Path) -> dict:
    """allocation.json of an adapter folder (a missing or unreadable one is a :class:`UserError`)."""
    return results.read_allocation(folder, {"experts", "top_k", "adapter"}, "LoRA-MoE adapter")


def load_adapter(base_model: nn.Module, folder: str | Path) -> nn.Module:
    """Wrap ``base_model`` with the adapter saved in ``folder`` (in place) and return it.

    The adapter must have been made for a model of the same architecture: the
    block count, module names and shapes are checked (:class:`UserError`).
    """
    doc = read_allocation(folder)
    _, blocks = find_blocks(base_model)
    if len(doc["experts"]) != len(blocks):
        raise UserError(f"{folder} is an adapter for another model "
                        f"({len(doc['experts'])} blocks; this one has {len(blocks)})")
    from safetensors.torch import load_file

    try:
        tensors = load_file(Path(folder) / ADAPTER_FILE)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {Path(folder) / ADAPTER_FILE}: {exc}") from None
    try:
        config = MoeConfig(**doc["adapter"])
    except TypeError as exc:
        raise UserError(f"{folder}/{ALLOCATION_FILE} has an unknown adapter setting: {exc}") from None
    apply_lora_moe(base_model, doc["experts"], doc["top_k"], config)
    state = adapter_state(base_model)
    if state.keys() != tensors.keys() or any(state[k].shape != tensors[k].shape for k in state):
        remove_lora_moe(base_model)
        raise UserError(f"{folder} is an adapter for another model (its tensors do not fit this one)")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(tensors[name])
    return base_model
