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

The module also holds the allocation commands: ``layerif moe`` (allocate,
fine-tune, evaluate and save one adapter) and ``layerif compare-moe`` (every
allocation × several seeds, the comparison table and plot).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, progress
from . import allocate, results
from .allocate import COMPARE_EXPERTS, allocate_experts, top_k_for
from .errors import UserError
from .io import (
    output_folder,
    overwrite_field,
    staged_folder,
    write_figure,
    write_json,
    write_safetensors,
    write_text,
)
from .models import LoadedModel, ModelArgs, find_blocks, is_conv1d, select_targets, weight_out_in
from .report import write_report
from .results import ALLOCATION_FILE, block_scores, check_save_dir, read_scores, write_allocation, write_config
from .stability import mean_std, mean_std_cell
from .spectral import block_alphas
from .train import TrainConfig, check_train_config, evaluate_records, train

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


def save_adapter(model: nn.Module, folder: str | Path, allocation: dict | None = None) -> Path:
    """Write ``adapter.safetensors`` and ``allocation.json`` into ``folder``; returns it.

    allocation.json holds ``layers``, ``experts`` and ``top_k`` per block, the
    adapter config (``adapter``), the wrapped ``modules``, the PEFT ablation
    (``peft``: :func:`peft_lora_kwargs`) and every key of ``allocation`` (the
    arguments and metric that made it, results). The folder is built under a
    temporary name and then renamed over ``folder`` (a failed save leaves the old
    folder, or none).
    """
    adapter = _adapter(model)
    dest = check_save_dir(folder, "adapter folder")
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
    with staged_folder(dest, "--save", lambda d: check_save_dir(d, "adapter folder")) as tmp:
        write_safetensors(tmp / ADAPTER_FILE, adapter_state(model), metadata={"format": "layerif-lora-moe"})
        write_allocation(tmp, doc)
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


# ----------------------------------------------------------------------------- commands: shared


