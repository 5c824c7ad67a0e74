"""The one comparison harness of every ``compare-*`` command.

A comparison runs the same experiment under several *arms* (allocations,
tasks, estimators) and writes one results folder: ``config.json`` (written
here, once), the rows as CSV, Markdown tables of mean ± std over seeds (the best
mean in bold), the verdict, a plot and ``report.md`` / ``report.html``.

Paired differences (:func:`paired_bootstrap`, :func:`paired_section`): where a
row keeps its per-item results (0/1 correctness per test item, the NLL of each
perplexity window), an arm is compared with a baseline arm on the *same* items
and seeds: Δ = mean over seeds and items of (arm − baseline), with a 95%
percentile interval from a paired bootstrap that resamples the seeds and the
items (with replacement, both). An arm *wins* only when the interval lies on the
good side of 0, *loses* when it lies on the bad side, and is *level* otherwise.
The LayerIF arms are compared with ``uniform`` and with the best other baseline
of each setting.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..io import CACHE_DIR, check_regular_file, output_folder, write_files, write_json, write_text
from ..report import write_report
from ..results import write_config
from ..stability import mean_std, mean_std_cell

LEVEL = 0.95
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Metric:
    """One measured quantity of a comparison: its row key, whether higher is better, decimals, label."""

    key: str
    higher: bool
    digits: int
    label: str


def parse_list(values: Sequence, kind: type, option: str) -> list:
    """A comma-list option's values as ``kind``, deduplicated in order; none or unreadable is a :class:`UserError`."""
    try:
        out = list(dict.fromkeys(kind(v) for v in values))
    except (TypeError, ValueError):
        raise UserError(f"--{option}: cannot read {','.join(map(str, values))} as {kind.__name__} values") from None
    if not out:
        raise UserError(f"--{option}: no values")
    if kind is int and not all(0 <= v < 2 ** 63 for v in out):  # seeds: torch and numpy take 64-bit ones
        raise UserError(f"--{option}: every value must be an integer from 0 to 2^63-1 (got "
                        f"{next(v for v in out if not 0 <= v < 2 ** 63)})")
    return out


def rows_csv(rows: list[dict], fields: Sequence[str]) -> str:
    """CSV text of ``rows`` with the columns ``fields``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    w.writerows({k: r[k] for k in fields} for r in rows)
    return buf.getvalue()


def read_rows(path: Path, numeric: Sequence[str]) -> list[dict]:
    """Rows of a comparison CSV, the ``numeric`` columns as floats; a damaged file (a truncated row, a column
    missing, a value that is not a number) is a :class:`UserError` naming the row."""
    check_regular_file(path, "comparison file")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        try:
            for k in numeric:
                r[k] = float(r[k])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} line {i} is damaged (column {k!r}: {r.get(k)!r}); rerun without --resume "
                            "or with a new --out") from None
    return rows


def group(rows: list[dict], key: Callable[[dict], Any]) -> dict[Any, dict[str, list[dict]]]:
    """Rows by setting (``key(row)``) and then by arm (``row["arm"]`` or ``row["allocation"]``), in order."""
    out: dict[Any, dict[str, list[dict]]] = {}
    for r in rows:
        out.setdefault(key(r), {}).setdefault(r.get("arm", r.get("allocation")), []).append(r)
    return out


def stats(arms: dict[str, list[dict]], keys: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and std over seeds of each ``keys`` column, per arm."""
    return {a: {k: mean_std([r[k] for r in rs]) for k in keys} for a, rs in arms.items()}


def best_mean(st: dict[str, dict[str, tuple[float, float]]], m: Metric) -> float:
    """The best mean of metric ``m`` over the arms of one setting."""
    means = [s[m.key][0] for s in st.values()]
    return max(means) if m.higher else min(means)


def cell(st: dict[str, dict[str, tuple[float, float]]], arm: str, m: Metric) -> str:
    """The table cell 'mean ± std' of an arm, bold when its mean is the setting's best."""
    return mean_std_cell(st[arm][m.key], best_mean(st, m), m.digits)


# ----------------------------------------------------------------------------- verdicts


def _names(arms: Sequence[str]) -> str:
    return ", ".join(arms)


