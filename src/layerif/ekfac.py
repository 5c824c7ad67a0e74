r"""EK-FAC influence through Kronfluence, the peer method, on layerif's loss and targets.

Kronfluence (``pip install --no-deps kronfluence==1.0.1 accelerate einconv einops
opt_einsum``, or ``make peer``) fits per-module Kronecker factors of the Fisher
and eigenvalue-corrects them (EK-FAC), then scores every train sample against
every validation sample. Here it runs on

* the same per-sample loss as the engine (:func:`layerif.data.per_sample_loss`:
  each record's mean next-token cross-entropy; a batch's loss is their sum),
  with the empirical Fisher (the records' own labels, as layerif's G^T G / n);
* the same target modules (their names are Kronfluence's tracked modules);
* the same damping: Kronfluence's heuristic damping is c times the mean
  eigenvalue of a module's corrected Fisher, which is c mean_i ||g_i||^2 / d_m,
  layerif's lambda_m, when c is ``damping_scale``.

So EK-FAC is ``exact`` with the Fisher G^T G / n replaced by its EK-FAC
approximation, and Kronfluence's ``identity`` strategy is ``grad-dot``.
Kronfluence's pairwise score is g_val^T H^-1 g_train (positive: helpful);
layerif's influence is its negative (negative: helpful).
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .data import Encoded, collate, per_sample_loss, stat_dtype
from .errors import UserError
from .influence import Estimator, EstimatorConfig, damping_rule, register
from .models import Projection, input_device

INSTALL = "pip install --no-deps kronfluence==1.0.1 accelerate einconv einops opt_einsum (or: make peer)"
STRATEGIES = {"ekfac": 2, "kfac": 1, "diagonal": 1, "identity": 0}  # strategy -> fitting passes


def available() -> bool:
    """Whether Kronfluence can be imported (an optional extra)."""
    return importlib.util.find_spec("kronfluence") is not None


@contextmanager
def _tracked(model: nn.Module, targets: list[Projection]) -> Iterator[None]:
    """Within the context the targets are wrapped by Kronfluence; afterwards the model is as it was
    (the original modules back in place, every parameter's ``requires_grad`` restored)."""
    from kronfluence.module.tracked_module import TrackedModule

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for name, mod in list(model.named_modules()):
            if isinstance(mod, TrackedModule):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, mod.original_module)
        for p, f in flags:
            p.requires_grad_(f)


def kronfluence_influence(
    model: nn.Module,
    targets: list[Projection],
    train: list[Encoded],
    val: list[Encoded],
    pad_id: int,
    strategy: str = "ekfac",
    damping_scale: float = 0.1,
    per_val: bool = False,
    batch_size: int = 8,
) -> tuple[dict[str, torch.Tensor], dict[str, float], int]:
    """Module influences {name: I_m [k, n_train]} (float64; k = n_val with ``per_val``, else 1), the
    damping Kronfluence used per module (``strategy`` identity: none), and the passes over records it made.

    Passes: fitting (EK-FAC: covariances, then the eigenvalue correction, over the
    train records; K-FAC, diagonal: one; identity: none), then one over the
    validation records and one over the train records for the scores (all
    validation samples form one query batch, so the train records are read once).

    The model is left as it was found. Raises :class:`UserError` when Kronfluence is
    not installed, or a target is not an ``nn.Linear`` (Kronfluence tracks Linear and Conv2d).
    """
    if not available():
        raise UserError(f"--estimator ekfac needs Kronfluence: {INSTALL}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown Kronfluence strategy {strategy!r}")
    bad = [t.name for t in targets if not isinstance(t.module, nn.Linear)]
    if bad:
        raise UserError(f"Kronfluence tracks nn.Linear modules only; {bad[0]} is a {type(dict(model.named_modules())[bad[0]]).__name__}")
    from kronfluence import analyzer as kf_analyzer
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.factor import config as kf_config
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    names = [t.name for t in targets]
    device = input_device(model)
    dtype = stat_dtype(next(model.parameters()).dtype)

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            return per_sample_loss(out.logits, batch["labels"]).sum()

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    class _Records(torch.utils.data.Dataset):
        def __init__(self, records: list[Encoded]):
            self.records = records

        def __len__(self) -> int:
            return len(self.records)

        def __getitem__(self, i: int) -> Encoded:
            return self.records[i]

    loader = DataLoaderKwargs(collate_fn=lambda chunk: collate(chunk, pad_id, "cpu"))
    task = _Task()
    heuristic = kf_config.HEURISTIC_DAMPING_SCALE
    with _tracked(model, targets), tempfile.TemporaryDirectory(prefix="layerif-kronfluence.") as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Kronfluence 1.0.1 uses torch.cuda.amp.GradScaler
        prepared = kf_analyzer.prepare_model(model, task)
        an = kf_analyzer.Analyzer("layerif", prepared, task, cpu=device.type == "cpu", disable_tqdm=True,
                                  output_dir=tmp, log_level=40)
        fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=dtype,
                                gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
                                lambda_dtype=torch.float64, eigendecomposition_dtype=torch.float64)
        an.fit_all_factors("f", _Records(train), per_device_batch_size=batch_size, dataloader_kwargs=loader,
                           factor_args=fargs, overwrite_output_dir=True)
        sargs = ScoreArguments(damping_factor=None, compute_per_module_scores=True, score_dtype=torch.float64,
                               per_sample_gradient_dtype=dtype, precondition_dtype=torch.float64)
        kf_config.HEURISTIC_DAMPING_SCALE = damping_scale
        try:
            an.compute_pairwise_scores("s", "f", _Records(val), _Records(train), per_device_query_batch_size=len(val),
                                       per_device_train_batch_size=batch_size, dataloader_kwargs=loader,
                                       score_args=sargs, overwrite_output_dir=True)
        finally:
            kf_config.HEURISTIC_DAMPING_SCALE = heuristic
        scores = an.load_pairwise_scores("s")
        lambdas: dict[str, float] = {}
        if strategy != "identity":
            factors = an.load_all_factors("f")
            for name in names:
                lam = factors["lambda_matrix"][name].double() / factors["num_lambda_processed"][name].double()
                lambdas[name] = damping_rule(lam.mean(), damping_scale)
    influence = {}
    for name in names:
        s = -scores[name].double().cpu()  # [n_val, n_train]
        influence[name] = s if per_val else s.sum(dim=0, keepdim=True)
    return influence, lambdas, STRATEGIES[strategy] + 2


def _ekfac(model, targets, train, val, pad_id, estimator: EstimatorConfig, engine):
    """The registry's ``direct`` form (:class:`layerif.influence.Estimator`) of :func:`kronfluence_influence`."""
    return kronfluence_influence(model, targets, train, val, pad_id, "ekfac", estimator.damping_scale, engine.per_val,
                                 engine.batch_size)


# exact's formula with the Fisher G^T G / n replaced by its eigenvalue-corrected Kronecker factorisation
register(Estimator("ekfac", None, direct=_ekfac, installed=available))
