"""lm-evaluation-harness (lm-eval) in and out: its multiple-choice tasks as an evaluator and as a task source.

* **Evaluator** (:func:`evaluate`): the in-memory model (pruned, adapted) runs through lm-eval's own ``HFLM``
  wrapper and ``simple_evaluate`` (no save and reload), zero-shot, with ``log_samples=True``; per task it returns
  lm-eval's ``acc`` and ``acc_norm`` and, per document (in ``doc_id`` order), the 0/1 values behind them, so a
  comparison pairs two models on the same documents.
* **Task source** (:class:`LmEvalTask`, ``--task lm-eval:NAME``): a task's documents as this tool's
  multiple-choice records ``{"prompt", "completion", "options", "answer"}``: prompt = ``doc_to_text(doc)``,
  options = ``target_delimiter + choice`` for each of ``doc_to_choice(doc)``, answer = ``doc_to_target(doc)``
  (an index, or the gold choice's text), completion = the gold option: exactly the (context, continuation)
  pairs lm-eval scores, so :func:`layerif.evaluate.mc_correct` on the records is lm-eval's ``acc``.

Task names are checked before a model loads (:func:`check_tasks`): an unknown name, a group or tag, or a task
whose ``output_type`` is not ``multiple_choice`` is a one-line :class:`UserError`. ``--lm-eval-tasks paper``
is the seven tasks of the pruning papers (:data:`PAPER_TASKS`). lm-eval is the optional ``lmeval`` extra;
without it a command that needs it says which extra to install. Nothing here prints.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError

PREFIX = "lm-eval:"  # --task lm-eval:NAME
PAPER = "paper"
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
METRICS = ("acc", "acc_norm")  # what lm-eval reports for a multiple-choice task
# the layerif split each lm-eval split feeds, in order of preference (LmEvalTask.mapping)
SPLIT_FIELDS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
NEEDS_EXTRA = "lm-eval tasks need the `lmeval` extra: pip install 'layerif[lmeval]' (lm-eval==0.4.13)"


def lm_eval_module() -> Any:
    """The ``lm_eval`` package; missing, a one-line :class:`UserError` naming the extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(NEEDS_EXTRA) from None
    return lm_eval


def task_names(spec: str | Sequence[str] | None) -> list[str]:
    """The task names of ``--lm-eval-tasks`` (a comma list or a list of them; ``paper`` expands to
    :data:`PAPER_TASKS`), deduplicated in order; None or empty gives []."""
    if not spec:
        return []
    parts = [p.strip() for s in ([spec] if isinstance(spec, str) else spec) for p in str(s).split(",")]
    names: list[str] = []
    for p in parts:
        names += list(PAPER_TASKS) if p == PAPER else [p] if p else []
    return list(dict.fromkeys(names))


def is_lm_eval_task(task: str | None) -> bool:
    """Whether a ``--task`` value names an lm-eval task (``lm-eval:NAME``)."""
    return isinstance(task, str) and task.startswith(PREFIX)


