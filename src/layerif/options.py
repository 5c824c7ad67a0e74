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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import ekfac, models, search  # noqa: F401 -- ekfac: the EK-FAC peer registers itself as an estimator
from .errors import UserError
from .influence import ESTIMATORS, EstimatorConfig, EstimatorOptions, gram_estimators
from .models import LoadedModel
from .prune import PRUNERS, get_pruner
from .results import read_scores, read_validation
from .train import TrainConfig, check_train_config


# one field, one meaning: where a command reads both train records and a local --calib data set (validate),
# the same --text-field names the text of both
TEXT_FIELD_HELP = "record field with plain text (of records files and of local --calib / --eval data sets)"


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


NEEDS_VALIDATION = "the gain metric needs --validation validation.json (from `layerif validate`)"


@dataclass
class ValidationSource:
    """The measured per-block fine-tune gain of a ``layerif validate`` run (the ``gain`` allocations' metric)."""

    validation: str | None = option(None, "validation.json of `layerif validate` (the measured fine-tune gain per "
                                          "block; needed by the gain allocations)")

    def check_validation(self, needed: bool) -> None:
        """Before the model loads: ``needed`` without ``--validation``, or a ``--validation`` that is not a readable
        validation.json, is a :class:`~layerif.errors.UserError` (its block count is checked against the model later,
        by :func:`layerif.results.block_gains`)."""
        if needed and self.validation is None:
            raise UserError(NEEDS_VALIDATION)
        if self.validation is not None:
            read_validation(self.validation)


LM_EVAL_INCLUDE_HELP = "folder of local lm-eval task YAMLs (for --task lm-eval:NAME and --lm-eval-tasks)"


@dataclass
class LmEvalSource:
    """Where lm-eval task names are looked up besides lm-eval's own tasks (:mod:`layerif.lm_eval_io`)."""

    lm_eval_include: str | None = option(None, LM_EVAL_INCLUDE_HELP)


@dataclass
class LmEvalOptions(LmEvalSource):
    """lm-eval as an evaluator of the commands that change a model (:func:`layerif.lm_eval_io.evaluate`)."""

    lm_eval_tasks: list[str] = option([], "also evaluate with lm-evaluation-harness on these multiple-choice tasks, "
                                          "zero-shot (paper: boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,"
                                          "openbookqa; needs the lmeval extra; default: none)")
    lm_eval_limit: int = option(0, "evaluate only the first N documents of each lm-eval task (0: all)")
    lm_eval_batch_size: int = option(8, "lm-eval's batch size (requests per forward pass)")

    def lm_eval_names(self) -> list[str]:
        """The lm-eval tasks to evaluate ([] without --lm-eval-tasks), checked before a model loads: a missing
        extra, an unknown task or one that is not multiple-choice is a :class:`UserError`."""
        from .lm_eval_io import check_tasks, lm_eval_module, task_names

        names = task_names(self.lm_eval_tasks)
        if names or self.lm_eval_include:
            lm_eval_module()
        if names:
            check_tasks(names, self.lm_eval_include)
        if self.lm_eval_limit < 0 or self.lm_eval_batch_size < 1:
            raise UserError("--lm-eval-limit must be ≥ 0 and --lm-eval-batch-size ≥ 1")
        return names

    def lm_eval(self, model, tokenizer, names: list[str]) -> dict[str, dict]:
        """:func:`layerif.lm_eval_io.evaluate` of ``model`` on ``names`` with these options ({} without names)."""
        from .lm_eval_io import evaluate

        return evaluate(model, tokenizer, names, self.lm_eval_include, self.lm_eval_batch_size,
                        self.lm_eval_limit or None) if names else {}

    def with_lm_eval(self, scores: dict, model, tokenizer) -> dict:
        """A run's numbers ``scores`` (with its per-item lists in ``items``) plus, with ``--lm-eval-tasks``, the
        lm-eval columns of :func:`layerif.lm_eval_io.summary`, their per-document lists in ``items`` and the
        whole results under ``lm_eval``; ``scores`` itself without ``--lm-eval-tasks``."""
        from .lm_eval_io import item_lists, summary, task_names

        results = self.lm_eval(model, tokenizer, task_names(self.lm_eval_tasks))
        if not results:
            return scores
        return {**scores, **summary(results), "items": {**scores.get("items", {}), **item_lists(results)},
                "lm_eval": results}


TASK_HELP = "built-in task (see `layerif tasks`) or lm-eval:NAME (an lm-eval multiple-choice task; --lm-eval-include)"


