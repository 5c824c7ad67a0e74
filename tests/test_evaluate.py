"""Evaluation (option log-likelihoods, MC accuracy, greedy match, perplexity) and the offline text corpus."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import WORDS, tiny_model
from layerif.corpus import load_text, pydoc_text, split_text, text_windows
from layerif.errors import UserError
from layerif.evaluate import _matches, greedy_exact_match, mc_accuracy, option_logprobs, perplexity
from layerif.tasks import get_task

RECORDS = [
    {"prompt": "the capital of france is", "options": [" paris", " rome", " berlin", " madrid"], "answer": 0},
    {"prompt": "two plus three", "options": [" equals five", " is", " six seven eight", " no"], "answer": 2},
    {"prompt": "cat", "options": [" dog", " house", " the dog house", " a"], "answer": 1},
    {"prompt": "which number is the answer to this question ?", "options": [" one", " two", " ten", " nine"],
     "answer": 3},
]
for _r in RECORDS:
    _r["completion"] = _r["options"][_r["answer"]]

TEXT = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(300))


def reference_logprobs(model, tokenizer, record):
    """One (prompt, option) at a time, unbatched: sum of log p(option token | everything before it)."""
    out = []
    for option in record["options"]:
        p = tokenizer(record["prompt"])["input_ids"]
        ids = p + tokenizer(option, add_special_tokens=False)["input_ids"]
        if not ids:
            out.append(0.0)
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        out.append(sum(logp[t - 1, ids[t]].item() for t in range(max(len(p), 1), len(ids))))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "opt", "gpt_neox", "mistral"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_option_logprobs_match_one_at_a_time(tokenizer, family, batch_size):
    """The shared-prompt cache path against whole sequences one at a time (prompts of different lengths, options of
    1-3 tokens, records split across batches, an empty prompt, an empty option)."""
    model = tiny_model(family)
    odd = [{"prompt": "", "options": [" dog house", " cat", " the cat is"], "answer": 0},
           {"prompt": "the cat", "options": ["", " is"], "answer": 1}]
    records = RECORDS + get_task("capitals").split("test", 3) + odd
    got = option_logprobs(model, tokenizer, records, batch_size=batch_size)
    want = [reference_logprobs(model, tokenizer, r) for r in records]
    assert [len(g) for g in got] == [len(r["options"]) for r in records]
    assert torch.allclose(torch.tensor(sum(got, [])), torch.tensor(sum(want, [])), atol=1e-4)


def test_mc_accuracy_is_argmax_of_the_reference(tokenizer):
    for seed in range(3):
        model = tiny_model("llama", seed=seed)
        want = sum(max(range(4), key=reference_logprobs(model, tokenizer, r).__getitem__) == r["answer"]
                   for r in RECORDS) / len(RECORDS)
        assert mc_accuracy(model, tokenizer, RECORDS, batch_size=5) == want
    with pytest.raises(UserError):
        mc_accuracy(model, tokenizer, [])


def reference_greedy(model, tokenizer, prompt, steps):
    """Greedy decoding by re-running the whole sequence at each step (no cache)."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "opt", "gpt_neox", "mistral"])
def test_batched_generation_equals_one_prompt_at_a_time(tokenizer, family):
    from layerif.evaluate import exact_match_correct

    model = tiny_model(family, seed=2)
    prompts = ["the capital of", "one two three four five six", "cat", "is it the", "yes no yes no",
               "which number is the answer to this question ?", "dog"]
    records = []
    for p in prompts:  # one record right and one wrong per prompt, by the unbatched uncached reference
        first = reference_greedy(model, tokenizer, p, 3).split()
        word = first[0] if first and first[0].isalnum() else "house"
        records += [{"prompt": p, "completion": f" {word}"}, {"prompt": p, "completion": " zebra"}]
    one = exact_match_correct(model, tokenizer, records, max_new_tokens=3, batch_size=1)
    for batch_size in (3, 16):
        assert exact_match_correct(model, tokenizer, records, max_new_tokens=3, batch_size=batch_size) == one
    assert one[1::2] == [False] * len(prompts)


