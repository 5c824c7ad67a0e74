r"""Ground truth for block profiles: does S_l predict what it is used for? (``layerif validate``)

On the model and targets of a ``layerif score`` run, two quantities are
*measured* for every decoder block l that has targeted modules:

* **fine-tune gain** g_l = L_val(before) − L_val(after) (> 0: training block l
  helped): only block l's targeted projections are trained, for ``steps`` steps
  of ``ft_batch_size`` ground-truth train records (seeded order),
  Adam (:func:`layerif.train.train_encoded`: AdamW without weight decay, no
  clipping, learning rate decaying linearly from ``lr``), starting from the same
  weights every time (they are restored after each block);
* **pruning sensitivity**: every projection of block l alone (attention and MLP,
  the rest of the model dense) is pruned at sparsity s with the chosen pruner
  (:func:`layerif.prune.prune_module`; Wanda / SparseGPT statistics from the
  dense model's calibration activations, :func:`layerif.calibration.calibrate`), and
  r_l = L_val(pruned) − L_val(dense) (> 0: pruning hurt) and
  a_l = accuracy(pruned) − accuracy(dense) (multiple choice on test items; < 0:
  pruning hurt) are recorded.

L_val is the mean over the ground-truth validation records of the per-sample
loss the influences are computed for (:func:`layerif.data.per_sample_loss`).

Records (:func:`draw_records`). The ground truth is read **out of sample**: its
train and validation records are disjoint (by record text, :func:`record_text`)
from the scoring records and from each other. A built-in task's come from the
items its scoring run leaves unused (the same seeded order of the split, after
the scoring records); a user's ``--train`` / ``--val`` files are split (seeded,
by distinct record text) into a ground-truth part and a scoring part. The
in-sample reading (trained on the scoring train records, measured on the
scoring validation records, as before out-of-sample was the default) can be
measured beside it. The accuracy items are a task's test split (disjoint from
its train and validation splits) or the user's file; calibration windows are
text of ``--calib``, not records.

Then the Spearman correlation across blocks of each estimator's aggregation
(:data:`layerif.scores.AGGREGATIONS`: ``score`` = S_l, ``sum`` = Σ_i I_l(i), ``mean_abs``) with each ground truth,
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

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import __version__, progress
from .calibration import InputStats, calibrate
from .data import Encoded, Fields, check_records, encode_split, load_records, pad_id, record_kind
from .errors import UserError, require_finite
from .evaluate import mc_accuracy
from .grads import record_losses
from .models import LoadedModel, Projection, context_length, find_blocks, projections, weight_out_in
from .prune import BLOCK_SIZE, DAMPING, get_pruner, prune_module
from .scores import AGGREGATIONS, ScoreArgs, aggregate, file_key, load_splits, prepare, raw_splits
from .stability import LEVEL, finite, spearman_interval
from .tasks import TASKS, get_task, test_records
from .train import TrainConfig, train_encoded

VALIDATED = ("helpful", "sum", "mean_abs")  # of scores.AGGREGATIONS; helpful = S_l, "score" in the files
IN_SAMPLE = "_in_sample"  # suffix of the in-sample ground truths (measured on the scoring records)
# sign of the correlation a profile claims: aggregation orientation x ground truth direction (module docstring)
ORIENTATION = {file_key(a): AGGREGATIONS[a].orientation for a in VALIDATED}  # by validation.json's names
CLAIM = {"fine_tune_gain": 1, "prune_loss_rise": -1, "prune_accuracy_change": 1,
         "fine_tune_gain" + IN_SAMPLE: 1, "prune_loss_rise" + IN_SAMPLE: -1}


# ----------------------------------------------------------------------------- records


def record_text(record: dict, fields: Fields = Fields()) -> str:
    """The text a train or validation record puts before the model: its text field, or prompt + completion.
    The identity of a record: two record sets are disjoint when no text is in both."""
    if record_kind(record, fields) == "text":
        return record[fields.text]
    return record[fields.prompt] + record[fields.completion]


def item_text(item: dict) -> str:
    """A multiple-choice item's text: its prompt + its correct option (what a record of it would hold)."""
    return item["prompt"] + item["options"][item["answer"]]


def text_hash(text: str) -> str:
    """The first 12 hex digits of the SHA-256 of ``text`` (UTF-8): a record's short, stable identity."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass
class RecordSet:
    """Records of one use: ``records`` and each one's position ``index`` (0-based) in ``source`` (a records file,
    or a built-in split in its seeded order)."""

    source: str
    records: list[dict]
    index: list[int]

    def texts(self, fields: Fields = Fields()) -> set[str]:
        return {record_text(r, fields) for r in self.records}

    def describe(self, fields: Fields = Fields()) -> dict:
        """validation.json's entry: ``source``, ``count``, ``index`` and ``hash`` (:func:`text_hash`) per record."""
        return {"source": self.source, "count": len(self.records), "index": self.index,
                "hash": [text_hash(record_text(r, fields)) for r in self.records]}