@dataclass
class DataSource(LmEvalSource):
    """Where the scoring records come from: a built-in task, an lm-eval task, or train and validation files."""

    task: str = option("capitals", TASK_HELP)
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
    text_field: str = option("text", TEXT_FIELD_HELP)
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

    @property
    def lora_init_seed(self) -> int:
        """Seed of the LoRA adapters' initialisation and fine-tuning (``--lora-seed``, else :class:`DataOptions`'
        ``--seed``, which every command with these options has)."""
        return self.seed if self.lora_seed is None else self.lora_seed  # type: ignore[attr-defined]


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
class MachineOptions:
    """The machine a plan is for (``layerif plan``): its memory, its processes, its GPU kind; and the CPU's
    calibration."""

    gpu_memory: float | None = option(None, "GB of memory per GPU of the planned machine (default: this machine's GPU;"
                                            " needed with --device cuda where there is none)")
    world_size: int = option(1, "processes of the planned run (torchrun; streaming, records sharded)")
    gpu: str = option("H100", "GPU kind whose stated peak rate the time estimate uses",
                      choices=("H200", "H100", "A100"))
    calibrate: bool = option(False, "time the engine on this CPU first (small random models, about a minute) and keep the "
                                    "rates in the user cache "
                                    "(~/.cache/layerif/calibration.json)")


@dataclass
class StabilityOptions:
    """How stable the block ranking is (bootstrap and split-half, :mod:`layerif.stability`)."""

    bootstrap: int = option(0, "bootstrap resamples B of the train records for intervals, top-k probabilities and "
                               "rank stability (0: none; 200 is typical)")
    top_k: int = option(5, "k of the top-k block statistics of --bootstrap and --split-half")
    split_half: bool = option(False, "score two disjoint halves of the train records separately and compare their "
                                     "rankings")
    bootstrap_seed: int | None = option(None, "seed of the bootstrap resamples and the split halves (default: --seed)")

    @property
    def resample_seed(self) -> int:
        """Seed of the bootstrap and the split halves (``--bootstrap-seed``, else :class:`DataOptions`' ``--seed``,
        which every command with these options has)."""
        return self.seed if self.bootstrap_seed is None else self.bootstrap_seed  # type: ignore[attr-defined]

    def check_stability(self) -> None:
        """Bad bootstrap or top-k options are a :class:`UserError`."""
        if self.bootstrap < 0 or self.bootstrap == 1:
            raise UserError(f"--bootstrap must be >= 2 resamples, or 0 for none (got {self.bootstrap})")
        if self.top_k < 1:
            raise UserError(f"--top-k must be >= 1 (got {self.top_k})")


@dataclass
class LissaOptions:
    """The options of the estimators that take some (LiSSA's): ``score``, ``compare-tasks``, ``compare-estimators``,
    ``validate``; checked by the library (:class:`layerif.influence.EstimatorOptions`)."""

    lissa_iterations: int = option(100, "LiSSA recursion steps T")
    lissa_batch: int = option(0, "train records per LiSSA step (0: all, deterministic; k: seeded random mini-batches "
                                 "of k)")

    def estimator_options(self, seed: int) -> EstimatorOptions:
        """The library's estimator options (checked when made); ``seed``: LiSSA's mini-batch sampling."""
        return EstimatorOptions(self.lissa_iterations, self.lissa_batch, seed)


@dataclass
class EstimatorsOptions(LissaOptions):
    """Several estimators on one set of Gram statistics (``compare-estimators``, ``validate``)."""

    estimators: list[str] = option(gram_estimators(), f"at least two of {', '.join(gram_estimators())}, comma-separated")

    def estimator_configs(self, damping_scale: float, seed: int, at_least: int = 1) -> list[EstimatorConfig]:
        """The estimators to run (deduplicated, in the given order) with their options; unknown ones, fewer than
        ``at_least`` or bad options are a :class:`UserError`."""
        names = list(dict.fromkeys(self.estimators))
        unknown = [e for e in names if e not in gram_estimators()]
        if unknown or not names:
            raise UserError(f"unknown estimator {(unknown or [''])[0]!r} (use {', '.join(gram_estimators())})")
        if len(names) < at_least:
            raise UserError(f"--estimators needs at least {'two' if at_least == 2 else at_least} estimators to compare "
                            f"(got {','.join(names)})")
        options = self.estimator_options(seed)
        return [EstimatorConfig(e, damping_scale, options) for e in names]


SOURCES_HELP = ("builtin (the offline English corpus), c4 or wikitext2 (from the hub, as Wanda / SparseGPT load "
                "them; needs the data extra) or a local text, JSONL, Parquet, Arrow or CSV file or save_to_disk folder")