def test_greedy_exact_match_against_uncached_decoding(tokenizer):
    model = tiny_model("llama", seed=1)
    right, wrong = [], []
    for prompt in ["the capital of", "one two three", "cat dog", "is it the", "yes no yes"]:
        first = reference_greedy(model, tokenizer, prompt, 4).split()
        if first and first[0].isalnum():
            right.append({"prompt": prompt, "completion": f" {first[0]}"})
            other = next(w for w in WORDS if w != first[0])
            wrong.append({"prompt": prompt, "completion": f" {other}"})
    assert right, "the tiny model generated nothing printable"
    assert greedy_exact_match(model, tokenizer, right, max_new_tokens=4) == 1.0
    assert greedy_exact_match(model, tokenizer, wrong, max_new_tokens=4) == 0.0


@pytest.mark.parametrize("generated,answer,ok", [
    (" Paris is", " Paris", True), ("Paris.", " Paris", True), ("  7", " 7", True), ("\n7\n", "7", True),
    (' "went" and', " went", True), ("\u201cParis\u201d", " Paris", True),
    (" 75", " 7", False), (" Parisian", " Paris", False), ("", " Paris", False), (" Rome", " Paris", False),
])
def test_match_rule(generated, answer, ok):
    assert _matches(generated, answer) is ok


@pytest.mark.parametrize("seqlen,max_windows,batch_size", [(16, None, 4), (16, 3, 2), (50, None, 1)])
def test_perplexity_matches_hf_loss(tokenizer, seqlen, max_windows, batch_size):
    model = tiny_model("llama")
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    n = len(ids) // seqlen if max_windows is None else max_windows
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids[: n * seqlen].view(n, seqlen)]
    got = perplexity(model, tokenizer, TEXT, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size)
    assert got == pytest.approx(math.exp(sum(losses) / n), rel=1e-5)


def test_perplexity_errors(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(UserError, match="fewer than one window"):
        perplexity(model, tokenizer, "the cat", seqlen=16)
    with pytest.raises(UserError, match="seqlen"):
        perplexity(model, tokenizer, TEXT, seqlen=1)


# ----------------------------------------------------------------------------- corpus


def test_text_windows(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    w = text_windows(tokenizer, TEXT, n_windows=5, seqlen=8, seed=0)
    assert w.shape == (5, 8) and w.dtype == torch.long
    slices = {tuple(ids[i : i + 8]) for i in range(len(ids) - 7)}
    assert all(tuple(row) in slices for row in w.tolist())  # consecutive tokens of the text
    assert torch.equal(w, text_windows(tokenizer, TEXT, 5, 8, seed=0))
    assert not torch.equal(w, text_windows(tokenizer, TEXT, 5, 8, seed=1))
    assert text_windows(tokenizer, TEXT, len(ids) - 7, 8).shape == (len(ids) - 7, 8)  # every start once


def test_text_windows_errors(tokenizer):
    with pytest.raises(UserError, match="too short"):
        text_windows(tokenizer, "the cat is a dog", n_windows=1, seqlen=6)
    with pytest.raises(UserError, match="too short"):
        text_windows(tokenizer, "the cat is a dog", n_windows=2, seqlen=5)
    with pytest.raises(UserError):
        text_windows(tokenizer, TEXT, n_windows=0, seqlen=5)


def test_pydoc_text_and_split():
    text = pydoc_text()
    assert len(text) > 100_000 and text == pydoc_text()
    assert "statement" in text
    cal, ev = split_text(text, eval_fraction=0.2)
    assert text.startswith(cal) and text.endswith(ev)
    assert len(cal) + len(ev) <= len(text)  # a prefix and a suffix that do not overlap
    assert 0.15 < len(ev) / len(text) < 0.25
    assert load_text(None) == text
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(UserError):
            split_text(text, eval_fraction=bad)


def test_load_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some words\n\nmore words\n", encoding="utf-8")
    assert load_text(str(path)) == "some words\n\nmore words\n"
    assert split_text(load_text(str(path)), 0.5) == ("some words", "more words")
    with pytest.raises(UserError, match="not found"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        load_text(str(tmp_path / "empty.txt"))