@dataclass
class Draw:
    """The record sets of a ground-truth run (:func:`draw_records`): the scoring records (``train``, ``val``,
    their ``label`` and :func:`layerif.scores.raw_splits`-style ``counts``) and the ground truth's
    (``truth_train``, ``truth_val``); ``rule`` says in words how they were drawn."""

    train: RecordSet
    val: RecordSet
    truth_train: RecordSet
    truth_val: RecordSet
    label: str
    counts: dict
    rule: str

    def scoring(self) -> tuple[list[dict], list[dict], str, dict]:
        """The scoring part as :func:`layerif.scores.raw_splits` gives it (for :func:`layerif.scores.load_splits`)."""
        return self.train.records, self.val.records, self.label, self.counts


def draw_records(args: ScoreArgs, gt_n_train: int | None = None, gt_n_val: int | None = None) -> Draw:
    """The scoring and ground-truth record sets of ``args`` (a score run's data options), all checked, no model.

    Built-in task: the scoring records are exactly :func:`layerif.scores.raw_splits`' (the first ``n`` of each
    split in its seeded order); the ground truth takes the next ``gt_n_train`` train and ``gt_n_val``
    validation items of the same orders (default: as many as scoring uses) whose fact group
    (:meth:`layerif.tasks.Task.group_of`) no scoring record states, so each of the four sets is disjoint from
    the others and from the test split, by text and by underlying fact. Record files: the distinct record
    texts of ``--val`` are shuffled (seed ``--seed``) and the first ``gt_n_val`` (default: half) become the
    ground-truth validation records; then those of ``--train`` not already taken, the first ``gt_n_train`` (default:
    half) the ground-truth train records; scoring uses every other record of each file, in file order
    (``--n-train`` / ``--n-val`` then take its first N). Too few distinct records for that is a
    :class:`~layerif.errors.UserError`, and so is any text shared by a ground-truth and another set.
    """
    fields = Fields(args.text_field, args.prompt_field, args.completion_field)
    for name, n in (("--gt-n-train", gt_n_train), ("--gt-n-val", gt_n_val)):
        if n is not None and n < 1:
            raise UserError(f"{name} must be >= 1 (got {n})")
    if args.train or args.val:
        draw = _draw_files(args, fields, gt_n_train, gt_n_val)
    else:
        draw = _draw_task(args, gt_n_train, gt_n_val)
    truth = {"ground-truth train": draw.truth_train, "ground-truth validation": draw.truth_val}
    others = {"scoring train": draw.train, "scoring validation": draw.val, **truth}
    for a, sa in truth.items():
        for b, sb in others.items():
            shared = sa.texts(fields) & sb.texts(fields) if a != b else set()
            if shared:
                raise UserError(f"the {a} and {b} records share {len(shared)} text(s), e.g. {sorted(shared)[0][:60]!r}")
    return draw


def _draw_task(args: ScoreArgs, gt_n_train: int | None, gt_n_val: int | None) -> Draw:
    train, val, label, counts = raw_splits(args)
    task = get_task(args.task, args.lm_eval_include)
    used = {task.group_of(r) for r in train + val}  # the facts scoring saw (a group: one underlying fact)
    sets = {}
    for split, scoring, asked, option in (("train", train, gt_n_train, "--n-train"),
                                          ("validation", val, gt_n_val, "--n-val")):
        what = "train" if split == "train" else "val"
        full = task.split(split, None, args.seed)  # every item once; scoring took the first len(scoring)
        k = len(scoring)
        n = k if asked is None else asked
        unused = [i for i in range(k, len(full)) if task.group_of(full[i]) not in used]
        if n > len(unused):
            raise UserError(f"the out-of-sample ground truth needs {n} {task.name} {split} items unused by scoring, "
                            f"but the split holds {len(full)} distinct items, {len(full) - len(unused)} of them "
                            f"taken by scoring or sharing a fact with its items (lower {option} or --gt-n-{what})")
        source = f"{task.name}/{split} (seed {args.seed} order)"
        sets[split] = (RecordSet(source, scoring, list(range(k))),
                       RecordSet(source, [full[i] for i in unused[:n]], unused[:n]))
    rule = (f"{label}: scoring uses the first {len(train)} train and {len(val)} validation items of each split in "
            f"its seeded order, the ground truth the next {len(sets['train'][1].records)} and "
            f"{len(sets['validation'][1].records)} that share no fact with them")
    return Draw(sets["train"][0], sets["validation"][0], sets["train"][1], sets["validation"][1], label, counts, rule)