def single_verdict(means: dict[str, float], m: Metric, subject: str = "layerif", name: str = "LayerIF") -> str:
    """The verdict on ``subject`` in one setting, by its mean of ``m`` against the other arms' means."""
    best = max(means.values()) if m.higher else min(means.values())
    winners = [a for a, v in means.items() if v == best]
    what = f"the best mean {m.label}"
    if len(winners) == len(means):
        return f"No allocation wins: every one has the same mean {m.label}"
    if winners == [subject]:
        runner_up = (max if m.higher else min)(v for a, v in means.items() if a != subject)
        return f"{name} has {what}, {abs(best - runner_up):.4f} above the next best"
    if subject in winners:
        return f"{name} ties for {what} with {_names([w for w in winners if w != subject])}"
    return (f"{name} does not win: {_names(winners)} {'has' if len(winners) == 1 else 'have'} {what}, "
            f"{abs(best - means[subject]):.4f} above {name}")


def count_verdict(settings: dict[Any, dict[str, list[dict]]], metrics: Sequence[Metric],
                  subject: str = "layerif", name: str = "LayerIF") -> list[str]:
    """Markdown lines: per arm, in how many settings its mean of each metric is the best (ties count for each),
    and a plain verdict on ``subject`` by the first metric."""
    if not settings:
        return []
    arms = list(dict.fromkeys(a for g in settings.values() for a in g))
    best = {m.key: dict.fromkeys(arms, 0) for m in metrics}
    for g in settings.values():
        st = stats(g, [m.key for m in metrics])
        for m in metrics:
            top = best_mean(st, m)
            for a, s in st.items():
                best[m.key][a] += s[m.key][0] == top
    n = len(settings)
    lines = ["", "## Summary", "", f"Settings ({' × '.join(settings_label(settings))}) in which an allocation has the "
             f"best mean (of {n}; ties count for each):", "",
             "| allocation | " + " | ".join(f"best {m.label}" for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    lines += [f"| {a} | " + " | ".join(str(best[m.key][a]) for m in metrics) + " |" for a in arms]
    if subject in arms:
        first = best[metrics[0].key]
        top = max(first.values())
        leaders = [a for a in arms if first[a] == top]
        if leaders == [subject]:
            verdict = f"{name} has the best {metrics[0].label} most often ({top} of {n})."
        elif subject in leaders:
            verdict = f"{name} shares the lead in {metrics[0].label} with {_names([a for a in leaders if a != subject])}."
        else:
            verdict = (f"{name} does not win: {_names(leaders)} {'has' if len(leaders) == 1 else 'have'} the best "
                       f"{metrics[0].label} most often ({top} of {n}; {name} {first[subject]}).")
        lines += ["", verdict + " Compare the gaps with the standard deviations over seeds above."]
    return lines


def settings_label(settings: dict) -> list[str]:
    """Names of the setting's parts for the summary ('pruner', 'sparsity')."""
    key = next(iter(settings))
    return ["pruner", "sparsity"] if isinstance(key, tuple) and len(key) == 2 else ["setting"]


# ----------------------------------------------------------------------------- paired differences


def paired_bootstrap(diff: np.ndarray, B: int = BOOTSTRAP, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences ``diff`` [seeds, items] and its percentile interval.

    Each of the ``B`` resamples draws the seeds and, independently, the items
    with replacement and takes the mean over the drawn grid. Returns
    (mean, low, high).
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 2 or diff.size == 0:
        raise ValueError(f"paired differences must be a non-empty [seeds, items] array, got {diff.shape}")
    rng = np.random.default_rng(seed)
    S, N = diff.shape
    seeds = rng.integers(0, S, size=(B, S))
    items = rng.integers(0, N, size=(B, N))
    # mean over the drawn grid = mean over drawn seeds of (per-seed means over the drawn items)
    means = np.stack([diff[seeds[b]][:, items[b]].mean() for b in range(B)])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def outcome(lo: float, hi: float, higher: bool) -> str:
    """'win' when the interval of (arm − baseline) lies on the good side of 0, 'loss' on the bad side, else 'level'."""
    good, bad = (lo > 0, hi < 0) if higher else (hi < 0, lo > 0)
    return "win" if good else "loss" if bad else "level"


def _item_matrix(rs: list[dict], key: str, seeds: list[str]) -> np.ndarray | str:
    """The per-item results ``key`` of the rows ``rs`` for ``seeds`` [seeds, items], or why there is none."""
    by_seed = {r["seed"]: r.get("items", {}).get(key) for r in rs}
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        return f"no run with seed {', '.join(map(str, missing))}"
    if any(by_seed[s] is None for s in seeds):
        return "no per-item results"
    lengths = {len(by_seed[s]) for s in seeds}
    if len(lengths) > 1:
        return f"runs over different item counts ({', '.join(map(str, sorted(lengths)))})"
    return np.asarray([by_seed[s] for s in seeds], dtype=np.float64)


def _pair(a: list[dict], b: list[dict], key: str) -> np.ndarray | str:
    """Paired differences (a − b) [seeds, items] over the seeds of ``a``, or why they cannot be made."""
    seeds = [r["seed"] for r in a]
    x, y = _item_matrix(a, key, seeds), _item_matrix(b, key, seeds)
    if isinstance(x, str):
        return f"the allocation has {x}"
    if isinstance(y, str):
        return f"the reference has {y}"
    if x.shape != y.shape:
        return f"different test items ({x.shape[1]} against {y.shape[1]})"
    return x - y


def paired_section(settings: dict[Any, dict[str, list[dict]]], metrics: Sequence[Metric], item_keys: dict[str, str],
                   baselines: Sequence[str], subjects: Sequence[str], label: Callable[[Any], str],
                   seed: int = 0, pairs: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Markdown lines: Δ of each subject arm against ``uniform`` and against the best other baseline of each
    setting, and of each (arm, reference) of ``pairs`` present there, per metric, with paired bootstrap
    intervals over items and seeds (module docstring).

    ``item_keys[metric key]`` names the per-item list a row holds for that metric
    in ``row["items"]`` (e.g. perplexity -> ``nll``: the difference is then in
    mean NLL per window, nats). Settings where no row has per-item results are
    skipped; any other comparison that cannot be made (the reference lacks one of
    the allocation's seeds, a row without per-item results, other items) is
    listed under the table with the reason, never dropped silently.
    """
    lines: list[str] = []
    not_made: list[str] = []
    wins: dict[str, int] = {}
    for key, arms in settings.items():
        st = stats(arms, [m.key for m in metrics])
        for m in metrics:
            ik = item_keys.get(m.key)
            if ik is None or all(r.get("items", {}).get(ik) is None for rs in arms.values() for r in rs):
                continue
            others = [b for b in baselines if b in arms]
            best_other = (max if m.higher else min)(others, key=lambda b: st[b][m.key][0]) if others else None
            refs = list(dict.fromkeys(r for r in ("uniform", best_other) if r in arms))
            todo = [(s, r) for s in subjects if s in arms for r in refs]
            todo += [(s, r) for s, r in pairs if s in arms and r in arms and (s, r) not in todo]
            for subject, ref in todo:
                diff = _pair(arms[subject], arms.get(ref, []), ik)
                if isinstance(diff, str):
                    not_made.append(f"- {label(key)}, {m.label}: {subject} against {ref}: {diff}")
                    continue
                mean, lo, hi = paired_bootstrap(diff, seed=seed)
                res = outcome(lo, hi, m.higher)
                wins[res] = wins.get(res, 0) + 1
                unit = " (mean NLL, nats)" if ik == "nll" else ""
                lines.append(f"| {label(key)} | {m.label}{unit} | {subject} | {ref}"
                             f"{' (best baseline)' if ref == best_other else ''} | {mean:+.4f} | "
                             f"[{lo:+.4f}, {hi:+.4f}] | {res} |")
    if not lines and not not_made:
        return []
    head = ["", "## Paired differences", "",
            f"Δ = mean over seeds and test items of (allocation − reference) on the same items; "
            f"{100 * LEVEL:.0f}% paired bootstrap interval resampling seeds and items ({BOOTSTRAP} resamples). "
            "A win only when the interval excludes 0 on the good side.", "",
            "| setting | metric | allocation | reference | Δ | interval | result |", "|---|---|---|---|---:|---|---|"]
    total = sum(wins.values())
    tail = ["", f"Of {total} paired comparisons: {wins.get('win', 0)} wins, {wins.get('loss', 0)} losses, "
                f"{wins.get('level', 0)} level (interval includes 0)."]
    if not_made:
        tail += ["", f"{len(not_made)} paired comparison{'s' if len(not_made) > 1 else ''} could not be made:", "",
                 *not_made]
    return head + lines + tail


# ----------------------------------------------------------------------------- lm-eval columns


def lm_eval_metrics(rows: list[dict]) -> list[Metric]:
    """The lm-eval columns the rows hold (``lm_eval/TASK/acc``, ``.../acc_norm``, ``lm_eval/mean/...``: see
    :func:`layerif.lm_eval_io.summary`) as metrics, higher better; their per-document lists share the key."""
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith("lm_eval/"))
    return [Metric(k, True, 3, "lm-eval " + k.removeprefix("lm_eval/").replace("/", " ")) for k in keys]


def lm_eval_tables(settings: dict[Any, dict[str, list[dict]]], metrics: Sequence[Metric], label: Callable[[Any], str],
                   reference: dict | None = None, reference_name: str = "dense") -> list[str]:
    """Markdown lines: one table of the lm-eval metrics, a row per setting and arm (mean ± std over seeds, best
    in bold), and first the ``reference`` row (``reference_name``: e.g. the dense model) when given."""
    lines = ["", "## lm-eval (zero-shot, lm-evaluation-harness)", "",
             "| setting | allocation | " + " | ".join(f"{m.label.removeprefix('lm-eval ')} ↑" for m in metrics)
             + " | seeds |", "|---|---|" + "---:|" * (len(metrics) + 1)]
    if reference is not None:
        lines.append(f"| - | {reference_name} | " + " | ".join(f"{reference[m.key]:.{m.digits}f}" for m in metrics) + " | - |")
    for key, arms in settings.items():
        st = stats(arms, [m.key for m in metrics])
        lines += [f"| {label(key)} | {a} | " + " | ".join(cell(st, a, m) for m in metrics) + f" | {len(arms[a])} |"
                  for a in arms]
    return lines


# ----------------------------------------------------------------------------- the output folder


class Comparison:
    """One comparison's results folder, staged (:func:`layerif.io.output_folder`): inside ``with
    Comparison(...) as cmp``, ``cmp.out`` is the staging folder (with ``cmp.state``, the cache a ``--resume``
    reads); on leaving, it replaces ``--out`` whole. config.json is written by :meth:`write_config`, once."""

    def __init__(self, command: str, args: Any, fields: Sequence[str], key_fields: Sequence[str] = (),
                 overwrite: bool | None = None):
        self.command, self.args, self.fields, self.key_fields = command, args, list(fields), list(key_fields)
        self.dest = Path(args.out)
        self._overwrite = args.overwrite if overwrite is None else overwrite
        self._folder = None
        self.out = self.dest

    def __enter__(self) -> "Comparison":
        self._folder = output_folder(self.args.out, self.command, self._overwrite)
        self.out = self._folder.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._folder.__exit__(*exc)

    @property
    def state(self) -> Path:
        """The run's cache inside the staging folder (rows and items of finished runs, for ``--resume``)."""
        return self.out / CACHE_DIR

    def item_key(self, row: dict) -> str:
        """The key of a row's per-item results in items.json (its ``key_fields`` joined by '|')."""
        return "|".join(str(row[k]) for k in self.key_fields)

    def write_config(self, *folders: Path) -> None:
        """config.json into the result (and into each of ``folders``, e.g. the resume cache)."""
        for folder in (self.out, *folders):
            write_config(folder, self.command, self.args)

    def save_rows(self, rows: list[dict], folder: Path | None = None) -> None:
        """comparison.csv (default: into the result) and the rows' per-item results as items.json."""
        folder = self.out if folder is None else folder
        write_text(folder / "comparison.csv", rows_csv(rows, self.fields))
        items = {self.item_key(r): r["items"] for r in rows if r.get("items")}
        if items:
            write_json(folder / "items.json", items)

    def finish(self, files: dict[str, Any], summary: str) -> str:
        """Write the remaining files (name -> text, JSON-ready dict or matplotlib figure), then the report.

        Returns ``summary`` followed by the list of files written (under the final ``--out``).
        """
        write_files(self.out, files)
        write_report(self.out)
        names = [*(["comparison.csv"] if (self.out / "comparison.csv").exists() else []), *files,
                 "config.json", "report.md", "report.html"]
        return summary + f"\nwrote {self.dest}/{', '.join(dict.fromkeys(names))}"
