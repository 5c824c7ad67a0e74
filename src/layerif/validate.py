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

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__, progress
from .compare import ALL_ESTIMATORS, CompareEstimatorsArgs, _hidden, block_influence
from .data import Encoded
from .errors import UserError
from .grads import record_losses
from .evaluate import mc_accuracy
from .io import output_folder, prepare_out_dir, write_figure, write_json, write_text
from .models import Target, find_blocks, projections, select_targets, weight_out_in
from .prune import (
    BLOCK_SIZE,
    DAMPING,
    METHODS,
    InputStats,
    _check_method,
    _check_sizes,
    _corpus,
    _windows,
    calibrate,
    prune_module,
)
from .scores import aggregate, default_max_memory_gb, load_checked, module_stats, prepare, validate
from .report import ESTIMATOR_LABEL, TRUTHS, spearman_rows, validation_reading, validation_truths, write_report
from .results import write_config
from .stability import LEVEL, finite, fmt, spearman_interval
from .tasks import TASKS, test_records
from .train import TrainConfig, train_encoded

AGGREGATIONS = ("score", "sum", "mean_abs")  # score = S_l (scores.py's "helpful")
# sign of the correlation a profile claims: aggregation orientation x ground truth direction (module docstring)
ORIENTATION = {"score": 1, "sum": -1, "mean_abs": 1}
CLAIM = {"fine_tune_gain": 1, "prune_loss_rise": -1, "prune_accuracy_change": 1}