def _draw_files(args: ScoreArgs, fields: Fields, gt_n_train: int | None, gt_n_val: int | None) -> Draw:
    if not (args.train and args.val):
        raise UserError("--train and --val go together")
    files = {"train": (args.train, load_records(args.train)), "validation": (args.val, load_records(args.val))}
    for split, (_, recs) in files.items():
        check_records(recs, split, fields)
    taken: set[str] = set()
    truth = {}
    for split, asked in (("validation", gt_n_val), ("train", gt_n_train)):
        path, recs = files[split]
        first: dict[str, int] = {}  # distinct text -> its first index in the file
        for i, r in enumerate(recs):
            first.setdefault(record_text(r, fields), i)
        free = [t for t in first if t not in taken]
        random.Random(f"validate/{split}/{args.seed}").shuffle(free)
        n = len(free) // 2 if asked is None else asked
        what = "train" if split == "train" else "val"
        if not 1 <= n < len(free):
            raise UserError(f"the out-of-sample ground truth splits {path}: {len(free)} distinct records "
                            f"{'left ' if len(free) < len(first) else ''}there, of which it takes {n} (it needs 1 to "
                            f"{max(len(free) - 1, 0)}, the rest for scoring; set --gt-n-{what}, add records, "
                            "or use distinct --train and --val files)")
        chosen = sorted(first[t] for t in free[:n])
        truth[split] = RecordSet(path, [recs[i] for i in chosen], chosen)
        taken |= {record_text(recs[i], fields) for i in chosen}
    scoring, counts = {}, {}
    for split, cap in (("train", args.n_train), ("validation", args.n_val)):
        path, recs = files[split]
        kept = [i for i, r in enumerate(recs) if record_text(r, fields) not in taken]
        if not kept:
            raise UserError(f"the out-of-sample ground truth leaves no {split} record of {path} for scoring "
                            f"(lower --gt-n-{'train' if split == 'train' else 'val'})")
        used = kept[:cap] if cap else kept
        scoring[split] = RecordSet(path, [recs[i] for i in used], used)
        counts[split] = {"available": len(kept), "used": len(used), "held_out": len(recs) - len(kept)}
    rule = (f"{Path(args.train).stem}: the ground truth takes {len(truth['train'].records)} of the distinct "
            f"records of {args.train} and {len(truth['validation'].records)} of {args.val} (seed {args.seed}); "
            "scoring uses the other records of each file")
    return Draw(scoring["train"], scoring["validation"], truth["train"], truth["validation"],
                Path(args.train).stem, counts, rule)