@dataclass
class CalibrationData:
    """Where calibration windows come from (:mod:`layerif.datasets_io`)."""

    calib: str = option("builtin", f"calibration data: {SOURCES_HELP}")
    text_field: str = option("text", TEXT_FIELD_HELP)

    def check_calibration_data(self) -> None:
        """An unknown source, or a missing ``data`` extra it needs, is a :class:`UserError` (no model needed)."""
        from .datasets_io import check_source

        check_source(self.calib, "--calib")


def fill_calibration_size(args, cpu: tuple[int, int]):
    """``(args, which)``: ``args`` (a dataclass with ``n_calib``, ``seqlen`` and ``device``) with an unset
    ``n_calib`` / ``seqlen`` filled in, ``cpu`` on a CPU and 128 × 2048 on cuda
    (:func:`layerif.datasets_io.calibration_size`); ``which`` says which defaults applied, for the result files."""
    from dataclasses import replace

    from .datasets_io import calibration_size

    n, seqlen, which = calibration_size(args.n_calib, args.seqlen, args.device, cpu)
    return replace(args, n_calib=n, seqlen=seqlen), which


@dataclass
class EvaluationData:
    """Which text perplexity is measured on (:mod:`layerif.datasets_io`)."""

    eval: str = option("builtin", "perplexity data: the same kinds as --calib (builtin and local files: their "
                                  "held-out last part)")

    def check_evaluation_data(self) -> None:
        from .datasets_io import check_source

        check_source(self.eval, "--eval")


@dataclass
class GroundTruthOptions(CalibrationData):
    """What ``validate`` (and ``compare-estimators --validate``) measure per block (:mod:`layerif.validate`)."""

    CPU_CALIBRATION = (16, 128)  # n_calib × seqlen without --n-calib / --seqlen on a CPU

    steps: int = option(10, "fine-tuning steps K per block")
    lr: float = option(1e-4, "Adam learning rate of the per-block fine-tuning (linear decay)")
    ft_batch_size: int = option(4, "train records per fine-tuning step")
    sparsity: float = option(0.5, "sparsity s of the single pruned block, in (0, 1)")
    method: str = option("wanda", "pruner", choices=PRUNERS)
    n_calib: int | None = option(None, "calibration windows (a pruner that calibrates: wanda, sparsegpt; default: 16 "
                                       "on CPU, 128 on cuda)")
    seqlen: int | None = option(None, "tokens per calibration window (default: 128 on CPU, 2048 on cuda)")
    accuracy_task: str | None = option(None, "built-in task or JSONL of {prompt, options, answer} for the accuracy "
                                             "change (default: --task unless --train/--val are given; none: no accuracy)")
    task_items: int = option(100, "test items of the accuracy task")
    eval_batch_size: int = option(16, "sequences per evaluation batch")
    bootstrap_blocks: int = option(1000, "bootstrap resamples of the blocks for the Spearman intervals")
    gt_n_train: int | None = option(None, "train records of the out-of-sample ground truth, disjoint from the scoring "
                                          "records (default: a built-in task's next items, as many as scoring uses; "
                                          "half of --train's distinct records, scoring the rest)")
    gt_n_val: int | None = option(None, "validation records of the out-of-sample ground truth (default: a built-in "
                                        "task's next items, as many as scoring uses; half of --val's distinct records)")
    in_sample: bool = option(False, "also measure the in-sample ground truth (trained and measured on the scoring "
                                    "records) and report it beside the out-of-sample one")

    def check_ground_truth(self) -> None:
        """Bad ground-truth options are a :class:`~layerif.errors.UserError`."""
        if self.steps < 1 or self.ft_batch_size < 1 or self.eval_batch_size < 1:
            raise UserError("--steps, --ft-batch-size and --eval-batch-size must be >= 1")
        if (self.gt_n_train is not None and self.gt_n_train < 1) or (self.gt_n_val is not None and self.gt_n_val < 1):
            raise UserError("--gt-n-train and --gt-n-val must be >= 1")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0 (got {self.lr})")
        if not 0 < self.sparsity < 1:
            raise UserError(f"--sparsity must be in (0, 1) (got {self.sparsity})")
        get_pruner(self.method)
        self.check_calibration_data()
        if get_pruner(self.method).needs_calibration:
            from .datasets_io import preload

            preload(self.calib, "calib", self.text_field)  # a failed download fails before the model loads
        if self.n_calib is not None and self.n_calib < 1:
            raise UserError(f"--n-calib must be ≥ 1 (got {self.n_calib})")
        if self.seqlen is not None and self.seqlen < 2:
            raise UserError(f"--seqlen must be ≥ 2 (got {self.seqlen})")
        if self.task_items < 1:
            raise UserError(f"--task-items must be >= 1 (got {self.task_items})")
        if self.bootstrap_blocks < 2:
            raise UserError(f"--bootstrap-blocks must be >= 2 (got {self.bootstrap_blocks})")
        if self.accuracy_task not in (None, "none"):
            from .tasks import test_records  # here: the built-in tasks' data load only when asked

            # an unknown task or a bad file fails before the model loads
            test_records(self.accuracy_task, 1, include=getattr(self, "lm_eval_include", None))


