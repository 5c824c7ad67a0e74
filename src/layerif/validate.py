r"""Ground truth for block profiles: does S_l predict what it is used for? (``layerif validate``)

On the model, records and targets of a ``layerif score`` run, two quantities are
*measured* for every decoder block l that has targeted modules:

* **fine-tune gain** g_l = L_val(before) − L_val(after) (> 0: training block l
  helped): only block l's targeted projections are trained, for ``steps`` steps
  of ``ft_batch_size`` train records (the score run's records, seeded order),
  Adam (:func:`layerif.train.train_encoded`: AdamW without weight decay, no
  clipping, learning rate decaying linearly from ``lr``), starting from the same
  weights every time (they are restored after each block);
* **pruning sensitivity**: every projection of block l alone (attention and MLP,
  the rest of the model dense) is pruned at sparsity s with the chosen pruner
  (:func:`layerif.prune.prune_module`; Wanda / SparseGPT statistics from the
  dense model's calibration activations, :func:`layerif.prune.calibrate`), and
  r_l = L_val(pruned) − L_val(dense) (> 0: pruning hurt) and
  a_l = accuracy(pruned) − accuracy(dense) (multiple choice on test items; < 0:
  pruning hurt) are recorded.

L_val is the mean over the validation records of the per-sample loss the
influences are computed for (:func:`layerif.data.per_sample_loss`).

Then the Spearman correlation across blocks of each estimator's aggregation
(``score`` = S_l, ``sum`` = Σ_i I_l(i), ``mean_abs``) with each ground truth,
with a percentile bootstrap interval over blocks
(:func:`layerif.stability.spearman_interval`).

Sign conventions. I_l(i) < 0 means up-weighting train sample i lowers the
validation loss through block l (helpful); S_l = −Σ_i min(I_l(i), 0) ≥ 0 is
the total helpful influence. What a profile *claims*:

* for fine-tuning (LayerIF's LoRA-MoE allocation gives more experts where S_l
  is high): high S_l ↔ large loss drop, so ρ(S_l, g_l) > 0 supports it;
* for pruning (LayerIF's sparsity allocation gives more sparsity where S_l is
  high): high S_l ↔ pruning hurts less, so ρ(S_l, r_l) < 0 and
  ρ(S_l, a_l) > 0 support it.

``sum`` is signed the other way (more negative = more helpful), so its claimed
correlations have the opposite sign; ``mean_abs`` (influence magnitude) is read
like ``score``. Every correlation is reported raw, with the claimed sign beside it.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from . import __version__, progress
from .data import Encoded, pad_id
from .evaluate import mc_accuracy
from .grads import record_losses
from .models import Target, find_blocks, projections, weight_out_in
from .prune import BLOCK_SIZE, DAMPING, InputStats, calibrate, get_pruner, prune_module
from .scores import aggregate
from .stability import LEVEL, finite, spearman_interval
from .tasks import TASKS, test_records
from .train import TrainConfig, train_encoded

AGGREGATIONS = ("score", "sum", "mean_abs")  # score = S_l (scores.py's "helpful")
# sign of the correlation a profile claims: aggregation orientation x ground truth direction (module docstring)
ORIENTATION = {"score": 1, "sum": -1, "mean_abs": 1}
CLAIM = {"fine_tune_gain": 1, "prune_loss_rise": -1, "prune_accuracy_change": 1}


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def mean_loss(model: nn.Module, records: list[Encoded], pad: int, batch_size: int = 16) -> float:
    """Mean over ``records`` of the per-sample loss (:func:`layerif.data.per_sample_loss`), model in eval mode."""
    model.eval()
    return float(record_losses(model, records, pad, batch_size).mean())


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def fine_tune_gain(
    model: nn.Module,
    targets: list[Target],
    train: list[Encoded],
    val: list[Encoded],
    pad: int,
    config: TrainConfig,
    eval_batch_size: int = 16,
) -> tuple[list[int], list[float], float]:
    """Loss drop from training each block's targeted modules alone.

    For each block l with targets (model order): only the parameters of l's
    targets train, with :func:`layerif.train.train_encoded` and ``config`` (the
    same seed, hence the same record order, for every block); g_l = L_val before
    − L_val after (> 0: the validation loss fell). Weights and ``requires_grad``
    are restored after each block. Returns (blocks, g per block, L_val before).
    """
    base = mean_loss(model, val, pad, eval_batch_size)
    layers = sorted({t.block for t in targets})
    flags = {p: p.requires_grad for p in model.parameters()}
    gains = []
    try:
        for l in progress.track(layers, desc="fine-tuning blocks", unit="block"):
            params = [p for t in targets if t.block == l for p in t.module.parameters(recurse=False)]
            saved = _snapshot(params)
            for p in model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            try:
                train_encoded(model, pad, train, config)
                gains.append(base - mean_loss(model, val, pad, eval_batch_size))
            finally:
                _restore(params, saved)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
    return layers, gains, base


def prune_sensitivity(
    model: nn.Module,
    tokenizer,
    layers: list[int],
    val: list[Encoded],
    method: str,
    sparsity: float,
    windows: torch.Tensor | None = None,
    accuracy_records: list[dict] | None = None,
    eval_batch_size: int = 16,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> dict:
    """Validation loss and accuracy after pruning one block at a time, the rest dense.

    For each block in ``layers``, every projection of that block is pruned at
    ``sparsity`` with ``method`` (:func:`layerif.prune.prune_module`), measured,
    and restored. A pruner that needs calibration takes its input statistics from the dense
    model's activations on ``windows`` (token ids [n, seqlen]; one calibration
    pass serves every block, since the blocks before l are dense). Returns
    ``loss_rise`` (L_val pruned − dense, > 0: hurt), ``accuracy_change``
    (pruned − dense, < 0: hurt; None without ``accuracy_records``), the raw
    ``val_loss`` / ``accuracy`` per block and the dense ``base_val_loss`` /
    ``base_accuracy``.
    """
    pruner = get_pruner(method)
    pad = pad_id(tokenizer)
    accuracy = (lambda: mc_accuracy(model, tokenizer, accuracy_records, eval_batch_size)) if accuracy_records else None
    base_loss = mean_loss(model, val, pad, eval_batch_size)
    base_acc = accuracy() if accuracy else None
    losses: dict[int, float] = {}
    accs: dict[int, float | None] = {}

    def measure(idx: int, block: nn.Module, stats: dict[str, InputStats] | None) -> None:
        mods = projections(block)
        weights = [weight_out_in(m) for m in mods.values()]
        saved = _snapshot(weights)
        try:
            for rel, mod in mods.items():
                prune_module(mod, method, sparsity, stats[rel] if stats else None, None, damping, block_size)
            losses[idx] = mean_loss(model, val, pad, eval_batch_size)
            accs[idx] = accuracy() if accuracy else None
        finally:
            _restore(weights, saved)

    wanted = set(layers)
    if not pruner.needs_calibration:
        _, blocks = find_blocks(model)
        for idx in progress.track(layers, desc="pruning blocks", unit="block"):
            measure(idx, blocks[idx], None)
    else:
        if windows is None:
            raise ValueError(f"{method} needs calibration windows")
        for idx, block, stats in calibrate(model, windows, hessian=pruner.needs_hessian, update=False):
            if idx in wanted:
                measure(idx, block, stats)
    return {
        "loss_rise": [losses[l] - base_loss for l in layers],
        "accuracy_change": [accs[l] - base_acc for l in layers] if accuracy else None,
        "val_loss": [losses[l] for l in layers],
        "accuracy": [accs[l] for l in layers] if accuracy else None,
        "base_val_loss": base_loss,
        "base_accuracy": base_acc,
    }


def profile_scores(
    influence: dict[str, dict[int, torch.Tensor]], layers: list[int]
) -> dict[str, dict[str, list[float]]]:
    """{estimator: {aggregation: per-block values}} from block influences {estimator: {block: I_l [n]}}."""
    out = {}
    for e, inf in influence.items():
        agg = [aggregate(inf[l]) for l in layers]
        out[e] = {a: [x["helpful" if a == "score" else a] for x in agg] for a in AGGREGATIONS}
    return out


def verdict(claimed: int, low: float | None, high: float | None) -> str:
    """'as claimed' when the interval lies on the claimed side of 0, 'opposite' when on the other, else 'inconclusive'."""
    if low is None or high is None:
        return "undefined"
    if claimed * low > 0 and claimed * high > 0:
        return "as claimed"
    if claimed * low < 0 and claimed * high < 0:
        return "opposite"
    return "inconclusive"


def correlate(
    scores: dict[str, dict[str, list[float]]], truths: dict[str, list[float] | None], B: int = 1000, seed: int = 0,
    level: float = LEVEL,
) -> dict:
    """{estimator: {aggregation: {truth: {rho, ci_low, ci_high, claimed_sign, verdict}}}} over blocks.

    ``truths`` with None values (e.g. no accuracy task) are skipped. ``claimed_sign``
    is the sign of the correlation the profile's use implies (module docstring).
    """
    out: dict = {}
    for e, aggs in scores.items():
        out[e] = {}
        for a, values in aggs.items():
            out[e][a] = {}
            for g, truth in truths.items():
                if truth is None:
                    continue
                rho, lo, hi = spearman_interval(values, truth, B, seed, level)
                claimed = ORIENTATION[a] * CLAIM[g]
                lo_, hi_ = finite(lo), finite(hi)
                out[e][a][g] = {"rho": finite(rho), "ci_low": lo_, "ci_high": hi_, "claimed_sign": claimed,
                                "verdict": verdict(claimed, lo_, hi_)}
    return out


# ----------------------------------------------------------------------------- the document


def accuracy_source(opts) -> str | None:
    """The accuracy task: ``--accuracy-task`` (``none``: no accuracy), else the built-in ``--task`` when no record
    files are given."""
    if opts.accuracy_task == "none":
        return None
    if opts.accuracy_task:
        return opts.accuracy_task
    return opts.task if not (opts.train or opts.val) and opts.task in TASKS else None


def ground_truth(lm, train: list[Encoded], val: list[Encoded], targets: list[Target], opts, seed: int = 0) -> dict:
    """Measure every targeted block's fine-tune gain and pruning sensitivity (the model is left as it was).

    ``opts``: the ground-truth options (:class:`layerif.commands.validate.ValidateArgs`' ``steps``, ``lr``,
    ``ft_batch_size``, ``sparsity``, ``method``, ``n_calib``, ``seqlen`` (None: the default of the
    model's device, ``opts.CPU_CALIBRATION`` on a CPU), ``calib``, ``text_field``,
    ``accuracy_task`` (see :func:`accuracy_source`), ``task_items``,
    ``eval_batch_size``). Returns the
    measurement part of validation.json: ``layers``, ``fine_tune``, ``pruning``,
    ``base``, ``fine_tune_gain``, ``prune_sensitivity``, ``seconds``.
    """
    model, pad = lm.model, pad_id(lm.tokenizer)
    acc_source = accuracy_source(opts)
    acc_records = test_records(acc_source, opts.task_items) if acc_source else None
    t0 = time.perf_counter()
    progress.info(f"fine-tune gain: {opts.steps} Adam steps of {opts.ft_batch_size} records per block")
    config = TrainConfig(steps=opts.steps, batch_size=opts.ft_batch_size, lr=opts.lr, warmup=0.0,
                         weight_decay=0.0, max_grad_norm=0.0, seed=seed)
    layers, gains, base_loss = fine_tune_gain(model, targets, train, val, pad, config, opts.eval_batch_size)
    t1 = time.perf_counter()
    progress.info(f"pruning sensitivity: {opts.method} at sparsity {opts.sparsity:g}, one block at a time")
    from .datasets_io import calibration_size, calibration_windows

    device = next(model.parameters()).device.type
    n_calib, seqlen, which = calibration_size(opts.n_calib, opts.seqlen, device, opts.CPU_CALIBRATION)
    windows = None
    if get_pruner(opts.method).needs_calibration:
        windows = calibration_windows(lm.tokenizer, opts.calib, n_calib, seqlen, seed, opts.text_field)
    pruned = prune_sensitivity(model, lm.tokenizer, layers, val, opts.method, opts.sparsity, windows, acc_records,
                               opts.eval_batch_size)
    t2 = time.perf_counter()
    return {
        "layers": layers,
        "fine_tune": {"steps": opts.steps, "lr": opts.lr, "batch_size": opts.ft_batch_size, "optimizer": "adam",
                      "seed": seed},
        "pruning": {"method": opts.method, "sparsity": opts.sparsity, "n_calib": n_calib, "seqlen": seqlen,
                    "calibration_size": which, "calib": opts.calib,
                    "accuracy_task": acc_source, "task_items": len(acc_records) if acc_records else 0},
        "base": {"val_loss": base_loss, "accuracy": pruned["base_accuracy"]},
        "fine_tune_gain": gains,
        "prune_sensitivity": {k: pruned[k] for k in ("loss_rise", "accuracy_change", "val_loss", "accuracy")},
        "seconds": {"fine_tune": round(t1 - t0, 2), "prune": round(t2 - t1, 2)},
    }


def validation_doc(head: dict, influence: dict[str, dict[int, torch.Tensor]], measured: dict, B: int = 1000,
                   seed: int = 0) -> dict:
    """validation.json: ``head`` (model, task, target, n_train, n_val, ...), the measurements of
    :func:`ground_truth`, every estimator's aggregations (``influence``: {estimator: {block: I_l [n]}}) and their
    Spearman correlations with every ground truth (:func:`correlate`)."""
    layers = measured["layers"]
    scores = profile_scores(influence, layers)
    ps = measured["prune_sensitivity"]
    truths = {"fine_tune_gain": measured["fine_tune_gain"], "prune_loss_rise": ps["loss_rise"],
              "prune_accuracy_change": ps["accuracy_change"]}
    return {**head, "estimators": list(influence), **measured, "scores": scores,
            "spearman": correlate(scores, truths, B, seed),
            "bootstrap": {"B": B, "level": LEVEL, "over": "blocks"},
            "conventions": {"orientation": ORIENTATION, "claim": CLAIM}, "version": __version__}
