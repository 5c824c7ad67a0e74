"""Evaluating a causal LM: multiple-choice accuracy, greedy exact match, perplexity.

Every function works on any Hugging Face causal LM wherever it lives (inputs
go to the device of its input embeddings, so a device map works), runs under
``torch.no_grad`` and never prints.

Multiple-choice records are the ones :mod:`layerif.tasks` produces::

    {"prompt": str, "completion": str, "options": list[str], "answer": int}

Each option is appended to the prompt exactly as the completion is (the
completion *is* ``options[answer]``, leading space included), tokenized by
:func:`layerif.data.encode_pair`, so the prompt's tokens are the same for every
option and an option is scored by the log-likelihood of its own tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import progress
from .data import IGNORE, Encoded, batches, collate, encode_pair, pad_id
from .errors import UserError
from .models import input_device


def _summed_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over each sequence of ``log p(label_t | tokens < t)`` where the label is not -100: [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(labels != IGNORE, logp, 0.0).sum(dim=1)


@torch.no_grad()
def option_logprobs(model: nn.Module, tokenizer, records: list[dict], batch_size: int = 16) -> list[list[float]]:
    """Summed log-likelihood of each option's tokens after its record's prompt.

    Returns one list per record, one float per option, in the record's option
    order. ``batch_size`` counts (prompt, option) sequences per forward pass;
    batches are right-padded, which changes no score.
    """
    pairs: list[Encoded] = [encode_pair(tokenizer, r["prompt"], opt) for r in records for opt in r["options"]]
    device, pad = input_device(model), pad_id(tokenizer)
    flat: list[float] = []
    for chunk in progress.track(batches(pairs, batch_size), "scoring options"):
        flat.extend(_summed_logprobs(model, collate(chunk, pad, device)).tolist())
    out, i = [], 0
    for r in records:
        out.append(flat[i : i + len(r["options"])])
        i += len(r["options"])
    return out


def mc_correct(model: nn.Module, tokenizer, records: list[dict], batch_size: int = 16) -> list[bool]:
    """Per record: whether its highest-scoring option (see :func:`option_logprobs`) is ``answer``.

    Ties go to the first option. An empty record list is a :class:`UserError`.
    """
    if not records:
        raise UserError("no records to evaluate")
    scores = option_logprobs(model, tokenizer, records, batch_size)
    return [max(range(len(s)), key=s.__getitem__) == r["answer"] for s, r in zip(scores, records)]


def mc_accuracy(model: nn.Module, tokenizer, records: list[dict], batch_size: int = 16) -> float:
    """Fraction of records :func:`mc_correct` (multiple-choice accuracy)."""
    hits = mc_correct(model, tokenizer, records, batch_size)
    return sum(hits) / len(hits)


_OPENING_QUOTES = "\"'`\u201c\u2018"


def _matches(generated: str, answer: str) -> bool:
    """The rule of :func:`greedy_exact_match` for one generated text."""
    text, want = generated.lstrip().lstrip(_OPENING_QUOTES), answer.strip()
    return text.startswith(want) and (len(text) == len(want) or not text[len(want)].isalnum())


def greedy_exact_match(model: nn.Module, tokenizer, records: list[dict], max_new_tokens: int = 8) -> float:
    """Fraction of records :func:`exact_match_correct`."""
    hits = exact_match_correct(model, tokenizer, records, max_new_tokens)
    return sum(hits) / len(hits)


@torch.no_grad()
def exact_match_correct(model: nn.Module, tokenizer, records: list[dict], max_new_tokens: int = 8) -> list[bool]:
    """Per record: whether the greedy continuation of its prompt gives the correct answer.

    For each record the prompt is tokenized as in :func:`layerif.data.encode_pair`
    and up to ``max_new_tokens`` tokens are generated greedily (``model.generate``
    without sampling, stopping at the tokenizer's EOS token), then decoded
    without special tokens. The record is correct when that text, with leading
    whitespace and then opening quote marks (``" ' ` \u201c \u2018``) removed,
    starts with ``record["completion"].strip()`` and the next character, if
    any, is not a letter or digit (so " 5" does not match a generated "50",
    but matches "5." or "5 apples", and " went" matches ' "went" and').
    """
    if not records:
        raise UserError("no records to evaluate")
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=pad_id(tokenizer))
    device, hits = input_device(model), []
    for r in progress.track(records, "generating"):
        ids = torch.tensor([tokenizer(r["prompt"])["input_ids"]], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        hits.append(_matches(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True),
                             r["completion"]))
    return hits


def perplexity(model: nn.Module, tokenizer, text: str, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 4) -> float:
    """Perplexity of ``text``, the Wanda way: non-overlapping windows of ``seqlen`` tokens.

    PPL = exp(mean next-token NLL over all predicted tokens) = exp of the mean of
    :func:`window_nll` (every window predicts ``seqlen - 1`` tokens).
    """
    nll = window_nll(model, tokenizer, text, seqlen, max_windows, batch_size)
    return math.exp(math.fsum(nll) / len(nll))


@torch.no_grad()
def window_nll(model: nn.Module, tokenizer, text: str, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 4) -> list[float]:
    """Mean next-token NLL (nats) of each window of ``text``, the Wanda way.

    The text is tokenized once without special tokens and cut into
    ``len // seqlen`` consecutive non-overlapping windows (the remainder is
    dropped; at most ``max_windows`` of them, from the start). Each window is an
    independent sequence of ``seqlen - 1`` predictions. A text shorter than one
    window is a :class:`UserError`.
    """
    if seqlen < 2:
        raise UserError(f"seqlen must be >= 2 (got {seqlen})")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device, out = input_device(model), []
    for start in progress.track(range(0, n, batch_size), "perplexity"):
        x = windows[start : start + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1).to(logits.device), reduction="none")
        out += nll.view(x.shape[0], -1).double().mean(dim=1).tolist()
    return out