@dataclass
class _MoeOptions(ModelArgs):
    """Options shared by ``layerif moe`` and ``layerif compare-moe``."""

    task: str | None = field(default=None, metadata={"help": "built-in task to train and test on (default: the task of --scores, else capitals)"})
    scores: str | None = field(default=None, metadata={"help": "scores.json of `layerif score` (needed by the layerif allocations)"})
    total_experts: int | None = field(default=None, metadata={"help": "T, the experts over all blocks (default: 5 × blocks)"})
    beta: float = field(default=2.5, metadata={"help": "β, the sharpness of the allocation (layerif, alpha)"})
    targets: str = field(default="qv", metadata={"help": "adapted projections: qv, attn, mlp, all, names (q_proj,v_proj) or a regex"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r of every expert"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scale alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the experts' input"})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss (0: off)"})
    n_train: int = field(default=256, metadata={"help": "train items of the task"})
    n_test: int = field(default=100, metadata={"help": "test items of the task"})
    allow_repeats: bool = field(default=False, metadata={"help": "allow more task items than a built-in split holds (records repeat)"})
    data_seed: int = field(default=0, metadata={"help": "seed of the task's item sampling (same items for every training seed)"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={"help": "records per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak AdamW learning rate"})
    warmup: float = field(default=0.1, metadata={"help": "fraction of the steps with linear warm-up (then linear decay to 0)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int | None = field(default=None, metadata={"help": "truncate train records to this many tokens"})
    eval_batch_size: int = field(default=16, metadata={"help": "sequences per evaluation batch"})
    max_new_tokens: int = field(default=8, metadata={"help": "greedy tokens generated for exact match"})

    def moe_config(self) -> MoeConfig:
        return MoeConfig(rank=self.rank, alpha=self.lora_alpha, dropout=self.dropout, targets=self.targets,
                         aux_loss_coef=self.aux_loss_coef)

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           warmup=self.warmup, weight_decay=self.weight_decay, max_length=self.max_length, seed=seed)

    def check(self, allocations: Sequence[str]) -> None:
        """Checks that need no model (the budget T and β are checked by the allocation)."""
        rules = [allocate.get(a, "experts", getattr(self, "reverse", False))[0] for a in allocations]
        if any(r.metric == "scores" for r in rules) and self.scores is None:
            raise UserError(NEEDS_SCORES)
        if self.n_train < 1 or self.n_test < 1:
            raise UserError("--n-train and --n-test must be ≥ 1")
        if self.eval_batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--eval-batch-size and --max-new-tokens must be ≥ 1")
        self.moe_config().check()
        check_train_config(self.train_config(0))


def _metric(s: "_Setting", allocation: str) -> np.ndarray | None:
    """The per-block metric an allocation label maps to experts (its rule's ``metric``), measured once per setting."""
    kind = allocate.get(allocation, "experts")[0].metric
    if kind == "scores":
        if s.scores is None:
            raise UserError(NEEDS_SCORES)
        return s.scores
    if kind == "alpha":
        if "alpha" not in s.cache:
            s.cache["alpha"] = block_alphas(s.lm.model)
        return s.cache["alpha"]
    return None


@dataclass
class _Setting:
    """What every run of a command shares: the model, the scores, the task's records."""

    lm: LoadedModel
    n_blocks: int
    scores: np.ndarray | None
    scores_doc: dict
    task: str
    train_records: list[dict]
    test_records: list[dict]
    cache: dict = field(default_factory=dict)  # metrics measured on the base model


def _setting(args: _MoeOptions) -> _Setting:
    from .tasks import get_task

    if args.task is not None:
        get_task(args.task)  # an unknown task fails before the model loads
    if args.scores:
        read_scores(args.scores)  # so does a bad scores file
    lm = args.load()
    _, blocks = find_blocks(lm.model)
    scores, doc = block_scores(args.scores, len(blocks)) if args.scores else (None, {})
    if doc.get("model") not in (None, lm.name):
        progress.info(f"note: {args.scores} was computed on {doc['model']}, adapting {lm.name}")
    task_name = args.task or doc.get("task") or "capitals"
    task = get_task(task_name)
    return _Setting(lm, len(blocks), scores, doc, task_name,
                    task.split("train", args.n_train, args.data_seed, args.allow_repeats),
                    task.split("test", args.n_test, args.data_seed, args.allow_repeats))


def _fit(s: _Setting, args: _MoeOptions, experts: np.ndarray, seed: int) -> dict:
    """Wrap the model with a fresh adapter, train it and evaluate it; the adapter stays on the model.

    Returns the run's numbers: losses, accuracy, exact_match, trainable_params, seconds (training time).
    """
    model, tok = s.lm.model, s.lm.tokenizer
    apply_lora_moe(model, experts.tolist(), top_k_for(experts).tolist(), args.moe_config(), seed=seed)
    result = train(model, tok, s.train_records, args.train_config(seed), extra_loss=lambda: aux_loss(model))
    scores = evaluate_records(model, tok, s.test_records, args.eval_batch_size, args.max_new_tokens)
    return {"losses": result.losses, **scores, "trainable_params": trainable_parameters(model),
            "seconds": round(result.seconds, 2)}


def _experts_table(experts: np.ndarray, top_k: np.ndarray, metric: np.ndarray | None, label: str) -> str:
    head = f"{'block':>5}  {label:>10}  {'experts':>7}  {'top-k':>5}"
    rows = [f"{l:>5}  {'' if metric is None else f'{metric[l]:.4g}':>10}  {experts[l]:>7}  {top_k[l]:>5}"
            for l in range(len(experts))]
    return "\n".join([head, *rows])


# ----------------------------------------------------------------------------- layerif moe


@dataclass
class MoeArgs(_MoeOptions):
    """Fine-tune a LoRA mixture of experts whose per-block expert counts come from LayerIF scores (or a baseline)."""

    allocation: str = field(default="layerif", metadata={"help": "experts per block from: layerif, alpha or uniform"})
    reverse: bool = field(default=False, metadata={"help": "layerif: more experts where S_l is low"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter's initialisation, data order and dropout"})
    save: str | None = field(default=None, metadata={"help": "folder for adapter.safetensors and allocation.json"})


def run(args: MoeArgs) -> str:
    """``layerif moe``: allocate, fine-tune, evaluate, save; returns the terminal summary."""
    args.check([args.allocation])
    if args.save is not None:
        check_save_dir(args.save, "adapter folder")
    s = _setting(args)
    metric = _metric(s, args.allocation)
    experts = allocate_experts(args.allocation, metric, s.n_blocks, args.total_experts, args.beta, args.reverse)
    top_k = top_k_for(experts)
    label = {"scores": "S_l", "alpha": "alpha"}.get(allocate.ALLOCATIONS[args.allocation].metric, "")
    progress.info(f"{args.allocation} allocation of {int(experts.sum())} experts over {s.n_blocks} blocks; training")
    r = _fit(s, args, experts, args.seed)
    lines = [
        f"{s.lm.name} · task {s.task} · allocation {args.allocation}{' reversed' if args.reverse else ''} · "
        f"T={int(experts.sum())} · β={args.beta:g} · rank {args.rank} · "
        f"{r['trainable_params']:,} trainable parameters",
        _experts_table(experts, top_k, metric, label),
        f"training: {args.steps} steps, loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, {r['seconds']:.1f} s",
        f"test ({len(s.test_records)} items): accuracy {r['accuracy']:.4f} (multiple choice), "
        f"exact match {r['exact_match']:.4f} (greedy)",
    ]
    if args.save is not None:
        record = {
            "model": s.lm.name, "task": s.task, "allocation": args.allocation, "reverse": args.reverse,
            "total_experts": int(experts.sum()), "beta": args.beta,
            "metric": None if metric is None else [float(m) for m in metric],
            "result": {k: r[k] for k in ("accuracy", "exact_match", "trainable_params", "seconds", "losses")},
            "args": asdict(args),
        }
        dest = save_adapter(s.lm.model, args.save, record)
        lines.append(f"wrote {dest}/ ({ADAPTER_FILE}, {ALLOCATION_FILE})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- layerif compare-moe


@dataclass
class CompareMoeArgs(_MoeOptions):
    """Compare expert allocations (LayerIF both ways, AlphaLoRA, uniform) at equal T over several seeds."""

    allocations: list[str] = field(default_factory=lambda: list(COMPARE_EXPERTS), metadata={"help": "allocations to compare"})
    seeds: list[str] = field(default_factory=lambda: ["0", "1", "2"], metadata={"help": "training seeds (at least 3 for mean ± std)"})
    out: str = field(default="out/compare-moe", metadata={"help": "output folder"})
    overwrite: bool = overwrite_field()


CSV_FIELDS = ("allocation", "seed", "accuracy", "exact_match", "final_loss", "trainable_params", "seconds")


def _rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    return buf.getvalue()


def _compare_markdown(rows: list[dict], allocs: dict[str, np.ndarray], meta: dict) -> str:
    """comparison.md: mean ± std over seeds per allocation, best mean accuracy in bold, and the allocations."""
    base = next(r for r in rows if r["allocation"] == "base")
    lines = [f"# LoRA-MoE expert allocations on {meta['model']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "model"]
    lines += [f"- base model without adapter: accuracy {base['accuracy']:.4f}, exact match {base['exact_match']:.4f}",
              "", "| allocation | accuracy ↑ | exact match ↑ | final train loss¹ | trainable params | train time (s) | seeds |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    stats = {a: {k: mean_std([r[k] for r in rows if r["allocation"] == a])
                 for k in ("accuracy", "exact_match", "final_loss", "trainable_params", "seconds")}
             for a in allocs}
    best_acc = max(st["accuracy"][0] for st in stats.values())
    best_em = max(st["exact_match"][0] for st in stats.values())
    for a, st in stats.items():
        acc, em = mean_std_cell(st["accuracy"], best_acc, 4), mean_std_cell(st["exact_match"], best_em, 4)
        n = sum(r["allocation"] == a for r in rows)
        lines.append(f"| {a} | {acc} | {em} | {st['final_loss'][0]:.4f} | {int(st['trainable_params'][0]):,} | "
                     f"{st['seconds'][0]:.1f} ± {st['seconds'][1]:.1f} | {n} |")
    lines += ["", "¹ mean training loss over the last 10% of the steps, averaged over seeds."]
    winners = [a for a, st in stats.items() if st["accuracy"][0] == best_acc]
    if "layerif" in stats:
        if len(winners) == len(stats):
            verdict = "No allocation wins: every one has the same mean accuracy"
        elif winners == ["layerif"]:
            runner_up = max(st["accuracy"][0] for a, st in stats.items() if a != "layerif")
            verdict = f"LayerIF has the best mean accuracy, {best_acc - runner_up:.4f} above the next best"
        elif "layerif" in winners:
            verdict = f"LayerIF ties for the best mean accuracy with {', '.join(w for w in winners if w != 'layerif')}"
        else:
            verdict = (f"LayerIF does not win: {', '.join(winners)} {'has' if len(winners) == 1 else 'have'} "
                       "the best mean accuracy, "
                       f"{best_acc - stats['layerif']['accuracy'][0]:.4f} above LayerIF")
        lines += ["", f"{verdict} (compare the gaps with the standard deviations over seeds)."]
    lines += ["", "## Experts per block", "", "| allocation | experts (block 0 → L−1) |", "|---|---|"]
    lines += [f"| {a} | {' '.join(map(str, e.tolist()))} |" for a, e in allocs.items()]
    return "\n".join(lines) + "\n"


def _experts_plot(allocs: dict[str, np.ndarray], title: str):
    """Experts per block, one line per allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    for a, e in allocs.items():
        ax.plot(range(len(e)), e, marker="o", markersize=3, label=a)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("LoRA experts")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def run_compare(args: CompareMoeArgs) -> str:
    """``layerif compare-moe``: every allocation × seed, then the comparison files.

    Writes comparison.csv (one row per run, after every run), comparison.md,
    experts_per_layer.png, allocations.json and config.json into ``args.out``.
    """
    allocations = list(dict.fromkeys(args.allocations))
    try:
        seeds = [int(x) for x in args.seeds]
    except ValueError:
        raise UserError(f"--seeds: cannot read {','.join(args.seeds)} as integers") from None
    if not allocations or not seeds:
        raise UserError("--allocations and --seeds need at least one value each")
    args.check(allocations)
    with output_folder(args.out, "compare-moe", args.overwrite) as out:
        s = _setting(args)
        metrics = {a: _metric(s, a) for a in allocations}
        allocs = {a: allocate_experts(a, metrics[a], s.n_blocks, args.total_experts, args.beta) for a in allocations}
        total = int(next(iter(allocs.values())).sum())
        meta = {"model": s.lm.name,
                "task": f"{s.task} ({len(s.train_records)} train items, {len(s.test_records)} test items)",
                "scores": f"{args.scores} (target {s.scores_doc.get('target')}, estimator {s.scores_doc.get('estimator')})"
                if args.scores else "none",
                "budget": f"T = {total} experts over {s.n_blocks} blocks, β = {args.beta:g}, "
                          "top-2 where a block has > 1 expert",
                "adapter": f"targets {args.targets}, rank {args.rank}, alpha {args.lora_alpha:g}, dropout {args.dropout:g}, "
                           f"load-balancing coefficient {args.aux_loss_coef:g}",
                "training": f"{args.steps} steps × {args.batch_size * args.grad_accum} records, AdamW lr {args.lr:g}, "
                            f"warm-up {args.warmup:g}, then linear decay",
                "seeds": ", ".join(map(str, seeds)),
                "accuracy": "multiple-choice log-likelihood; exact match: greedy completion"}
        write_config(out, "compare-moe", args)
        base = evaluate_records(s.lm.model, s.lm.tokenizer, s.test_records, args.eval_batch_size, args.max_new_tokens)
        rows = [{"allocation": "base", "seed": "-", **base, "final_loss": float("nan"), "trainable_params": 0,
                 "seconds": 0.0}]
        for seed, a in progress.track([(seed, a) for seed in seeds for a in allocations], desc="compare-moe", unit="run"):
            r = _fit(s, args, allocs[a], seed)
            remove_lora_moe(s.lm.model)
            tail = r["losses"][-max(1, len(r["losses"]) // 10):]
            rows.append({"allocation": a, "seed": str(seed), "accuracy": r["accuracy"], "exact_match": r["exact_match"],
                         "final_loss": sum(tail) / len(tail), "trainable_params": r["trainable_params"], "seconds": r["seconds"]})
            write_text(out / "comparison.csv", _rows_csv(rows))
        md = _compare_markdown(rows, allocs, meta)
        write_text(out / "comparison.csv", _rows_csv(rows))
        write_text(out / "comparison.md", md)
        write_json(out / "allocations.json", {a: {"layers": list(range(s.n_blocks)), "experts": e.tolist(),
                                               "top_k": top_k_for(e).tolist()} for a, e in allocs.items()})
        write_figure(out / "experts_per_layer.png", _experts_plot(allocs, f"{s.lm.name} · task {s.task} · T={total}"))
        write_report(out)
    out = Path(args.out)
    return md + (f"\nwrote {out}/comparison.csv, comparison.md, experts_per_layer.png, allocations.json, config.json, "
                 "report.md, report.html")
