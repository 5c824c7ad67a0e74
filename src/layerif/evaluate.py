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

import functools
import inspect
import math

import torch
from torch import nn

from . import progress
from .data import IGNORE, encode_pair, pad_id
from .errors import UserError
from .models import input_device


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword ``name`` (read once per model class)."""
    return name in _forward_parameters(type(model))


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _prefix_logprobs(model: nn.Module, prompts: list[list[int]], options: list[list[list[int]]], pad: int,
                     device: torch.device) -> list[list[float]]:
    """Summed ``log p(option tokens | prompt)`` of every option of a batch of records, the prompt run once.

    ``prompts[r]``: record r's prompt ids (at least one); ``options[r][k]``: its option k's ids. The prompts
    run left-padded (so the next-token logits of every prompt are in the last column) with the model's
    key/value cache kept; each option continues its own prompt's cache (rows repeated per option), masked
    over the padding, at positions ``len(prompt) + j``, so it sees exactly the tokens a whole (prompt,
    option) sequence would. Returns one list per record.
    """
    kv = "cache" if _accepts(model, "cache") else "past_key_values"  # recent transformers renamed it
    R, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((R, P), pad, dtype=torch.long)
    mask = torch.zeros((R, P), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p) :], mask[r, P - len(p) :] = torch.tensor(p), 1
    lengths = mask.sum(dim=1)
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=(mask.cumsum(1) - 1).clamp(min=0)
                .to(device), use_cache=True, **keep)
    last = out.logits[:, -1].float().log_softmax(dim=-1)  # [R, V]: the token after each prompt
    owner = [r for r, opts in enumerate(options) for _ in opts]  # the record of each option row
    flat = [o for opts in options for o in opts]
    scores = [float(last[r, o[0]]) if o else 0.0 for r, o in zip(owner, flat)]
    O = max(len(o) for o in flat) - 1  # option tokens fed to the model (the last one predicts nothing)
    if O > 0:
        rows = torch.tensor(owner)
        cache = getattr(out, kv)
        cache.reorder_cache(rows.to(device))  # batch rows R -> one per option
        cont = torch.full((len(flat), O), pad, dtype=torch.long)
        cont_mask = torch.zeros((len(flat), O), dtype=torch.long)
        for n, o in enumerate(flat):
            if len(o) > 1:
                cont[n, : len(o) - 1], cont_mask[n, : len(o) - 1] = torch.tensor(o[:-1]), 1
        positions = lengths[rows].unsqueeze(1) + torch.arange(O)
        logp = model(input_ids=cont.to(device), attention_mask=torch.cat([mask[rows], cont_mask], dim=1).to(device),
                     position_ids=positions.to(device), use_cache=True, **{kv: cache}
                     ).logits.float().log_softmax(dim=-1)  # [N, O, V]: position j predicts option token j + 1
        for n, o in enumerate(flat):
            if len(o) > 1:
                scores[n] += float(logp[n, torch.arange(len(o) - 1), torch.tensor(o[1:])].sum())
    it = iter(scores)
    return [[next(it) for _ in opts] for opts in options]


@torch.no_grad()
def option_logprobs(model: nn.Module, tokenizer, records: list[dict], batch_size: int = 16) -> list[list[float]]:
    """Summed log-likelihood of each option's tokens after its record's prompt.

    Returns one list per record, one float per option, in the record's option
    order. Each record's prompt runs once and its options continue from its
    key/value cache (:func:`_prefix_logprobs`); ``batch_size`` counts
    (prompt, option) sequences per batch (records are grouped to about that
    many). A prompt of no tokens (a tokenizer without BOS and an empty prompt)
    is scored with its option's first token as the prompt, whose own
    likelihood is then not counted, as for a whole sequence.
    """
    device, pad = input_device(model), pad_id(tokenizer)
    units: list[tuple[int, list[int], list[list[int]]]] = []  # (record, prompt ids, its options' ids)
    for i, r in enumerate(records):
        encoded = [encode_pair(tokenizer, r["prompt"], opt) for opt in r["options"]]
        n = encoded[0].labels.count(IGNORE)  # the prompt's tokens, the same for every option
        if n:
            units.append((i, encoded[0].input_ids[:n], [e.input_ids[n:] for e in encoded]))
        else:
            units.extend((i, e.input_ids[:1], [e.input_ids[1:]]) for e in encoded)
    groups: list[list[int]] = [[]]  # units of about batch_size options each
    size = 0
    for u, (_, _, opts) in enumerate(units):
        if groups[-1] and size + len(opts) > batch_size:
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += len(opts)
    out: list[list[float]] = [[] for _ in records]
    for g in progress.track(groups, "scoring options"):
        live = [u for u in g if units[u][1]]  # an empty option after an empty prompt: no token to score
        found = _prefix_logprobs(model, [units[u][1] for u in live], [units[u][2] for u in live], pad, device) \
            if live else []
        scored = dict(zip(live, found))
        for u in g:
            out[units[u][0]].extend(scored.get(u, [0.0]))
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
def exact_match_correct(model: nn.Module, tokenizer, records: list[dict], max_new_tokens: int = 8,
                        batch_size: int = 16) -> list[bool]:
    """Per record: whether the greedy continuation of its prompt gives the correct answer.

    For each record the prompt is tokenized as in :func:`layerif.data.encode_pair`
    and up to ``max_new_tokens`` tokens are generated greedily (``model.generate``
    without sampling, stopping at the tokenizer's EOS token), then decoded
    without special tokens. The record is correct when that text, with leading
    whitespace and then opening quote marks (``" ' ` \u201c \u2018``) removed,
    starts with ``record["completion"].strip()`` and the next character, if
    any, is not a letter or digit (so " 5" does not match a generated "50",
    but matches "5." or "5 apples", and " went" matches ' "went" and').

    Prompts run ``batch_size`` at a time, left-padded with an attention mask and
    sorted by length (so a batch pads little); each continuation is cut at its
    first EOS token, as a generation of that prompt alone stops there.
    """
    if not records:
        raise UserError("no records to evaluate")
    if batch_size < 1:
        raise UserError(f"the generation batch size must be ≥ 1 (got {batch_size})")
    from transformers import GenerationConfig

    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    device = input_device(model)
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))
    hits = [False] * len(records)
    for start in progress.track(range(0, len(order), batch_size), "generating", unit="batch"):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            hits[i] = _matches(tokenizer.decode(new, skip_special_tokens=True), records[i]["completion"])
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
