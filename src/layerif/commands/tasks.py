"""``layerif tasks``: the built-in tasks, their sizes, chance level and a model's accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..evaluate import mc_accuracy
from ..options import ModelOptions
from ..tasks import SPLITS, TASKS, export_lm_eval
from .base import register


@dataclass
class TasksArgs(ModelOptions):
    """List the built-in tasks: distinct items per split, chance level and a model's multiple-choice accuracy."""

    n: int = field(default=0, metadata={"help": "test items per task for the accuracy (0 = every distinct test item)"})
    seed: int = field(default=0, metadata={"help": "seed of the test items' order and wrong options"})
    accuracy: bool = field(default=True, metadata={"help": "measure the model's accuracy (--no-accuracy: only list)"})
    batch_size: int = field(default=16, metadata={"help": "(prompt, option) sequences per forward pass"})
    allow_repeats: bool = field(default=False, metadata={"help": "allow --n beyond a test split's distinct items"})
    export_lm_eval: str | None = field(default=None, metadata={
        "help": "write every task as an lm-eval task (YAML + JSONL per split) into this folder"})


def run(args: TasksArgs) -> str:
    """The table behind ``layerif tasks``: name, kind, distinct items per split, chance and (optionally) accuracy."""
    if args.n < 0:
        raise UserError(f"--n must be >= 0 (got {args.n})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    test = {name: task.split("test", args.n or None, args.seed, args.allow_repeats) for name, task in TASKS.items()}
    exported = export_lm_eval(args.export_lm_eval, seed=args.seed) if args.export_lm_eval else []
    accuracy: dict[str, float] = {}
    footer = ""
    if args.accuracy:
        lm = args.load()
        for name in TASKS:
            accuracy[name] = mc_accuracy(lm.model, lm.tokenizer, test[name], args.batch_size)
        items = "every distinct test item" if not args.n else f"{args.n} test items per task"
        footer = f"\naccuracy: {lm.name}, multiple choice on {items} (seed {args.seed})"
    if exported:
        footer += (f"\nlm-eval tasks written to {Path(args.export_lm_eval).resolve()} "
                   f"(lm_eval --include_path {args.export_lm_eval} --tasks layerif)")
    header = ["task", "kind", "train", "validation", "test", "options", "chance"] + (
        ["accuracy"] if args.accuracy else []) + ["description"]
    rows = [header]
    for name, task in TASKS.items():
        acc = [f"{accuracy[name]:.3f}"] if args.accuracy else []
        sizes = [str(task.n_distinct(s)) for s in SPLITS]
        rows.append([name, task.kind, *sizes, str(task.n_options), f"{task.chance:.3f}", *acc, task.description])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    numeric = set(range(2, len(header) - 1))
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return "\n".join(lines) + "\ndistinct items per split (train, validation, test)" + footer


register("tasks", TasksArgs, run, "list the built-in tasks with chance level and model accuracy")