@dataclass
class TrainingOptions(LmEvalOptions):
    """The task, its records and the training loop of the fine-tuning commands (moe, finetune, their comparisons);
    also evaluated with lm-eval with ``--lm-eval-tasks``."""

    task: str | None = option(None, "built-in task or lm-eval:NAME to train and test on (default: the task of "
                                    "--scores, else capitals)")
    scores: str | None = option(None, "scores.json of `layerif score` (needed by the layerif allocations)")
    n_train: int = option(256, "train items of the task")
    n_test: int = option(100, "test items of the task")
    allow_repeats: bool = option(False, "allow more task items than a built-in split holds (records repeat)")
    data_seed: int = option(0, "seed of the task's item sampling (same items for every training seed)")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "records per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(3e-4, "peak AdamW learning rate")
    warmup: float = option(0.1, "fraction of the steps with linear warm-up (then linear decay to 0)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_length: int | None = option(None, "truncate train records to this many tokens")
    eval_batch_size: int = option(16, "sequences per evaluation batch")
    max_new_tokens: int = option(8, "greedy tokens generated for exact match")

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           warmup=self.warmup, weight_decay=self.weight_decay, max_length=self.max_length, seed=seed)

    def check_training(self) -> None:
        """Checks that need no model: counts, the training loop's values, a readable --scores."""
        if self.n_train < 1 or self.n_test < 1:
            raise UserError("--n-train and --n-test must be ≥ 1")
        if self.eval_batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--eval-batch-size and --max-new-tokens must be ≥ 1")
        check_train_config(self.train_config(0))
        self.lm_eval_names()  # so do a missing lmeval extra and a bad --lm-eval-tasks
        if self.scores:
            read_scores(self.scores)  # so does a bad scores file


@dataclass
class LoraOptions:
    """Where a LoRA adapter goes and how it is scaled (moe, finetune)."""

    targets: str = option("qv", "adapted projections: qv, attn, mlp, all, names (q_proj,v_proj) or a regex")
    lora_alpha: float = option(16.0, "LoRA alpha (scale alpha / r)")
    dropout: float = option(0.05, "dropout on the adapter's input")


@dataclass
class SearchOptions:
    """The options of ``--allocation search`` / ``sensitivity`` shared by ``prune`` and ``compare-pruning``."""

    search_evals: int = field(default=200, metadata={"help": "search: budget of fitness evaluations (the start counts one)"})
    search_offspring: int = field(default=8, metadata={"help": "search: offspring per generation (λ)"})
    search_survivors: list[str] = field(default_factory=lambda: ["2"], metadata={"help": "search: candidates kept after each screening stage, falling (e.g. 8,2: EvoPress's selection steps before the last); the last survivors are evaluated on every fitness window"})
    search_windows: int = field(default=8, metadata={"help": "search / sensitivity / --tune: windows of --calib (of --seqlen tokens, apart from the calibration windows) the KL fitness is measured on"})
    search_screen_windows: list[str] = field(default_factory=lambda: ["2"], metadata={"help": "search: fitness windows of each screening stage, growing (e.g. 1,4; drawn anew per stage and generation; a stage with --search-windows or more is skipped)"})
    search_step: float = field(default=search.STEP, metadata={"help": "search: sparsity step of the level grid (for equal blocks)"})
    search_low: float = field(default=search.LOW, metadata={"help": "search: lowest sparsity level a block may take"})
    search_high: float = field(default=search.HIGH, metadata={"help": "search: highest sparsity level a block may take"})

    def search_config(self, seed: int, targets: Sequence[float] = ()) -> search.SearchConfig:
        """The checked :class:`SearchConfig` of these options (level bounds checked against each of ``targets``)."""
        config = search.SearchConfig(self.search_evals, self.search_offspring,
                                     _ints(self.search_survivors, "search-survivors"),
                                     _ints(self.search_screen_windows, "search-screen-windows"),
                                     self.search_step, self.search_low, self.search_high, seed)
        config.check(targets)
        if self.search_windows < 1:
            raise UserError(f"--search-windows must be ≥ 1 (got {self.search_windows})")
        return config


def _ints(values: Sequence, option: str) -> tuple[int, ...]:
    """A comma-list option's values as integers, in order (ranges and repeats are judged by the caller); an
    unreadable value is a :class:`UserError` naming ``--option``."""
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"--{option}: cannot read {','.join(map(str, values))} as integers") from None