@functools.lru_cache(maxsize=8)
def _manager(include: str | None, defaults: bool) -> Any:
    lm_eval_module()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def task_manager(names: Sequence[str], include: str | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows ``names``: over ``include`` alone when every name is found there
    (indexing lm-eval's own few thousand YAMLs takes seconds), else over lm-eval's tasks and ``include``.
    An ``include`` that is not a folder is a :class:`UserError`."""
    if include is not None:
        if not Path(include).is_dir():
            raise UserError(f"--lm-eval-include {include!r} is not a folder")
        include = str(Path(include).resolve())
        tm = _manager(include, False)
        if all(n in tm.task_index for n in names):
            return tm
    return _manager(include, True)


def check_tasks(names: Sequence[str], include: str | None = None) -> Any:
    """Check lm-eval task names without loading any data: each must be a task (not a group or tag) whose
    configuration (its YAML with its ``include`` files) says ``output_type: multiple_choice``. Returns the
    ``TaskManager``; an unknown or unsuitable name is a one-line :class:`UserError`."""
    if not names:
        raise UserError("--lm-eval-tasks: no task names")
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = task_manager(names, include)
    for name in names:
        entry = tm.task_index.get(name)
        if entry is None:
            where = f" (nor in --lm-eval-include {include})" if include else " (local YAMLs: --lm-eval-include DIR)"
            raise UserError(f"unknown lm-eval task {name!r}{where}")
        if entry.kind.name != "TASK" or entry.yaml_path is None:
            raise UserError(f"lm-eval {name!r} is a {entry.kind.name.lower().replace('_', ' ')}, not a single task: "
                            "name its tasks")
        kind = load_yaml(entry.yaml_path, resolve_func=False, recursive=True).get("output_type", "generate_until")
        if kind != "multiple_choice":
            raise UserError(f"lm-eval task {name!r} is {kind}, not multiple_choice: only multiple-choice tasks are "
                            "supported")
    return tm


# ----------------------------------------------------------------------------- evaluator


def evaluate(model, tokenizer, names: Sequence[str], include: str | None = None, batch_size: int = 8,
             limit: int | None = None) -> dict[str, dict]:
    """lm-eval on the in-memory ``model``: ``{task: {"acc", "acc_norm", "n", "items": {"acc": [...],
    "acc_norm": [...]}}}``, zero-shot, through ``HFLM(pretrained=model, tokenizer=tokenizer)`` and
    ``simple_evaluate(log_samples=True)``. ``items`` hold each document's 0/1 value in ``doc_id`` order (the
    first ``limit`` documents of the evaluated split with ``limit``); ``acc`` is their mean, as lm-eval
    reports it. The model is left as it was (lm-eval only runs it under ``no_grad``)."""
    lm_eval_module()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from . import progress
    from .models import input_device

    tm = check_tasks(names, include)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(input_device(model)))
    progress.info(f"lm-eval: {', '.join(names)}")
    res = simple_evaluate(model=lm, tasks=list(names), task_manager=tm, num_fewshot=0, log_samples=True,
                          limit=limit, bootstrap_iters=0, cache_requests=False, random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    out: dict[str, dict] = {}
    for name in names:
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        items = {m: [float(s[m]) for s in samples] for m in METRICS}
        out[name] = {**{m: math.fsum(v) / len(v) for m, v in items.items()}, "n": len(samples), "items": items}
    return out


def mean_items(results: dict[str, dict], metric: str) -> list[float]:
    """Per-document values whose plain mean is the mean over tasks of ``metric`` (each task weighs 1/T): task t's
    values scaled by N / (T · n_t) (N documents in all), concatenated in task order. A paired bootstrap over
    them resamples documents of all tasks together."""
    total, T = sum(r["n"] for r in results.values()), len(results)
    return [v * total / (T * r["n"]) for r in results.values() for v in r["items"][metric]]


def lm_eval_keys(names: Sequence[str]) -> list[str]:
    """The result columns of an evaluation on ``names`` (:func:`summary`'s keys, in order); [] without names."""
    if not names:
        return []
    return [f"lm_eval/{t}/{m}" for t in (*names, "mean") for m in METRICS]


def summary(results: dict[str, dict]) -> dict[str, float]:
    """Flat numbers of :func:`evaluate`'s results: ``lm_eval/TASK/acc``, ``.../acc_norm`` and the means over
    tasks ``lm_eval/mean/acc``, ``lm_eval/mean/acc_norm``."""
    flat = {f"lm_eval/{t}/{m}": r[m] for t, r in results.items() for m in METRICS}
    for m in METRICS:
        flat[f"lm_eval/mean/{m}"] = math.fsum(r[m] for r in results.values()) / len(results)
    return flat


def item_lists(results: dict[str, dict]) -> dict[str, list[float]]:
    """The per-document lists of :func:`summary`'s keys (the mean's from :func:`mean_items`)."""
    items = {f"lm_eval/{t}/{m}": r["items"][m] for t, r in results.items() for m in METRICS}
    for m in METRICS:
        items[f"lm_eval/mean/{m}"] = mean_items(results, m)
    return items


def table(results: dict[str, dict]) -> str:
    """Lines 'lm-eval TASK (n documents): acc A, acc_norm B', and the mean over tasks."""
    lines = [f"lm-eval {t} ({r['n']} documents, zero-shot): acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f}"
             for t, r in results.items()]
    if len(results) > 1:
        s = summary(results)
        lines.append(f"lm-eval mean over {len(results)} tasks: acc {s['lm_eval/mean/acc']:.4f}, "
                     f"acc_norm {s['lm_eval/mean/acc_norm']:.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- task source


class LmEvalTask:
    """An lm-eval multiple-choice task as this tool's task (the interface of :class:`layerif.tasks.Task` that
    the commands use: ``name``, ``split``, ``n_distinct``, ``mapping``).

    Split mapping (:attr:`mapping`, recorded in the run's config.json): ``test`` is the task's test split, else its
    validation split, else its training split; ``train`` and ``validation`` are the task's training and validation
    splits when both remain; when one split remains it is cut, its first three quarters ``train`` and the rest
    ``validation``; when none remains the one split is cut in halves and quarters (train, validation, test).
    Documents keep the data set's order (``seed`` does not reorder them)."""

    def __init__(self, name: str, include: str | None = None):
        check_tasks([name], include)
        self.name, self.include = name, include
        self.task = task_manager([name], include).load([name])["tasks"][name]
        cfg = self.task.config
        has = {"train": self.task.has_training_docs(), "validation": self.task.has_validation_docs(),
               "test": self.task.has_test_docs()}
        source = {k: getattr(cfg, f) for k, f in SPLIT_FIELDS.items() if has[k]}
        test = next(k for k in ("test", "validation", "train") if k in source)
        rest = [k for k in ("train", "validation") if k in source and k != test]
        docs = {k: list(self._docs(k)) for k in {test, *rest}}
        if len(rest) == 2:
            parts = {"train": (rest[0], 0, None), "validation": (rest[1], 0, None), "test": (test, 0, None)}
        elif len(rest) == 1:
            n = len(docs[rest[0]])
            cut = (3 * n) // 4
            parts = {"train": (rest[0], 0, cut), "validation": (rest[0], cut, None), "test": (test, 0, None)}
        else:
            n = len(docs[test])
            parts = {"train": (test, 0, n // 2), "validation": (test, n // 2, (3 * n) // 4),
                     "test": (test, (3 * n) // 4, None)}
        self.mapping = {split: source[k] + ("" if (a, b) == (0, None) else f"[{a}:{'' if b is None else b}]")
                        for split, (k, a, b) in parts.items()}
        self._records = {split: [self.record(d) for d in docs[k][a:b]] for split, (k, a, b) in parts.items()}

    def _docs(self, kind: str):
        return {"train": self.task.training_docs, "validation": self.task.validation_docs,
                "test": self.task.test_docs}[kind]()

    def record(self, doc: dict) -> dict:
        """One document as ``{"prompt", "completion", "options", "answer"}`` (module text); a task whose prompt is
        not one text (several contexts, e.g. WinoGrande's partial scoring) is a :class:`UserError`."""
        t = self.task
        prompt, choices, target = t.doc_to_text(doc), t.doc_to_choice(doc), t.doc_to_target(doc)
        if not isinstance(prompt, str):
            raise UserError(f"lm-eval task {self.name!r} scores several contexts per document; as --task only "
                            "tasks with one prompt per document are supported")
        answer = target if isinstance(target, int) else choices.index(target) if target in choices else int(target)
        delimiter = t.config.target_delimiter
        options = [delimiter + str(c) for c in choices]
        return {"prompt": prompt, "completion": options[answer], "options": options, "answer": answer}

    def group_of(self, record: dict) -> tuple[str, str]:
        """The underlying item of a record (as :meth:`layerif.tasks.Task.group_of`): its (prompt, completion), so
        documents of the same text count as one."""
        return record["prompt"], record["completion"]

    def n_distinct(self, split: str) -> int:
        return len(self._records[split])

    def split(self, split: str, n: int | None = None, seed: int = 0, allow_repeats: bool = False) -> list[dict]:
        """The first ``n`` records of ``split`` (all with ``n=None``); more than the split holds is a
        :class:`UserError` unless ``allow_repeats`` (then the documents cycle)."""
        records = self._records[split]
        if n is None:
            return list(records)
        if n > len(records) and not allow_repeats:
            raise UserError(f"{PREFIX}{self.name}: {n} {split} records asked for, but {self.mapping[split]} holds "
                            f"{len(records)} documents (ask for fewer, or allow repeats with --allow-repeats)")
        return [records[i % len(records)] for i in range(n)]


@functools.lru_cache(maxsize=16)
def load_task(task: str, include: str | None = None) -> LmEvalTask:
    """The :class:`LmEvalTask` of ``task`` (``lm-eval:NAME``), loaded once per process."""
    return LmEvalTask(task.removeprefix(PREFIX), include)


def split_mapping(task: str | None, include: str | None = None) -> dict[str, str] | None:
    """Which lm-eval split fed train / validation / test for a ``--task lm-eval:NAME`` (None for other tasks)."""
    return load_task(task, include).mapping if is_lm_eval_task(task) else None