@dataclass
class ValidateArgs(CompareEstimatorsArgs):
    """Measure each block's fine-tune gain and pruning sensitivity and test whether the layer scores predict them."""

    bootstrap: int = _hidden(0, "the intervals here resample blocks: --bootstrap-blocks")
    split_half: bool = _hidden(False)
    estimators: list[str] = field(default_factory=lambda: ["datainf", "exact", "grad-dot"], metadata={
        "help": f"estimators whose S_l are validated, comma-separated ({', '.join(ALL_ESTIMATORS)})"})
    steps: int = field(default=10, metadata={"help": "fine-tuning steps K per block"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the per-block fine-tuning (linear decay)"})
    ft_batch_size: int = field(default=4, metadata={"help": "train records per fine-tuning step"})
    sparsity: float = field(default=0.5, metadata={"help": "sparsity s of the single pruned block, in (0, 1)"})
    method: str = field(default="wanda", metadata={"help": "pruner", "choices": METHODS})
    n_calib: int = field(default=16, metadata={"help": "calibration windows (wanda, sparsegpt)"})
    seqlen: int = field(default=128, metadata={"help": "tokens per calibration window"})
    text: str | None = field(default=None, metadata={"help": "calibration text file (default: built-in English corpus)"})
    accuracy_task: str | None = field(default=None, metadata={
        "help": "built-in task or JSONL of {prompt, options, answer} for the accuracy change (default: --task "
                "unless --train/--val are given; none: no accuracy)"})
    task_items: int = field(default=100, metadata={"help": "test items of the accuracy task"})
    eval_batch_size: int = field(default=16, metadata={"help": "sequences per evaluation batch"})
    bootstrap_blocks: int = field(default=1000, metadata={"help": "bootstrap resamples of the blocks for the Spearman intervals"})
    out: str = field(default="out/validate", metadata={"help": "output folder"})


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
    and restored. Wanda and SparseGPT take their input statistics from the dense
    model's activations on ``windows`` (token ids [n, seqlen]; one calibration
    pass serves every block, since the blocks before l are dense). Returns
    ``loss_rise`` (L_val pruned − dense, > 0: hurt), ``accuracy_change``
    (pruned − dense, < 0: hurt; None without ``accuracy_records``), the raw
    ``val_loss`` / ``accuracy`` per block and the dense ``base_val_loss`` /
    ``base_accuracy``.
    """
    _check_method(method)
    pad = tokenizer.pad_token_id
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
    if method == "magnitude":
        _, blocks = find_blocks(model)
        for idx in progress.track(layers, desc="pruning blocks", unit="block"):
            measure(idx, blocks[idx], None)
    else:
        if windows is None:
            raise ValueError(f"{method} needs calibration windows")
        for idx, block, stats in calibrate(model, windows, hessian=(method == "sparsegpt"), update=False):
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


# ----------------------------------------------------------------------------- command


def check_args(args: ValidateArgs) -> list[str]:
    """Option checks that need no model; returns the estimators (deduplicated, in order)."""
    validate(args, "validate")
    names = list(dict.fromkeys(args.estimators))
    unknown = [e for e in names if e not in ALL_ESTIMATORS]
    if unknown or not names:
        raise UserError(f"unknown estimator {(unknown or [''])[0]!r} (use {', '.join(ALL_ESTIMATORS)})")
    if args.target == "lora":
        raise UserError("--target lora is not supported: validate trains and prunes the base projections (use attn, mlp, block or a regex)")
    if args.steps < 1 or args.ft_batch_size < 1 or args.eval_batch_size < 1:
        raise UserError("--steps, --ft-batch-size and --eval-batch-size must be >= 1")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0 (got {args.lr})")
    if not 0 < args.sparsity < 1:
        raise UserError(f"--sparsity must be in (0, 1) (got {args.sparsity})")
    _check_method(args.method)
    _check_sizes(args.n_calib, args.seqlen, DAMPING, BLOCK_SIZE)
    if args.task_items < 1:
        raise UserError(f"--task-items must be >= 1 (got {args.task_items})")
    if args.bootstrap_blocks < 2:
        raise UserError(f"--bootstrap-blocks must be >= 2 (got {args.bootstrap_blocks})")
    if args.lissa_iterations < 1 or args.lissa_batch < 0:
        raise UserError("--lissa-iterations must be >= 1 and --lissa-batch >= 0")
    return names


def accuracy_source(args: ValidateArgs) -> str | None:
    """The accuracy task: ``--accuracy-task``, else the built-in ``--task`` when no record files are given."""
    if args.accuracy_task:
        return args.accuracy_task
    return args.task if not (args.train or args.val) and args.task in TASKS else None


def ground_truth(lm, train: list[Encoded], val: list[Encoded], targets: list[Target], opts, seed: int = 0) -> dict:
    """Measure every targeted block's fine-tune gain and pruning sensitivity (the model is left as it was).

    ``opts``: the ground-truth options (:class:`ValidateArgs`' ``steps``, ``lr``,
    ``ft_batch_size``, ``sparsity``, ``method``, ``n_calib``, ``seqlen``, ``text``,
    ``accuracy_task`` (see :func:`accuracy_source`), ``task_items``,
    ``eval_batch_size``). Returns the
    measurement part of validation.json: ``layers``, ``fine_tune``, ``pruning``,
    ``base``, ``fine_tune_gain``, ``prune_sensitivity``, ``seconds``.
    """
    model, pad = lm.model, lm.tokenizer.pad_token_id
    acc_source = accuracy_source(opts)
    acc_records = test_records(acc_source, opts.task_items) if acc_source else None
    t0 = time.perf_counter()
    progress.info(f"fine-tune gain: {opts.steps} Adam steps of {opts.ft_batch_size} records per block")
    config = TrainConfig(steps=opts.steps, batch_size=opts.ft_batch_size, lr=opts.lr, warmup=0.0,
                         weight_decay=0.0, max_grad_norm=0.0, seed=seed)
    layers, gains, base_loss = fine_tune_gain(model, targets, train, val, pad, config, opts.eval_batch_size)
    t1 = time.perf_counter()
    progress.info(f"pruning sensitivity: {opts.method} at sparsity {opts.sparsity:g}, one block at a time")
    windows = None
    if opts.method != "magnitude":
        windows = _windows(lm.tokenizer, _corpus(opts.text)[0], opts.n_calib, opts.seqlen, seed)
    pruned = prune_sensitivity(model, lm.tokenizer, layers, val, opts.method, opts.sparsity, windows, acc_records,
                               opts.eval_batch_size)
    t2 = time.perf_counter()
    return {
        "layers": layers,
        "fine_tune": {"steps": opts.steps, "lr": opts.lr, "batch_size": opts.ft_batch_size, "optimizer": "adam",
                      "seed": seed},
        "pruning": {"method": opts.method, "sparsity": opts.sparsity, "n_calib": opts.n_calib, "seqlen": opts.seqlen,
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


def compute(args: ValidateArgs, lm=None) -> dict:
    """The validation.json document (the Python API behind ``layerif validate``; no files written)."""
    names = check_args(args)
    lm, train, val, label, _ = prepare(args, *((lm, None) if lm is not None else load_checked(args)))
    targets = select_targets(lm.model, args.target)
    t0 = time.perf_counter()
    progress.info(f"Gram statistics of {len(targets)} modules: {len(train)} train x {len(val)} validation records")
    stats, _, passes = module_stats(lm.model, targets, train, val, lm.tokenizer.pad_token_id, False, args.batch_size,
                                    args.max_memory or default_max_memory_gb(), args.layout)
    influence = {e: block_influence(stats, targets, e, args.damping_scale, args.lissa_iterations, args.lissa_batch,
                                    args.seed) for e in names}
    seconds = time.perf_counter() - t0
    measured = ground_truth(lm, train, val, targets, args, args.seed)
    measured["seconds"] = {"scores": round(seconds, 2), **measured["seconds"]}
    head = {"model": lm.name, "task": label, "target": args.target, "damping_scale": args.damping_scale,
            "n_train": len(train), "n_val": len(val), "passes": passes}
    return validation_doc(head, influence, measured, args.bootstrap_blocks, args.seed)


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerows([["" if x is None else repr(x) if isinstance(x, float) else x for x in r] for r in rows])
    return buf.getvalue()


def blocks_csv(doc: dict) -> str:
    """validation.csv: one row a block, the ground truths and every estimator's S_l."""
    truths = validation_truths(doc)
    names = doc["estimators"]
    head = ["layer", *TRUTHS, *(f"{e}_score" for e in names)]
    rows = [[l, *((truths[g] or [None] * len(doc["layers"]))[i] for g in TRUTHS),
             *(doc["scores"][e]["score"][i] for e in names)] for i, l in enumerate(doc["layers"])]
    return _csv([head] + rows)


def figure(doc: dict):
    """validation.png: each estimator's S_l (share of its total) per block, and the ground truths per block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = doc["layers"]
    ps = doc["prune_sensitivity"]
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    ax = axes[0]
    for i, e in enumerate(doc["estimators"]):
        s = torch.tensor(doc["scores"][e]["score"], dtype=torch.float64)
        ax.plot(layers, (s / s.sum() if s.sum() > 0 else s).numpy(), marker="osd^v"[i % 5],
                ls=("-", "--", "-.", ":")[i % 4], ms=4, label=ESTIMATOR_LABEL.get(e, e))
    ax.set_ylabel("share of S_l")
    ax.legend(fontsize=8)
    ax.set_title(f"{doc['model']} · task {doc['task']} · target {doc['target']} · "
                 f"n={doc['n_train']}x{doc['n_val']}", fontsize=10)
    ft = doc["fine_tune"]
    axes[1].bar(layers, doc["fine_tune_gain"], color="#3a6ea5")
    axes[1].set_ylabel("fine-tune gain\n(val loss drop)")
    axes[1].set_title(f"train block l alone: {ft['steps']} Adam steps, lr {ft['lr']:g}, {ft['batch_size']} records",
                      fontsize=9)
    pr = doc["pruning"]
    axes[2].bar(layers, ps["loss_rise"], color="#a5473a", label="val loss rise")
    axes[2].set_ylabel("pruning loss rise")
    axes[2].set_title(f"prune block l alone: {pr['method']} at {pr['sparsity']:g}", fontsize=9)
    if ps["accuracy_change"] is not None:
        tw = axes[2].twinx()
        tw.plot(layers, ps["accuracy_change"], "k.-", ms=4, label="accuracy change")
        tw.set_ylabel("accuracy change")
        tw.axhline(0, color="k", lw=0.5)
    axes[2].set_xlabel("decoder block")
    for a in axes:
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def write(doc: dict, args: ValidateArgs, folder: str | Path | None = None) -> Path:
    """validation.json, validation.csv, spearman.csv, validation.png, config.json, report.md / report.html
    into ``folder`` (default args.out)."""
    out = prepare_out_dir(folder if folder is not None else args.out)
    write_text(out / "validation.csv", blocks_csv(doc))
    write_text(out / "spearman.csv", _csv([["estimator", "aggregation", "ground_truth", "rho", "ci_low", "ci_high",
                                            "claimed_sign", "verdict"]] + spearman_rows(doc)))
    write_figure(out / "validation.png", figure(doc))
    write_config(out, "validate", args)
    write_json(out / "validation.json", doc)
    write_report(out)
    return out


def run(args: ValidateArgs) -> str:
    """``layerif validate``: measure, correlate, write the files; returns the terminal summary."""
    check_args(args)
    with output_folder(args.out, "validate", args.overwrite) as tmp:
        doc = compute(args)
        write(doc, args, tmp)
    out = Path(args.out)
    lines = [f"{doc['model']} · task {doc['task']} · target {args.target} · {doc['n_train']} train x {doc['n_val']} "
             f"validation · {len(doc['layers'])} blocks · {sum(doc['seconds'].values()):.0f} s",
             f"{'estimator':>9} {'agg':>8} {'ground truth':>22} {'rho':>6}  interval        verdict"]
    lines += [f"{e:>9} {a:>8} {g:>22} {fmt(r, 2):>6}  [{fmt(lo, 2)}, {fmt(hi, 2)}]  {v}"
              for e, a, g, r, lo, hi, _, v in spearman_rows(doc) if a == "score"]
    lines += validation_reading(doc)[:1]
    lines.append(f"wrote {out}/validation.json, validation.csv, spearman.csv, validation.png, report.md, report.html")
    return "\n".join(lines)