def load_drawn(args: ScoreArgs, draw: Draw, lm: LoadedModel | None = None
               ) -> tuple[LoadedModel, list[Encoded], list[Encoded], list[Encoded], list[Encoded], str, dict]:
    """The model (``lm``, else loaded) and the tokenized records of ``draw``: scoring train, scoring validation,
    ground-truth train, ground-truth validation, the label and the record counts. Every set is tokenized and
    checked (lengths, loss tokens; :func:`layerif.scores.load_splits`' rule) before the weights load."""
    fields = Fields(args.text_field, args.prompt_field, args.completion_field)
    found: dict = {}

    def check(tokenizer, config) -> None:
        context = context_length(config)
        found["splits"] = load_splits(args, tokenizer, context, draw.scoring())
        found["truth"] = [encode_split(tokenizer, s.records, name, fields, args.max_length, context)[0]
                          for name, s in (("ground-truth train", draw.truth_train),
                                          ("ground-truth validation", draw.truth_val))]

    if lm is None:
        lm = args.load(check)
    else:
        check(lm.tokenizer, lm.model.config)
    lm, train, val, label, counts = prepare(args, lm, found["splits"])
    return lm, train, val, *found["truth"], label, counts


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def mean_loss(model: nn.Module, records: list[Encoded], pad: int, batch_size: int = 16,
              what: str = "the validation loss") -> float:
    """Mean over ``records`` of the per-sample loss (:func:`layerif.data.per_sample_loss`), model in eval mode;
    a non-finite mean is a :class:`FloatingPointError` naming ``what`` (no ground truth is built on it)."""
    model.eval()
    return require_finite(float(record_losses(model, records, pad, batch_size).mean()), what)


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def fine_tune_gain(
    model: nn.Module,
    targets: list[Projection],
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
                gains.append(base - mean_loss(model, val, pad, eval_batch_size,
                                              f"the validation loss after fine-tuning block {l}"))
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
    in_sample_val: list[Encoded] | None = None,
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
    ``base_accuracy``. With ``in_sample_val`` (the scoring validation records), the
    same pruned models are also measured on them: ``in_sample`` holds its
    ``loss_rise``, ``val_loss`` and ``base_val_loss`` (None without).
    """
    pruner = get_pruner(method)
    pad = pad_id(tokenizer)
    accuracy = (lambda: mc_accuracy(model, tokenizer, accuracy_records, eval_batch_size)) if accuracy_records else None
    base_loss = mean_loss(model, val, pad, eval_batch_size)
    base_in = mean_loss(model, in_sample_val, pad, eval_batch_size) if in_sample_val else None
    base_acc = accuracy() if accuracy else None
    losses: dict[int, float] = {}
    in_losses: dict[int, float] = {}
    accs: dict[int, float | None] = {}

    def measure(idx: int, block: nn.Module, stats: dict[str, InputStats] | None) -> None:
        mods = projections(block)
        weights = [weight_out_in(m) for m in mods.values()]
        saved = _snapshot(weights)
        try:
            for rel, mod in mods.items():
                prune_module(mod, method, sparsity, stats[rel] if stats else None, None, damping, block_size)
            losses[idx] = mean_loss(model, val, pad, eval_batch_size, f"the validation loss with block {idx} pruned")
            if in_sample_val:
                in_losses[idx] = mean_loss(model, in_sample_val, pad, eval_batch_size,
                                           f"the in-sample validation loss with block {idx} pruned")
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
        "in_sample": {"loss_rise": [in_losses[l] - base_in for l in layers], "val_loss": [in_losses[l] for l in layers],
                      "base_val_loss": base_in} if in_sample_val else None,
    }


def profile_scores(
    influence: dict[str, dict[int, torch.Tensor]], layers: list[int]
) -> dict[str, dict[str, list[float]]]:
    """{estimator: {aggregation: per-block values}} from block influences {estimator: {block: I_l [n]}}."""
    out = {}
    for e, inf in influence.items():
        agg = [aggregate(inf[l]) for l in layers]
        out[e] = {file_key(a): [x[a] for x in agg] for a in VALIDATED}
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
    built_in = opts.task in TASKS or opts.task.startswith("lm-eval:")
    return opts.task if not (opts.train or opts.val) and built_in else None


def ground_truth(lm, train: list[Encoded], val: list[Encoded], targets: list[Projection], opts, seed: int = 0,
                 in_sample: tuple[list[Encoded], list[Encoded]] | None = None) -> dict:
    """Measure every targeted block's fine-tune gain and pruning sensitivity (the model is left as it was).

    ``train`` / ``val``: the ground-truth records (out of sample: :func:`draw_records`). ``in_sample``:
    (scoring train, scoring validation records) to measure the in-sample reading beside it (its own
    fine-tuning per block; the loss of the same pruned blocks on the scoring validation records), or None.
    ``opts``: the ground-truth options (:class:`layerif.options.GroundTruthOptions`: ``steps``, ``lr``,
    ``ft_batch_size``, ``sparsity``, ``method``, ``n_calib``, ``seqlen`` (None: the default of the
    model's device, ``opts.CPU_CALIBRATION`` on a CPU), ``calib``, ``text_field``,
    ``accuracy_task`` (see :func:`accuracy_source`), ``task_items``,
    ``eval_batch_size``). Returns the
    measurement part of validation.json: ``layers``, ``fine_tune``, ``pruning``,
    ``base``, ``fine_tune_gain``, ``prune_sensitivity``, ``in_sample`` (None, or its ``base``,
    ``fine_tune_gain`` and ``prune_sensitivity`` with ``loss_rise`` and ``val_loss``), ``seconds``.
    """
    model, pad = lm.model, pad_id(lm.tokenizer)
    acc_records = accuracy_records(opts)
    acc_source = accuracy_source(opts)
    t0 = time.perf_counter()
    progress.info(f"fine-tune gain: {opts.steps} Adam steps of {opts.ft_batch_size} records per block, out of sample"
                  + (" and in sample" if in_sample else ""))
    config = TrainConfig(steps=opts.steps, batch_size=opts.ft_batch_size, lr=opts.lr, warmup=0.0,
                         weight_decay=0.0, max_grad_norm=0.0, seed=seed)
    layers, gains, base_loss = fine_tune_gain(model, targets, train, val, pad, config, opts.eval_batch_size)
    if in_sample:
        _, gains_in, base_in = fine_tune_gain(model, targets, *in_sample, pad, config, opts.eval_batch_size)
    t1 = time.perf_counter()
    progress.info(f"pruning sensitivity: {opts.method} at sparsity {opts.sparsity:g}, one block at a time")
    from .datasets_io import calibration_size, calibration_windows

    device = next(model.parameters()).device.type
    n_calib, seqlen, which = calibration_size(opts.n_calib, opts.seqlen, device, opts.CPU_CALIBRATION)
    windows = None
    if get_pruner(opts.method).needs_calibration:
        windows = calibration_windows(lm.tokenizer, opts.calib, n_calib, seqlen, seed, opts.text_field)
    pruned = prune_sensitivity(model, lm.tokenizer, layers, val, opts.method, opts.sparsity, windows, acc_records,
                               opts.eval_batch_size, in_sample_val=in_sample[1] if in_sample else None)
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
        "in_sample": {"base": {"val_loss": base_in}, "fine_tune_gain": gains_in,
                      "prune_sensitivity": {k: pruned["in_sample"][k] for k in ("loss_rise", "val_loss")}}
        if in_sample else None,
        "seconds": {"fine_tune": round(t1 - t0, 2), "prune": round(t2 - t1, 2)},
    }


def accuracy_records(opts) -> list[dict] | None:
    """The multiple-choice items of the pruning accuracy change (:func:`accuracy_source`, ``task_items`` of
    them; None without an accuracy task)."""
    source = accuracy_source(opts)
    return test_records(source, opts.task_items, include=getattr(opts, "lm_eval_include", None)) if source else None


def records_doc(draw: Draw, opts, fields: Fields = Fields()) -> dict:
    """validation.json's ``records``: which records served what. ``reading`` (``out of sample``, or ``out of
    sample and in sample``), ``rule`` (how they were drawn), ``scoring`` and ``ground_truth`` (``train``,
    ``validation``: :meth:`RecordSet.describe`), ``accuracy`` (its items' source, count, ``hash``, and how many
    share their text (prompt + correct option) with the scoring and with the ground-truth records) and
    ``calibration`` (text, not records)."""
    items = accuracy_records(opts) or []
    texts = {item_text(i) for i in items}
    scoring = draw.train.texts(fields) | draw.val.texts(fields)
    truth = draw.truth_train.texts(fields) | draw.truth_val.texts(fields)
    return {
        "reading": "out of sample and in sample" if opts.in_sample else "out of sample",
        "rule": draw.rule,
        "scoring": {"train": draw.train.describe(fields), "validation": draw.val.describe(fields)},
        "ground_truth": {"train": draw.truth_train.describe(fields), "validation": draw.truth_val.describe(fields)},
        "accuracy": {"source": accuracy_source(opts), "count": len(items),
                     "hash": [text_hash(item_text(i)) for i in items],
                     "shared_with_scoring": len(texts & scoring), "shared_with_ground_truth": len(texts & truth)},
        "calibration": {"source": opts.calib, "note": "calibration windows are text of --calib, not records"},
    }


def validation_doc(head: dict, influence: dict[str, dict[int, torch.Tensor]], measured: dict, B: int = 1000,
                   seed: int = 0) -> dict:
    """validation.json: ``head`` (model, task, target, n_train, n_val, records (:func:`records_doc`), ...), the
    measurements of :func:`ground_truth`, every estimator's aggregations (``influence``: {estimator: {block: I_l
    [n]}}) and their Spearman correlations with every ground truth (:func:`correlate`; the in-sample readings,
    when measured, as ``fine_tune_gain_in_sample`` and ``prune_loss_rise_in_sample``)."""
    layers = measured["layers"]
    scores = profile_scores(influence, layers)
    ps = measured["prune_sensitivity"]
    truths = {"fine_tune_gain": measured["fine_tune_gain"], "prune_loss_rise": ps["loss_rise"],
              "prune_accuracy_change": ps["accuracy_change"]}
    if measured.get("in_sample"):
        inside = measured["in_sample"]
        truths |= {"fine_tune_gain" + IN_SAMPLE: inside["fine_tune_gain"],
                   "prune_loss_rise" + IN_SAMPLE: inside["prune_sensitivity"]["loss_rise"]}
    return {**head, "estimators": list(influence), **measured, "scores": scores,
            "spearman": correlate(scores, truths, B, seed),
            "bootstrap": {"B": B, "level": LEVEL, "over": "blocks"},
            "conventions": {"orientation": ORIENTATION, "claim": CLAIM}, "version": __version__}
