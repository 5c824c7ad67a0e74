"""Option groups: the dataclasses every command's arguments are composed of.

Each group is defined once and a command's argument dataclass lists the groups
it takes (``class ScoreArgs(StabilityOptions, RunOptions, EngineOptions,
DataOptions, DataSource, ModelOptions)``), so a field means the same thing
and has the same default and help text in every command, and no command
carries a field it does not offer. The fields stay flat: the command line
(``--damping-scale``), ``config.json``'s ``args`` and the Python constructors
(``ScoreArgs(task="capitals", out=...)``) all name them directly. The help
text lives in each field's metadata; :mod:`layerif.cli` turns fields into
options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .influence import ESTIMATORS
from . import models
from .models import LoadedModel


def option(default, help: str, **metadata):
    """A dataclass field with its help text (and e.g. ``choices``); list defaults are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelOptions:
    """Which model a command loads, and where (the first options of each command)."""

    model: str | None = option(None, "hub name or local folder (default: embedded SmolLM2-135M-Instruct)")
    gguf_file: str | None = option(None, "GGUF file (inside --model, or a path)")
    device: str = option("auto", "auto, cpu or cuda")
    dtype: str | None = option(None, "float32 (CPU default), bfloat16, float16; float64 for reference runs")
    trust_remote_code: bool = option(False, "run the model folder's own Python code (command line only: never taken "
                                            "from --config)", from_config=False)
    device_map: str | None = option(None, "accelerate device map (auto: spread a large model over the GPUs)")

    def load(self, before_weights: Callable[[object, object], None] | None = None) -> LoadedModel:
        """:func:`layerif.models.load_model` with these options (``before_weights(tokenizer, config)`` runs
        before the weights load)."""
        return models.load_model(self.model, self.gguf_file, self.device, self.dtype, self.trust_remote_code,
                                 self.device_map, before_weights)


@dataclass
class DataSource:
    """Where the scoring records come from: a built-in task, or train and validation files."""

    task: str = option("capitals", "built-in task (see `layerif tasks`)")
    train: str | None = option(None, "train records (JSONL/CSV/Parquet or HF dataset); replaces --task")
    val: str | None = option(None, "validation records; required with --train")


@dataclass
class DataOptions:
    """How many records, which fields, how long."""

    n_train: int | None = option(None, "use the first N train records (0 = all; default: all records of --train, 64 "
                                       "of a built-in task)")
    n_val: int | None = option(None, "use the first N validation records (0 = all; default: all records of --val, 16 "
                                     "of a built-in task)")
    seed: int = option(0, "seed of the built-in task's sampling (and, unless set apart, of the bootstrap, "
                          "the split halves and the LoRA initialisation)")
    allow_repeats: bool = option(False, "allow --n-train / --n-val beyond a built-in task's distinct items")
    text_field: str = option("text", "record field with plain text")
    prompt_field: str = option("prompt", "record field with the prompt")
    completion_field: str = option("completion", "record field with the completion")
    max_length: int | None = option(None, "keep the first N tokens of longer records (default: a record longer than "
                                          "the model's context is refused)")


@dataclass
class EngineOptions:
    """What is scored and how the gradients are held (shared by every scoring command)."""

    target: str = option("attn", "projection selector: attn, mlp, block, qv, lora, names (q_proj,v_proj) or a regex")
    damping_scale: float = option(0.1, "c in lambda_m = c * mean_i ||g_im||^2 / d_m")
    batch_size: int = option(8, "records per forward/backward pass")
    max_memory: float | None = option(None, "GB of gradient buffers held at once (default: a fifth of RAM, half the "
                                            "free GPU memory)")
    layout: str = option("auto", "per-sample gradients held dense, as token factors, or auto (fewer flops)",
                         choices=("auto", "dense", "factored"))
    lora_modules: list[str] = option(["q_proj", "v_proj"], "modules that get LoRA adapters with --target lora")
    lora_rank: int = option(8, "LoRA rank with --target lora")
    finetune_steps: int = option(0, "train fresh LoRA adapters this many steps first; required with --target lora "
                                    "unless the model already has adapters (e.g. 50)")
    finetune_lr: float = option(1e-3, "learning rate of --finetune-steps")
    lora_seed: int | None = option(None, "seed of the LoRA initialisation and fine-tuning (default: --seed)")


@dataclass
class RunOptions:
    """One scoring run's estimator and engine (``score``, ``compare-tasks``)."""

    estimator: str = option("datainf", "influence estimator (layerif.influence.ESTIMATORS)", choices=tuple(ESTIMATORS))
    per_val: bool = option(False, "also keep the [n_val, n_train] influence matrix")
    mode: str = option("auto", "materialized (Gram statistics, all estimators), streaming (a few gradient-sized "
                               "buffers; estimators that stream) or auto", choices=("auto", "materialized", "streaming"))
    resume: bool = option(True, "keep completed passes in OUT/.layerif-cache and resume from them after a crash")
    val_chunk: int = option(8, "validation columns per pass group in streaming --per-val")
    bootstrap_val: bool = option(False, "the bootstrap also resamples validation records (needs --per-val)")


@dataclass
class StabilityOptions:
    """How stable the block ranking is (bootstrap and split-half, :mod:`layerif.stability`)."""

    bootstrap: int = option(0, "bootstrap resamples B of the train records for intervals, top-k probabilities and "
                               "rank stability (0: none; 200 is typical)")
    top_k: int = option(5, "k of the top-k block statistics of --bootstrap and --split-half")
    split_half: bool = option(False, "score two disjoint halves of the train records separately and compare their "
                                     "rankings")
    bootstrap_seed: int | None = option(None, "seed of the bootstrap resamples and the split halves (default: --seed)")
