r"""Does the block profile depend on the task? On the estimator? (The statistics of ``compare-tasks`` and
``compare-estimators``; the commands are in :mod:`layerif.commands`.)

``layerif compare-tasks`` scores one loaded model on several tasks (each written
as a full ``layerif score`` folder) and compares the block profiles: a
block x task heatmap of each task's share of S, the pairwise Spearman matrix of
the block rankings, and the blocks whose share differs most.

``layerif compare-estimators`` forms the Gram statistics (K, P) of every target
once (:func:`layerif.engine.module_stats`) and applies each estimator to the
*same* gradients: ``datainf``, ``exact``, ``grad-dot`` (:mod:`layerif.influence`)
and LiSSA (:mod:`layerif.influence`, the estimator registry, with the DataInf
bound beside them).

EK-FAC (Kronfluence) needs its own covariance passes rather than these shared Gram statistics: it is a
*peer* estimator of the registry (``influence.peer_estimators``, ``--peers``), computed from the model
and records themselves when Kronfluence is installed (``make peer``).
"""

from __future__ import annotations

import torch

from .influence import EstimatorConfig, ModuleStats
from .io import label_axes, pyplot
from .models import Projection
from .scores import gram_influence
from .stability import finite, layer_scores, pearson, spearman, top_k_blocks, top_k_overlap

def spearman_matrix(profiles: list[list[float]]) -> list[list[float | None]]:
    """Pairwise Spearman correlations of block profiles (None where undefined)."""
    return [[finite(spearman(a, b)) for b in profiles] for a in profiles]


def shares(score: list[float]) -> list[float]:
    """S_l / sum_l S_l (all zeros when nothing is helpful)."""
    total = sum(score)
    return [s / total if total > 0 else 0.0 for s in score]


# ----------------------------------------------------------------------------- task profiles


def compare_profiles(labels: list[str], layers: list[int], scores: dict[str, list[float]], top_k: int) -> dict:
    """The cross-task part of comparison.json: shares, Spearman matrix, top-k sets and the most differing blocks.

    A block's spread is max - min over tasks of its share of the task's S; the
    ``top_k`` blocks with the largest spread are listed, largest first.
    """
    share = {t: shares(scores[t]) for t in labels}
    spread = []
    for i, l in enumerate(layers):
        by_task = {t: share[t][i] for t in labels}
        hi, lo = max(by_task, key=by_task.get), min(by_task, key=by_task.get)
        spread.append({"block": l, "spread": by_task[hi] - by_task[lo], "max_task": hi, "min_task": lo, "share": by_task})
    k = min(top_k, len(layers))
    return {
        "tasks": labels,
        "layers": layers,
        "score": scores,
        "share": share,
        "spearman": spearman_matrix([scores[t] for t in labels]),
        "top_k": k,
        "top_k_blocks": {t: top_k_blocks(layers, scores[t], k) for t in labels},
        "differing_blocks": sorted(spread, key=lambda d: -d["spread"])[:k],
    }


def heatmap_figure(labels: list[str], layers: list[int], share: dict[str, list[float]]):
    """Block x task heatmap of the share of S (rows: blocks, columns: tasks); the image data is that matrix."""
    plt = pyplot()
    M = torch.tensor([share[t] for t in labels], dtype=torch.float64).T.numpy()  # [L, T]
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(labels), 1.2 + 0.22 * len(layers)))
    im = ax.imshow(M, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_ylabel("decoder block")
    fig.colorbar(im, ax=ax, label="share of the task's S")
    ax.set_title("helpful influence per block and task", fontsize=10)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- compare-estimators


def block_influence(stats: dict[str, ModuleStats], targets: list[Projection], estimator: EstimatorConfig
                    ) -> dict[int, torch.Tensor]:
    """Block influences {block: I_l [n]} (summed validation loss) of one estimator from shared Gram statistics."""
    module_inf, _ = gram_influence(stats, targets, estimator)
    blocks: dict[int, torch.Tensor] = {}
    for t in targets:
        blocks[t.block] = blocks.get(t.block, 0) + module_inf[t.name][0]
    return {l: blocks[l] for l in sorted(blocks)}


def per_block_max(targets: list[Projection], values: dict[str, float]) -> list[float]:
    """The largest per-module value within each block, blocks in order."""
    out: dict[int, float] = {}
    for t in targets:
        out[t.block] = max(out.get(t.block, values[t.name]), values[t.name])
    return [out[l] for l in sorted(out)]


def agreement(layers: list[int], influence: dict[str, dict[int, torch.Tensor]], top_k: int) -> list[dict]:
    """Pairwise agreement of estimators: Spearman / Pearson of the block scores, top-k overlap, sample-level Spearman."""
    names = list(influence)
    S = {e: layer_scores(influence[e]) for e in names}
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            per_block = torch.tensor([spearman(influence[a][l], influence[b][l]) for l in layers])
            per_block = per_block[torch.isfinite(per_block)]
            pairs.append({"a": a, "b": b, "spearman": finite(spearman(S[a], S[b])), "pearson": finite(pearson(S[a], S[b])),
                          "top_k_overlap": top_k_overlap(layers, S[a], S[b], top_k),
                          "sample_spearman": finite(float(per_block.mean())) if per_block.numel() else None})
    return pairs


def estimators_figure(names: list[str], layers: list[int], scores: dict[str, list[float]], pairs: list[dict]):
    """estimators.png: each estimator's normalized block profile, and the Spearman matrix of the rankings."""
    fig, (ax, ax2) = pyplot().subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, e in enumerate(names):  # distinct markers and dashes: identical profiles stay visible
        ax.plot(layers, shares(scores[e]), marker="osd^v<>"[i % 7], ls=("-", "--", "-.", ":")[i % 4], ms=4, label=e)
    label_axes(ax, "decoder block", "share of S")
    M = torch.eye(len(names), dtype=torch.float64)
    for p in pairs:
        i, j = names.index(p["a"]), names.index(p["b"])
        M[i, j] = M[j, i] = float("nan") if p["spearman"] is None else p["spearman"]
    im = ax2.imshow(M.numpy(), vmin=-1, vmax=1, cmap="RdBu")
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax2.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax2.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=8,
                     color="white" if abs(M[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax2, label="Spearman")
    fig.tight_layout()
    return fig


