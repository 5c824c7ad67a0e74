"""Fault injection: bad input, bad numbers, interrupted and concurrent runs.

Every case asserts the exit status, a one-line message naming the problem, and
that nothing outside the run's temporary folder changed (:func:`snapshot`).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tokenizer
from layerif import io as lio
from layerif.cli import main
from layerif.errors import UserError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what a failed run must leave unchanged)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def work(tmp_path):
    """A folder with train / validation files; everything a run may touch lives under it."""
    _jsonl(tmp_path / "train.jsonl", [{"text": f"the capital of france is paris {w}"} for w in ("one", "two", "three", "four")])
    _jsonl(tmp_path / "val.jsonl", [{"prompt": "the capital of italy is", "completion": " rome"}])
    return tmp_path


def _score(tiny_model_dir, work, *extra, out="out"):
    return ["score", "--model", str(tiny_model_dir), "--train", str(work / "train.jsonl"), "--val", str(work / "val.jsonl"),
            "--out", str(work / out), "--quiet", "--batch-size", "4", *extra]


def fails(capsys, argv, expect, root: Path, status: int = 2, clean: bool = True) -> str:
    """Run ``argv``: exit ``status``, one line on stderr containing ``expect``, nothing under ``root`` changed."""
    before = snapshot(root)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == status, err
    assert len(err.splitlines()) == 1, err
    assert expect in err, err
    assert snapshot(root) == before
    assert not clean or not [p for p in root.rglob(".*layerif-*")], "a temporary or lock file was left behind"
    return err


# ----------------------------------------------------------------------------- result folders (library)


def _fill(folder: Path, command: str, **files: str) -> None:
    (folder / "config.json").write_text(json.dumps({"command": command, "args": {}}))
    for name, text in files.items():
        (folder / name).write_text(text)


def test_output_folder_swaps_the_whole_result_in(tmp_path):
    out = tmp_path / "res"
    with lio.output_folder(out, "score") as tmp:
        assert tmp != out and not out.exists()
        _fill(tmp, "score", **{"a.txt": "1", "stability.png": "x"})
    assert (out / "a.txt").read_text() == "1"
    with lio.output_folder(out, "score", overwrite=True) as tmp:
        assert (out / "a.txt").read_text() == "1"  # the old result stays until the new one is complete
        _fill(tmp, "score", **{"a.txt": "2"})
    assert (out / "a.txt").read_text() == "2"
    assert not (out / "stability.png").exists()  # a stale file never survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_failed_run_changes_nothing(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    _fill(out, "score", **{"a.txt": "1"})
    before = snapshot(tmp_path)
    for exc in (UserError("bad"), FloatingPointError("nan"), RuntimeError("bug")):
        with pytest.raises(type(exc)):
            with lio.output_folder(out, "score", overwrite=True) as tmp:
                _fill(tmp, "score", **{"a.txt": "2"})
                raise exc
        assert snapshot(tmp_path) == before


def test_interrupted_run_keeps_only_its_cache(tmp_path):
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        with lio.output_folder(out, "score") as tmp:
            (tmp / lio.CACHE_DIR).mkdir()
            (tmp / lio.CACHE_DIR / "k.group0.safetensors").write_text("pass")
            (tmp / "half.txt").write_text("x")
            raise KeyboardInterrupt
    assert not out.exists()
    staging = lio.sibling(out, "partial")
    assert sorted(p.name for p in staging.iterdir()) == [lio.CACHE_DIR]
    with lio.output_folder(out, "score") as tmp:  # the next run finds the cache, and only the cache
        assert sorted(p.name for p in tmp.iterdir()) == [lio.CACHE_DIR]
        _fill(tmp, "score")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.mark.parametrize("error", [UserError, FloatingPointError])
def test_late_error_keeps_the_finished_work(tmp_path, error):
    """An error after work was cached keeps the cache (--out untouched) and says how to resume."""
    out = tmp_path / "res"
    with pytest.raises(error, match=r"^bad; finished work kept in .*: rerun with --resume"):
        with lio.output_folder(out, "score") as tmp:
            (tmp / lio.CACHE_DIR).mkdir()
            (tmp / lio.CACHE_DIR / "rows.csv").write_text("finished")
            (tmp / "half.txt").write_text("x")
            raise error("bad")
    assert not out.exists()
    staging = lio.sibling(out, "partial")
    assert sorted(p.name for p in staging.iterdir()) == [lio.CACHE_DIR]
    assert (staging / lio.CACHE_DIR / "rows.csv").read_text() == "finished"


@pytest.mark.parametrize("crash_at", [1, 2])
def test_kill_between_renames_is_finished_by_the_next_run(tmp_path, monkeypatch, crash_at):
    """A process killed inside the swap (simulated: the n-th rename raises) leaves old and new whole;
    the next run on the folder completes the swap before anything else."""
    out = tmp_path / "res"
    out.mkdir()
    _fill(out, "score", **{"a.txt": "old", "only-old.txt": "x"})
    calls = {"n": 0}
    real = os.replace

    def replace(a, b):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise SystemExit("killed")
        real(a, b)

    monkeypatch.setattr(lio.os, "replace", replace)
    with pytest.raises(SystemExit):
        with lio.output_folder(out, "score", overwrite=True) as tmp:
            _fill(tmp, "score", **{"a.txt": "new"})
    monkeypatch.setattr(lio.os, "replace", real)
    # nothing lost: the new result is complete in the staging folder, the old one whole at `out` or aside
    assert (lio.sibling(out, "partial") / "a.txt").read_text() == "new"
    old = out if out.exists() else lio.sibling(out, "old")
    assert (old / "a.txt").read_text() == "old" and (old / "only-old.txt").exists()
    with pytest.raises(UserError, match="--overwrite"):  # the next run finishes the swap first
        with lio.output_folder(out, "score"):
            pass
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "config.json"]
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.mark.parametrize("setup,expect", [
    (lambda d: (d / "notes.txt").write_text("mine"), "not a layerif result"),
    (lambda d: _fill(d, "prune"), "holds a result of `layerif prune`"),
    (lambda d: _fill(d, "score"), "pass --overwrite"),
    (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})), "is a model folder"),
    (lambda d: (d / "model.safetensors").write_bytes(b"x"), "is a model folder"),
])
def test_out_rule(tmp_path, setup, expect):
    out = tmp_path / "res"
    out.mkdir()
    setup(out)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=expect.replace("`", ".").replace("-", ".")):
        with lio.output_folder(out, "score"):
            pytest.fail("the body must not run")
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["res"]


def test_out_inside_model_folder_or_under_a_file(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="inside the model folder"):
        lio.check_out_dir(tiny_model_dir / "scores", "score")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        lio.check_out_dir(tmp_path / "f" / "sub", "score")


def test_second_holder_of_a_folder_is_refused(tmp_path):
    out = tmp_path / "res"
    with lio.folder_lock(out):
        lock = json.loads(lio.sibling(out, "lock").read_text())
        assert lock["pid"] == os.getpid() and lock["host"]
        with pytest.raises(UserError, match=f"in use by another layerif run \\(pid {os.getpid()} on "):
            with lio.output_folder(out, "score"):
                pass
    assert not lio.sibling(out, "lock").exists()
    with lio.folder_lock(out):  # free again
        pass


def test_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "res"
    lio.sibling(out, "lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere"}))
    with lio.output_folder(out, "score") as tmp:
        _fill(tmp, "score")
    assert out.is_dir() and not lio.sibling(out, "lock").exists()


# ----------------------------------------------------------------------------- cache


def test_cache_entries_carry_the_fingerprint(tmp_path):
    import torch

    from layerif.cache import PassCache

    a = PassCache(tmp_path / "c", "aaaa")
    a.save("group0", {"x": torch.ones(2)})
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["aaaa.group0.safetensors"]
    assert PassCache(tmp_path / "c", "aaaa").load("group0") is not None
    b = PassCache(tmp_path / "c", "bbbb")  # another run's entries are never read
    assert b.load("group0") is None
    assert list((tmp_path / "c").iterdir()) == []


# ----------------------------------------------------------------------------- bad input: one line, exit 2


def _parquet_case(path: Path) -> tuple[Path, str]:
    path.write_bytes(b"PAR1 this is not parquet PAR1")
    import importlib.util

    return path, "not a readable Parquet file" if importlib.util.find_spec("pyarrow") else "needs pyarrow"


@pytest.mark.parametrize("name,content,expect", [
    ("list.jsonl", '{"text": "one two"}\n\n["text", "x"]\n', "list.jsonl line 3: a record must be a JSON object, got a list"),
    ("null.jsonl", '{"text": "one two"}\nnull\n', "null.jsonl line 2: a record must be a JSON object, got null"),
    ("string.jsonl", '"the cat"\n', "string.jsonl line 1: a record must be a JSON object, got a string"),
    ("broken.jsonl", '{"text": "one two"}\n{"text": "a"}\n{"text": \n', "broken.jsonl line 3: not valid JSON"),
    ("scalar.json", "3", "must hold a list of record objects"),
    ("items.json", '[{"text": "one two"}, 7]', "items.json record 1: a record must be a JSON object, got a number"),
    ("number.jsonl", '{"text": "one two"}\n{"text": 12}\n', "train record 1: field 'text' must be a string, got int 12"),
    ("listtext.jsonl", '{"text": ["a", "b"]}\n', "field 'text' must be a string, got list"),
    ("dict.jsonl", '{"prompt": {"a": 1}, "completion": "x"}\n', "field 'prompt' must be a string, got dict"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),
])
def test_bad_train_file(tiny_model_dir, work, capsys, name, content, expect):
    f = work / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    fails(capsys, _score(tiny_model_dir, work, "--train", str(f)), expect, work)


def test_bad_parquet(tiny_model_dir, work, capsys):
    f, expect = _parquet_case(work / "bad.parquet")
    fails(capsys, _score(tiny_model_dir, work, "--train", str(f)), expect, work)


def test_max_length_cutting_the_completion(tiny_model_dir, work, capsys, no_weights):
    _jsonl(work / "long.jsonl", [{"prompt": "the capital of italy is the city of", "completion": " rome"}])
    fails(capsys, _score(tiny_model_dir, work, "--val", str(work / "long.jsonl"), "--max-length", "4"),
          "validation record 0: --max-length 4 cuts off its whole completion (the prompt alone has 8 tokens)", work)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_option_values(tiny_model_dir, work, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(_score(tiny_model_dir, work, f"--damping-scale={value}"))
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert f"argument --damping-scale: must be a finite number (got {value})" in err


def _damage(folder: Path, how: str) -> None:
    w = folder / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x10" + b"\0" * 7 + b"not json" * 4)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_weights(tiny_model_dir, work, capsys, how):
    import shutil

    bad = work / "model"
    shutil.copytree(tiny_model_dir, bad)
    _damage(bad, how)
    fails(capsys, _score(tiny_model_dir, work, "--model", str(bad)),
          "a safetensors weight file is damaged or truncated", work)


@pytest.mark.parametrize("header", [os.urandom(64), b"GGUF" + os.urandom(64),
                                    b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + os.urandom(64)],
                         ids=["no-magic", "bad-version", "bad-metadata"])
def test_garbage_gguf(tiny_model_dir, work, capsys, header):
    g = work / "m.gguf"
    g.write_bytes(header)
    argv = [a for a in _score(tiny_model_dir, work) if a not in ("--model", str(tiny_model_dir))]
    fails(capsys, argv + ["--gguf-file", str(g)], "not a readable GGUF file", work)


def test_missing_model_folder(tiny_model_dir, work, capsys):
    fails(capsys, _score(tiny_model_dir, work, "--model", str(work / "no-such-model")), "model folder not found", work)


def test_out_under_a_file(tiny_model_dir, work, capsys):
    (work / "f").write_text("x")
    fails(capsys, _score(tiny_model_dir, work, out="f/sub"), "f is a file, not a folder", work)


def test_out_is_the_model_folder(tiny_model_dir, work, capsys):
    import shutil

    m = work / "m_copy"
    shutil.copytree(tiny_model_dir, m)
    fails(capsys, _score(m, work, out="m_copy"), "is a model folder; layerif never writes into a model folder", work)


@pytest.mark.parametrize("doc,expect", [
    ([1, 2], "must hold a JSON object of options, got list"),
    ({"command": "score", "args": ["x"]}, "'args' must be an object of options"),
    ({"command": "score", "args": {"n_train": "many"}}, "'n_train' must be an integer, got \"many\""),
    ({"command": "score", "args": {"damping_scale": None}}, "'damping_scale' must be a finite number, got null"),
    ({"command": "score", "args": {"per_val": 1}}, "'per_val' must be true or false, got 1"),
])
def test_bad_config(tiny_model_dir, work, capsys, doc, expect):
    (work / "c.json").write_text(json.dumps(doc))
    fails(capsys, _score(tiny_model_dir, work, "--config", str(work / "c.json")), expect, work)


def test_report_of_a_folder_with_a_bad_config(work, capsys):
    (work / "r").mkdir()
    (work / "r" / "config.json").write_text("[1]")
    fails(capsys, ["report", str(work / "r")], "must hold a JSON object of options, got list", work)


# ----------------------------------------------------------------------------- replayed configs never run code


def test_config_replay_never_enables_remote_code(tiny_model_dir, work, capsys):
    """A model folder whose config points at its own Python code: a shared config.json asking for
    trust_remote_code must not run it; only the command line can."""
    import shutil

    m = work / "evil"
    shutil.copytree(tiny_model_dir, m)
    marker = work / "code-ran"
    (m / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM, LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (m / "config.json").write_text(json.dumps(cfg))
    shared = work / "shared.json"
    shared.write_text(json.dumps({"command": "score", "args": {"model": str(m), "trust_remote_code": True,
                                                               "overwrite": True}}))
    argv = [a for a in _score(tiny_model_dir, work) if a not in ("--model", str(tiny_model_dir))]
    rc = main(argv + ["--config", str(shared)])
    capsys.readouterr()
    assert not marker.exists(), "a replayed config ran the model folder's code"
    assert rc == 0 and json.loads((work / "out" / "config.json").read_text())["args"]["trust_remote_code"] is False


# ----------------------------------------------------------------------------- signals (real processes)


def _spawn(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "layerif", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_handlers(p: subprocess.Popen) -> None:
    """Wait until ``p`` catches SIGTERM (bit 15 of SigCgt in /proc/PID/status): cli.main's first act. Before it
    the interpreter itself is starting, where no program can answer a signal with its own line; under a heavy
    load that window can outlast any fixed delay."""
    status = Path(f"/proc/{p.pid}/status")
    if not status.exists():
        pytest.skip("needs /proc to see when the process handles signals")
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        try:
            caught = next(int(line.split()[1], 16) for line in status.read_text().splitlines()
                          if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            break
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_while_starting(tmp_path, sig, status, word, delay):
    """Ctrl-C or SIGTERM while the libraries import (``delay`` seconds after cli.main set its handlers):
    one line and the conventional status."""
    p = _spawn(["tasks", "--quiet"], tmp_path)
    _wait_for_handlers(p)
    time.sleep(delay)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the command finished before the signal arrived")
    assert p.returncode == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerif") and f": {word}" in lines[0], err


# ----------------------------------------------------------------------------- no silent changes, concurrency (CLI)


def test_user_files_are_used_whole_unless_capped(tiny_model_dir, work, capsys):
    _jsonl(work / "big.jsonl", [{"text": f"the cat is {w}"} for w in ("one", "two", "three") * 30])
    assert main(_score(tiny_model_dir, work, "--train", str(work / "big.jsonl"))) == 0
    doc = json.loads((work / "out" / "scores.json").read_text())
    assert doc["n_train"] == 90 and doc["records"]["train"] == {"available": 90, "used": 90, "truncated": 0}
    assert main(_score(tiny_model_dir, work, "--train", str(work / "big.jsonl"), "--n-train", "7", out="capped")) == 0
    doc = json.loads((work / "capped" / "scores.json").read_text())
    assert doc["n_train"] == 7 and doc["records"]["train"]["available"] == 90
    assert "7 of 90 train" in capsys.readouterr().out


@pytest.fixture
def no_weights(monkeypatch):
    """Loading model weights fails the test: checks that need only the tokenizer and config come first."""
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the weights were loaded before the check"))


def test_record_longer_than_the_context_is_refused(tiny_model_dir, work, capsys, no_weights):
    _jsonl(work / "long.jsonl", [{"text": "the cat"}, {"text": "one " * 2100}])
    fails(capsys, _score(tiny_model_dir, work, "--train", str(work / "long.jsonl")),
          "train record 1 has 2100 tokens, more than the model's context of 2048; pass --max-length N", work)
    fails(capsys, _score(tiny_model_dir, work, "--max-length", "4096"), "--max-length 4096 exceeds the model's context", work)


def test_rerun_needs_overwrite_and_replaces_the_whole_folder(tiny_model_dir, work, capsys):
    assert main(_score(tiny_model_dir, work, "--bootstrap", "20")) == 0
    assert (work / "out" / "stability.png").exists()
    fails(capsys, _score(tiny_model_dir, work), "holds an earlier `layerif score` result; pass --overwrite", work)
    assert main(_score(tiny_model_dir, work, "--overwrite")) == 0
    assert not (work / "out" / "stability.png").exists()


def test_concurrent_run_on_the_same_folder_is_refused(tiny_model_dir, work, capsys):
    """Another process holds the folder: the run fails at once naming it, and changes nothing."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from layerif.io import folder_lock\n"
                               f"with folder_lock(__import__('pathlib').Path({str(work / 'out')!r})):\n"
                               "    print('held', flush=True); time.sleep(60)"],
        env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = fails(capsys, _score(tiny_model_dir, work), f"is in use by another layerif run (pid {holder.pid} on ", work,
                    clean=False)
        assert "lock file" in err
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- bad numbers: exit 1, nothing written


def _poisoned(tiny_model_dir: Path, dest: Path, where: str) -> Path:
    """A copy of the tiny model with NaN in one place: ``embed:WORD`` (that token's embedding row, so only
    records holding WORD are hit) or a parameter name (every record is hit)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_model_dir, dest)
    weights = load_file(dest / "model.safetensors")
    if where.startswith("embed:"):
        token = make_tokenizer().convert_tokens_to_ids(where.split(":")[1])
        weights["model.embed_tokens.weight"][token] = float("nan")
    else:
        weights[where][0, 0] = float("inf")
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("mode", ["materialized", "streaming"])
def test_nan_reaching_only_validation_records(tiny_model_dir, work, capsys, mode):
    """'rome' is only in the validation record: the train side is finite, the validation loss is not."""
    m = _poisoned(tiny_model_dir, work / "nan-model", "embed:rome")
    fails(capsys, _score(m, work, "--mode", mode),
          "non-finite loss for validation record 0; the first non-finite value appears in model.embed_tokens "
          "(outside the decoder blocks)", work, status=1)
    assert not (work / "out").exists()


def test_inf_in_block_1_is_named_block_1(tiny_model_dir, work, capsys):
    m = _poisoned(tiny_model_dir, work / "inf-model", "model.layers.1.mlp.up_proj.weight")
    fails(capsys, _score(m, work, "--target", "attn"),
          "non-finite loss for validation record 0; the first non-finite value appears in "
          "model.layers.1.mlp.up_proj (block 1)", work, status=1)


def test_non_finite_gradient_names_the_module_it_reaches_first(llama, tokenizer):
    import torch

    from layerif.data import collate, encode_split
    from layerif.grads import NonFinite, capture, losses_and_backward
    from layerif.models import select_targets

    targets = select_targets(llama, "attn")
    batch = collate(encode_split(tokenizer, [{"text": "the cat is a dog"}] * 2, "x")[0], 1)
    v = targets[-1].module  # block 2's last attention projection: the first target the backward pass reaches
    def poison(mod, inp, out) -> None:  # the output gradient of batch row 1 becomes NaN
        out.register_hook(lambda g: torch.where(torch.arange(g.shape[0]).view(-1, 1, 1) == 1,
                                                torch.full_like(g, float("nan")), g))

    handle = v.register_forward_hook(poison)
    try:
        with pytest.raises(NonFinite) as exc, capture(llama, targets, lambda t, x, d: None):
            losses_and_backward(llama, batch)
    finally:
        handle.remove()
    err = exc.value.at("train", 10)
    assert str(err) == f"non-finite gradient for train record 11; the first non-finite value appears in {v_name(targets)}"


def v_name(targets) -> str:
    return f"{targets[-1].name} (block {targets[-1].block})"


# ----------------------------------------------------------------------------- fail fast: before the model loads


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: these inputs must be refused before."""
    from layerif import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))


@pytest.mark.parametrize("doc,expect", [
    ({"layers": [0, 1], "score": ["0.5", 1.0]}, "'score' must hold finite numbers; entry 0 is \"0.5\""),
    ({"layers": [0, "1"], "score": [0.5, 1.0]}, "'layers' must hold block indices"),
    ({"layers": [0, 1], "score": [0.5]}, "'layers' and 'score' lists of equal length"),
    ([1, 2], "is not a layerif scores.json"),
])
def test_bad_scores_file_before_the_model_loads(tiny_model_dir, work, capsys, no_model_load, doc, expect):
    (work / "scores.json").write_text(json.dumps(doc))
    fails(capsys, ["prune", "--model", str(tiny_model_dir), "--allocation", "layerif", "--scores", str(work / "scores.json"),
                   "--quiet"], expect, work)


def test_compare_tasks_with_a_malformed_second_task(tiny_model_dir, work, capsys, no_model_load):
    """(A second task whose records tokenize badly is caught before the weights too: load_checked.)"""
    (work / "bad.jsonl").write_text('{"text": "one two"}\n[1]\n')
    fails(capsys, ["compare-tasks", "--model", str(tiny_model_dir), "--tasks",
                   f"a={work / 'train.jsonl'}:{work / 'val.jsonl'},b={work / 'bad.jsonl'}:{work / 'val.jsonl'}",
                   "--out", str(work / "cmp"), "--quiet"], "bad.jsonl line 2: a record must be a JSON object", work)


def test_bad_record_field_before_the_model_loads(tiny_model_dir, work, capsys, no_model_load):
    fails(capsys, _score(tiny_model_dir, work, "--text-field", "txt"), "train record 0: a record has neither 'txt'", work)


def test_batch_too_large_for_memory_is_refused_before_the_pass(tiny_model_dir, work, capsys, monkeypatch):
    from layerif import grads

    monkeypatch.setattr(grads, "available_bytes", lambda device: 1e5)
    fails(capsys, _score(tiny_model_dir, work), "a batch of 4 train records of up to 7 tokens needs about", work)


def test_pass_memory_estimate_grows_with_batch_and_tokens(llama):
    from layerif.grads import pass_bytes

    small, wide, long = pass_bytes(llama, 1, 100), pass_bytes(llama, 4, 100), pass_bytes(llama, 1, 400)
    assert wide == pytest.approx(4 * small) and long > 4 * small  # the attention term is quadratic


def test_untrained_lora_adapters_are_refused(tiny_model_dir, work, capsys):
    fails(capsys, _score(tiny_model_dir, work, "--target", "lora"), "--target lora on fresh adapters needs --finetune-steps",
          work)


def test_clamped_top_k_is_reported(tiny_model_dir, work, capsys):
    assert main(_score(tiny_model_dir, work, "--bootstrap", "10", "--top-k", "9")) == 0
    assert "note: --top-k 9 is more than the 3 blocks scored: k = 3 was used" in capsys.readouterr().out
    assert json.loads((work / "out" / "scores.json").read_text())["notes"]


def test_sigterm_during_a_run_changes_nothing(tiny_model_dir, work):
    """A real run on a folder holding an earlier result, terminated once it holds the folder: status 143,
    one line, the earlier result untouched, no lock left, at most the resume cache in the temporary folder."""
    out = work / "out"
    out.mkdir()
    _fill(out, "score", **{"scores.json": "{}"})
    before = snapshot(out)
    argv = _score(tiny_model_dir, work, "--overwrite")[1:]
    p = _spawn(["score", *argv], work)
    lock = lio.sibling(out, "lock")
    deadline = time.time() + 120
    while not lock.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert p.returncode == 143 and err.strip().splitlines() == ["layerif score: terminated (SIGTERM)"], err
    assert snapshot(out) == before and not lock.exists()
    staging = lio.sibling(out, "partial")
    assert not staging.exists() or {p.name for p in staging.iterdir()} <= {lio.CACHE_DIR}


def test_report_waits_for_the_folder_lock(work, capsys):
    out = work / "res"
    out.mkdir()
    _fill(out, "compare-moe")
    with lio.folder_lock(out):
        fails(capsys, ["report", str(out)], "report folder", work, clean=False)
    assert main(["report", str(out)]) == 0 and (out / "report.md").exists() and (out / "report.html").exists()


def test_lm_eval_export_is_a_unit(tmp_path):
    from layerif.tasks import export_lm_eval

    export_lm_eval(tmp_path / "lm", ["capitals"])
    export_lm_eval(tmp_path / "lm", ["past-tense"])  # an earlier export is replaced whole
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["past-tense"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not an lm-eval export"):
        export_lm_eval(tmp_path / "mine", ["capitals"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm", "mine"]


def test_compare_tasks_checks_every_task_before_the_weights(tiny_model_dir, work, capsys, no_weights):
    _jsonl(work / "longval.jsonl", [{"prompt": "the capital of italy is the city of", "completion": " rome"}])
    fails(capsys, ["compare-tasks", "--model", str(tiny_model_dir), "--max-length", "6", "--tasks",
                   f"a={work / 'train.jsonl'}:{work / 'val.jsonl'},b={work / 'train.jsonl'}:{work / 'longval.jsonl'}",
                   "--out", str(work / "cmp"), "--quiet"], "validation record 0: --max-length 6 cuts off", work)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_library_refuses_non_finite_damping(llama, tokenizer, value):
    from layerif.data import encode_split
    from layerif.models import LoadedModel
    from helpers import compute

    recs = encode_split(tokenizer, [{"text": "the cat is a dog"}] * 2, "x")[0]
    with pytest.raises(UserError, match="--damping-scale must be > 0"):
        compute(LoadedModel(llama, tokenizer, "tiny"), recs, recs, damping_scale=value)


def test_non_finite_influence_from_finite_gradients_is_an_error(tiny_model_dir, work, capsys, monkeypatch):
    """Defence in depth: whatever the estimator returns, NaN never reaches scores.json."""
    import torch

    from layerif import scores

    real = scores.gram_influence

    def overflowing(*a, **k):
        inf, lam = real(*a, **k)
        name = next(iter(inf))
        inf[name] = torch.full_like(inf[name], float("nan"))
        return inf, lam

    monkeypatch.setattr(scores, "gram_influence", overflowing)
    fails(capsys, _score(tiny_model_dir, work, "--mode", "materialized"),
          "non-finite influence in module model.layers.0.self_attn.q_proj (block 0) from finite gradients", work,
          status=1)


def test_out_is_the_current_folder_or_the_root(tiny_model_dir, work, capsys, monkeypatch):
    (work / "here").mkdir()
    monkeypatch.chdir(work / "here")
    argv = _score(tiny_model_dir, work)
    for out in (".", "/", ".."):
        argv[argv.index("--out") + 1] = out
        fails(capsys, argv, f"--out {out} is (or holds) the current folder", work)


@pytest.mark.parametrize("argv", [
    ["score"],
    ["compare-tasks", "--tasks", "capitals,addition"],
    ["compare-estimators"],
    ["validate"],
    ["compare-pruning", "--allocations", "uniform"],
    ["compare-moe", "--allocations", "uniform"],
], ids=lambda a: a[0])
def test_every_command_refuses_a_foreign_out_before_the_model(work, capsys, no_model_load, argv):
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("keep me")
    fails(capsys, [*argv, "--out", str(work / "mine"), "--quiet"], "holds files that are not a layerif result", work)


# ----------------------------------------------------------------------------- --save folders


@pytest.fixture
def pruned_dir(work, capsys):
    """An earlier `prune --save` folder (a model folder of layerif's own)."""
    from conftest import tiny_model
    from layerif.prune_export import save_pruned

    dest = save_pruned(tiny_model("llama", n_layers=3), make_tokenizer(), str(work / "pruned"), {"layers": [0, 1, 2]})
    capsys.readouterr()  # the progress bars of saving
    return dest


def _prune(model, *extra):
    return ["prune", "--model", str(model), "--allocation", "uniform", "--method", "magnitude", "--quiet", *extra]


def test_save_over_an_earlier_result_needs_overwrite(tiny_model_dir, work, capsys, pruned_dir, no_model_load):
    fails(capsys, _prune(tiny_model_dir, "--save", str(pruned_dir)), "holds an earlier pruned model; pass --overwrite",
          work)


def test_save_of_another_command_is_refused(tiny_model_dir, work, capsys, pruned_dir, no_model_load):
    """`prune --save P` then `moe --save P`: P is a model folder, never replaced by an adapter."""
    fails(capsys, ["moe", "--model", str(tiny_model_dir), "--allocation", "uniform", "--save", str(pruned_dir),
                   "--overwrite", "--quiet"], "is a model folder", work)


def test_save_never_overwrites_the_input_model(work, capsys, pruned_dir, no_model_load):
    fails(capsys, _prune(pruned_dir, "--save", str(pruned_dir), "--overwrite"), "is the input model", work)


def test_save_is_never_the_current_folder(tiny_model_dir, work, capsys, monkeypatch, no_model_load):
    (work / "here").mkdir()
    monkeypatch.chdir(work / "here")
    for save in (".", ".."):
        fails(capsys, _prune(tiny_model_dir, "--save", save), f"--save {save} is (or holds) the current folder", work)


def test_search_dir_is_never_a_model_folder(tiny_model_dir, work, capsys, no_model_load):
    fails(capsys, ["prune", "--model", str(tiny_model_dir), "--allocation", "sensitivity", "--method", "magnitude",
                   "--search-dir", str(tiny_model_dir), "--quiet"], "--search-dir", work)
    fails(capsys, ["prune", "--model", str(tiny_model_dir), "--allocation", "sensitivity", "--method", "magnitude",
                   "--search-dir", str(tiny_model_dir / "levels"), "--quiet"], "is inside the model folder", work)


def test_overwrite_never_deletes_files_it_did_not_write(work, pruned_dir):
    from conftest import tiny_model
    from layerif.prune_export import save_pruned

    (pruned_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"also holds files layerif did not write \(notes.txt\)"):
        save_pruned(tiny_model("llama", n_layers=3), make_tokenizer(), str(pruned_dir), {"layers": [0, 1, 2]},
                    overwrite=True)
    assert (pruned_dir / "notes.txt").read_text() == "mine"
    (pruned_dir / "notes.txt").unlink()
    save_pruned(tiny_model("llama", n_layers=3), make_tokenizer(), str(pruned_dir), {"layers": [0, 1, 2], "b": 1},
                overwrite=True)
    assert json.loads((pruned_dir / "allocation.json").read_text())["b"] == 1


@pytest.mark.parametrize("extra,named", [(["--sparsity", "0.3"], "--sparsity"), (["--allocation", "uniform"], "--allocation"),
                                         (["--allocation", "owl", "--sparsity", "0.5"], "--allocation and --sparsity")])
def test_allocation_file_with_allocation_or_sparsity_is_refused(tiny_model_dir, work, capsys, no_model_load, extra, named):
    (work / "allocation.json").write_text(json.dumps({"layers": [0, 1, 2], "sparsity": [0.4, 0.5, 0.6]}))
    fails(capsys, ["prune", "--model", str(tiny_model_dir), "--allocation-file", str(work / "allocation.json"),
                   "--method", "magnitude", "--quiet", *extra], f"{named} cannot be combined with --allocation-file", work)


# ----------------------------------------------------------------------------- non-finite results


def test_prune_of_nan_weights_stops_and_writes_nothing(tiny_model_dir, work, capsys):
    m = _poisoned(tiny_model_dir, work / "nan-model", "embed:rome")
    fails(capsys, ["prune", "--model", str(m), "--allocation", "uniform", "--method", "magnitude", "--eval-windows", "2",
                   "--save", str(work / "pruned"), "--quiet"],
          "the pruned model's model.embed_tokens.weight holds non-finite values", work, status=1)


def test_non_finite_training_loss_names_its_step(llama, tokenizer):
    import torch

    from layerif.train import TrainConfig, train

    calls = []

    def extra():
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == 2 else 0.0)

    records = [{"prompt": "the capital of france is", "completion": " paris"}] * 4
    with pytest.raises(FloatingPointError, match=r"^the training loss at step 2 is not finite \(nan\)$"):
        train(llama, tokenizer, records, TrainConfig(steps=3, batch_size=4), extra_loss=extra)


# ----------------------------------------------------------------------------- the 14 traceback kinds: one line each


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name,make,expect", [
    ("deep.jsonl", lambda p: p.write_text('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n"),
     "deep.jsonl line 1: not readable JSON (nested too deeply)"),
    ("bigint.jsonl", lambda p: p.write_text('{"text": "one two", "n": ' + "9" * 5000 + "}\n"),
     "bigint.jsonl line 1: not readable JSON (Exceeds the limit"),
    ("deep.json", lambda p: p.write_text("[" * 100000 + "]" * 100000), "deep.json: not readable JSON (nested too deeply)"),
    ("surrogate.jsonl", lambda p: p.write_text('{"text": "the cat \\ud800 dog"}\n'),
     "train record 0: field 'text' is not valid Unicode text (a lone surrogate '\\ud800' at character 8)"),
    ("pipe.jsonl", _fifo, "pipe.jsonl is not a regular file (a pipe, socket or device)"),
], ids=["nested", "5000-digits", "nested-json", "lone-surrogate", "named-pipe"])
def test_unreadable_record_file_is_one_line(tiny_model_dir, work, capsys, no_model_load, name, make, expect):
    make(work / name)
    fails(capsys, _score(tiny_model_dir, work, "--train", str(work / name)), expect, work)


@pytest.mark.parametrize("layers", [["0", "1", "2"], None, 3], ids=["strings", "null", "scalar"])
@pytest.mark.parametrize("option", ["--allocation-file", "--search-init"])
def test_allocation_file_with_bad_layers(tiny_model_dir, work, capsys, layers, option):
    (work / "allocation.json").write_text(json.dumps({"layers": layers, "sparsity": [0.4, 0.5, 0.6]}))
    extra = [option, str(work / "allocation.json")] + (["--allocation", "search", "--search-dir", str(work / "sd")]
                                                       if option == "--search-init" else [])
    fails(capsys, ["prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--quiet", *extra],
          f"allocation.json: 'layers' must be a list of block indices (integers), got {json.dumps(layers)}", work)


def test_scores_folder_whose_scores_json_is_a_folder(tiny_model_dir, work, capsys, no_model_load):
    (work / "s" / "scores.json").mkdir(parents=True)
    fails(capsys, ["prune", "--model", str(tiny_model_dir), "--allocation", "layerif", "--scores", str(work / "s"),
                   "--method", "magnitude", "--quiet"], "scores.json: it is a folder", work)


@pytest.mark.parametrize("rows,expect", [
    ("0.5,uniform,magnitude,0,0.5,12.0,0.5,1.0,0.0,0.0\n0.5,owl,magn", "comparison.csv line 3 is damaged (column 'achieved'"),
    ("0.5,uniform,magnitude,0,0.5,twelve,0.5,1.0,0.0,0.0\n", "comparison.csv line 2 is damaged (column 'perplexity': 'twelve')"),
], ids=["truncated", "not-a-number"])
def test_resume_over_a_damaged_comparison_csv(tiny_model_dir, work, capsys, no_model_load, rows, expect):
    from layerif.cli import build_args, make_parser
    from layerif.commands.base import COMMANDS
    from layerif.results import write_config

    argv = ["compare-pruning", "--model", str(tiny_model_dir), "--allocations", "uniform", "--methods", "magnitude",
            "--sparsities", "0.5", "--seeds", "0", "--n-calib", "3", "--seqlen", "16", "--eval-windows", "2",
            "--task", "capitals", "--task-items", "4", "--out", str(work / "cmp"), "--quiet"]
    (work / "cmp").mkdir()
    parsed = make_parser().parse_known_args(argv)[0]  # loads the commands (COMMANDS) too
    write_config(work / "cmp", "compare-pruning", build_args(COMMANDS["compare-pruning"].args, parsed))
    (work / "cmp" / "comparison.csv").write_text(
        "sparsity,allocation,method,seed,achieved,perplexity,accuracy,seconds,alloc_seconds,alloc_tokens\n" + rows)
    fails(capsys, [*argv, "--resume"], expect, work)


@pytest.mark.parametrize("label", ["..", ".", ".hidden", "report.md"])
def test_compare_tasks_label_outside_its_folder(tiny_model_dir, work, capsys, no_model_load, label):
    pair = f"{work / 'train.jsonl'}:{work / 'val.jsonl'}"
    fails(capsys, ["compare-tasks", "--model", str(tiny_model_dir), "--tasks", f"{label}={pair},b={pair}",
                   "--out", str(work / "cmp"), "--quiet"], f"task label {label!r} cannot name a folder inside --out", work)


def test_seeds_beyond_64_bits(tiny_model_dir, work, capsys, no_model_load):
    fails(capsys, ["compare-moe", "--model", str(tiny_model_dir), "--allocations", "uniform", "--seeds",
                   "99999999999999999999,1,2", "--out", str(work / "cmp"), "--quiet"],
          "--seeds: every value must be an integer from 0 to 2^63-1 (got 99999999999999999999)", work)
    with pytest.raises(SystemExit) as exc:
        main(["moe", "--model", str(tiny_model_dir), "--seed", "99999999999999999999", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--seed: must fit 64 bits" in err, err


def test_nan_weights_with_the_alpha_allocation(tiny_model_dir, work, capsys):
    m = _poisoned(tiny_model_dir, work / "nan-model", "model.layers.1.mlp.up_proj.weight")
    fails(capsys, ["prune", "--model", str(m), "--allocation", "alpha", "--method", "magnitude", "--quiet"],
          "the weight of model.layers.1.mlp.up_proj (block 1) holds non-finite values", work, status=1)


def test_subnormal_damping_scale(tiny_model_dir, work, capsys, no_model_load):
    fails(capsys, _score(tiny_model_dir, work, "--estimator", "exact", "--damping-scale", "1e-320"),
          "--damping-scale must be at least 2.23e-308, the smallest normal float (got 1e-320)", work)


def test_score_table_of_huge_scores():
    """Scores near the float limit (a tiny damping) print without overflowing the bars."""
    from types import SimpleNamespace

    from layerif.commands.score import table

    result = SimpleNamespace(score=[2.7e307, 5.0e307, -1.4e307], layers=[0, 1, 2],
                             aggregations=lambda: {"helpful_share": [0.5, 0.5, 0.5]})
    bars = [line.split("%")[-1].replace("*", "").strip() for line in table(result).splitlines()[1:]]
    assert [len(b) for b in bars] == [round(24 * 2.7 / 5.0), 24, 0]


@pytest.mark.parametrize("exc,status,expect", [
    (lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1,
     "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower the need with --max-memory, "
     "--mode streaming or a narrower --target, or share it with --world-size"),
    (lambda: MemoryError(), 1, "out of memory (MemoryError)"),
    (lambda: OSError("Unable to load weights from pytorch checkpoint file"), 2,
     "cannot load model"),
], ids=["cuda-oom", "host-oom", "bad-file"])
def test_model_loading_errors_keep_their_class(tiny_model_dir, work, capsys, monkeypatch, exc, status, expect):
    """Out of memory while the weights load is exit 1 with its own advice, not "bad input"; the files' own
    problems stay exit 2."""
    import transformers

    def raising(*a, **k):
        raise exc()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", raising)
    fails(capsys, _score(tiny_model_dir, work), expect, work, status=status)


def test_a_bug_while_loading_keeps_its_traceback(tiny_model_dir, work, capsys, monkeypatch):
    import transformers

    def buggy(*a, **k):
        raise TypeError("an internal bug")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", buggy)
    before = snapshot(work)
    with pytest.raises(TypeError, match="an internal bug"):
        main(_score(tiny_model_dir, work))
    assert snapshot(work) == before


def test_out_of_memory_during_a_run(tiny_model_dir, work, capsys, monkeypatch):
    """Out of memory after the model loaded: one line with the advice, exit 1, --out untouched."""
    from layerif import scores

    def oom(*a, **k):
        raise RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)")

    monkeypatch.setattr(scores, "compute", oom)
    fails(capsys, _score(tiny_model_dir, work), "out of memory (MPS backend out of memory", work, status=1)


@pytest.mark.parametrize("allocation", ["search", "sensitivity"])
def test_search_on_a_non_finite_model_stops_before_any_level(tiny_model_dir, work, capsys, allocation):
    """The search fitness (KL to the dense model) of a model with NaN weights: exit 1 naming it, no level built,
    nothing in --search-dir."""
    m = _poisoned(tiny_model_dir, work / "nan-model", "model.layers.1.mlp.up_proj.weight")
    fails(capsys, ["prune", "--model", str(m), "--allocation", allocation, "--method", "magnitude", "--search-dir",
                   str(work / "sd"), "--quiet"],
          "the weight model.layers.1.mlp.up_proj.weight holds non-finite values (1 of 1536)", work, status=1)


def test_non_finite_search_fitness_is_an_error(llama):
    import torch

    from layerif.search import kl_to_reference, reference_logprobs

    windows = torch.randint(0, 100, (2, 6))
    reference = reference_logprobs(llama, windows)
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^the search fitness \(KL of the pruned model to the dense one\) "
                                                  r"is not finite \(nan\)$"):
        kl_to_reference(llama, windows, reference)


def test_non_finite_ground_truth_is_an_error(llama, tokenizer, monkeypatch):
    """validate's fine-tune gain on a validation loss that went non-finite after training block 1 (the training
    loss stays finite): a FloatingPointError naming the block, no gain."""
    import torch

    from layerif import validate
    from layerif.data import encode_split, pad_id
    from layerif.models import select_targets
    from layerif.train import TrainConfig

    train = encode_split(tokenizer, [{"text": "the cat is a dog"}] * 4, "train")[0]
    val = encode_split(tokenizer, [{"prompt": "the capital of italy is", "completion": " rome"}], "validation")[0]
    trained = []
    real_train = validate.train_encoded

    def train_encoded(model, *a, **k):  # training block 1 leaves a NaN in its weights (after a finite loss)
        real_train(model, *a, **k)
        trained.append(1)
        if len(trained) == 2:
            with torch.no_grad():
                model.model.layers[1].self_attn.o_proj.weight[:] = float("nan")

    monkeypatch.setattr(validate, "train_encoded", train_encoded)
    with pytest.raises(FloatingPointError, match=r"^the validation loss after fine-tuning block 1 is not finite"):
        validate.fine_tune_gain(llama, select_targets(llama, "attn"), train, val, pad_id(tokenizer),
                                TrainConfig(steps=1, batch_size=2))
    with torch.no_grad():
        llama.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(FloatingPointError, match=r"^the validation loss is not finite"):
        validate.mean_loss(llama, val, pad_id(tokenizer))


# ----------------------------------------------------------------------------- every long command: checks first


@pytest.mark.parametrize("argv,expect", [
    (["score", "--bootstrap", "1"], "--bootstrap must be >= 2 resamples"),
    (["validate", "--sparsity", "1.5"], "--sparsity must be in (0, 1) (got 1.5)"),
    (["prune", "--allocation", "uniform", "--method", "magnitude", "--sparsity", "1.5"], "sparsity 1.5 is outside"),
    (["compare-pruning", "--allocations", "uniform,search-uniform", "--methods", "magnitude", "--sparsities", "0.7,0.6",
      "--search-low", "0.65"], "search levels need 0 ≤ low (0.65) ≤ target (0.6)"),
    (["compare-moe", "--allocations", "uniform", "--betas", "-1"], "beta -1 must be ≥ 0"),
    (["compare-finetune", "--allocations", "nosuch"], "unknown allocation 'nosuch'"),
    (["finetune", "--allocation", "uniform", "--rank", "0"], "--rank must be ≥ 1 (got 0)"),
    (["moe", "--allocation", "nosuch"], "unknown allocation 'nosuch'"),
    (["compare-estimators", "--estimators", "datainf,nosuch"], "unknown estimator 'nosuch'"),
    (["compare-tasks", "--tasks", "capitals"], "--tasks needs at least two tasks to compare"),
], ids=lambda a: a[0] if isinstance(a, list) else "")
def test_every_long_command_checks_a_bad_option_before_the_model(tiny_model_dir, work, capsys, no_model_load, argv,
                                                                 expect):
    data = ["--train", str(work / "train.jsonl"), "--val", str(work / "val.jsonl")] \
        if argv[0] in ("score", "validate", "compare-estimators") else []
    out = ["--out", str(work / "res")] if argv[0] not in ("prune", "moe", "finetune") else []
    fails(capsys, [argv[0], "--model", str(tiny_model_dir), *data, *argv[1:], *out, "--quiet"], expect, work)


@pytest.mark.parametrize("argv,expect", [
    (["finetune", "--allocation", "uniform", "--blocks", "8"], "--blocks 8 is outside 1..3 (the model has 3 blocks)"),
    (["compare-finetune", "--allocations", "uniform", "--budgets", "2,8"], "--blocks 8 is outside 1..3"),
    (["moe", "--allocation", "uniform", "--total-experts", "2"], "the expert budget T=2 is smaller than the number of "
                                                                  "blocks (3)"),
    (["compare-moe", "--allocations", "uniform", "--total-experts", "2"], "the expert budget T=2 is smaller"),
], ids=lambda a: a[0] if isinstance(a, list) else "")
def test_budgets_against_the_block_count_before_the_weights(tiny_model_dir, work, capsys, no_weights, argv, expect):
    """A budget that needs the model's block count is checked from its config, before the weights load."""
    out = ["--out", str(work / "res")] if argv[0].startswith("compare") else []
    fails(capsys, [argv[0], "--model", str(tiny_model_dir), *argv[1:], *out, "--quiet"], expect, work)


def test_scores_for_another_model_before_the_weights(tiny_model_dir, work, capsys, no_weights):
    (work / "scores.json").write_text(json.dumps({"layers": [0, 1], "score": [0.5, 1.0]}))
    fails(capsys, ["moe", "--model", str(tiny_model_dir), "--allocation", "layerif", "--scores",
                   str(work / "scores.json"), "--quiet"], "is a scores file for another model (2 blocks; this model "
                                                          "has 3)", work)


# ----------------------------------------------------------------------------- the newer commands and options


def _deep(path: Path) -> Path:
    path.write_text('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")
    return path


@pytest.mark.parametrize("argv,expect", [
    (["finetune", "--allocation", "uniform", "--save", "{model}"], "is the input model (--model)"),
    (["finetune", "--allocation", "uniform", "--save", "{work}/mine"], "holds files that are not an earlier LoRA adapter"),
    (["finetune", "--allocation", "top:gain", "--validation", "{work}/deep.jsonl"],
     "deep.jsonl: not readable JSON (nested too deeply)"),
    (["finetune", "--allocation", "uniform", "--task", "nosuch"], "unknown task 'nosuch'"),
    (["finetune", "--allocation", "top:layerif", "--scores", "{work}/mine"], "scores file not found"),
    (["compare-finetune", "--allocations", "uniform", "--seeds", "-1", "--out", "{work}/cf"],
     "--seeds: every value must be an integer from 0 to 2^63-1 (got -1)"),
    (["compare-finetune", "--allocations", "uniform", "--out", "{work}/mine"], "holds files that are not a layerif result"),
    (["plan", "--gpu", "nosuch", "--out", "{work}/pl"], "unknown --gpu 'nosuch' (use H200, H100, A100)"),
    (["plan", "--world-size", "0", "--out", "{work}/pl"], "--world-size must be >= 1 (got 0)"),
    (["plan", "--train", "{work}/deep.jsonl", "--val", "{work}/val.jsonl", "--out", "{work}/pl"],
     "deep.jsonl line 1: not readable JSON (nested too deeply)"),
    (["plan", "--train", "{work}/pipe.jsonl", "--val", "{work}/val.jsonl", "--out", "{work}/pl"],
     "pipe.jsonl is not a regular file"),
    (["plan", "--out", "{work}/mine"], "holds files that are not a layerif result"),
    (["prune", "--allocation", "uniform", "--method", "wanda", "--calib", "{work}/pipe.jsonl"],
     "--calib {work}/pipe.jsonl is not a regular file"),
    (["prune", "--allocation", "uniform", "--method", "wanda", "--calib", "{work}/deep.jsonl"],
     "deep.jsonl line 1: not readable JSON (nested too deeply)"),
    (["prune", "--allocation", "uniform", "--method", "magnitude", "--eval", "{work}/deep.json"],
     "deep.json: not readable JSON (nested too deeply)"),
    (["prune", "--allocation", "uniform", "--method", "wanda", "--calib", "{work}/val.jsonl"],
     "has no field 'text' (fields: prompt, completion); choose one with --text-field"),
    (["prune", "--allocation", "uniform", "--method", "magnitude", "--eval", "{work}/none.txt"],
     "--eval '{work}/none.txt' is neither builtin, c4, wikitext2 nor an existing file or folder"),
    (["compare-pruning", "--allocations", "uniform", "--methods", "magnitude", "--eval", "{work}/pipe.jsonl", "--out",
      "{work}/cp"], "--eval {work}/pipe.jsonl is not a regular file"),
    (["validate", "--train", "{work}/train.jsonl", "--val", "{work}/val.jsonl", "--calib", "{work}/deep.jsonl",
      "--out", "{work}/v"], "deep.jsonl line 1: not readable JSON (nested too deeply)"),
], ids=["finetune-save-model", "finetune-save-foreign", "finetune-validation-nested", "finetune-task",
        "finetune-scores-missing", "compare-finetune-seeds", "compare-finetune-out", "plan-gpu", "plan-world-size",
        "plan-train-nested", "plan-train-pipe", "plan-out", "calib-pipe", "calib-nested", "eval-nested-json",
        "calib-no-text-field", "eval-missing", "compare-pruning-eval-pipe", "validate-calib-nested"])
def test_newer_commands_and_data_options_refuse_bad_input(tiny_model_dir, work, capsys, no_weights, argv, expect):
    """finetune, compare-finetune, plan and the --calib / --eval sources: one line, exit 2, nothing written,
    before the weights load."""
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("keep me")
    _deep(work / "deep.jsonl")
    (work / "deep.json").write_text("[" * 100000 + "]" * 100000)
    _fifo(work / "pipe.jsonl")
    fill = {"model": str(tiny_model_dir), "work": str(work)}
    argv = [a.format(**fill) for a in argv]
    fails(capsys, [argv[0], "--model", str(tiny_model_dir), *argv[1:], "--quiet"], expect.format(**fill), work)


def test_lora_scores_of_a_saturated_model_are_not_zeros(tiny_model_dir, work, capsys):
    """--finetune-lr 1e30 saturates the adapters: every gradient vanishes; the run stops (exit 1) naming it
    instead of writing all-zero scores."""
    rc = main(_score(tiny_model_dir, work, "--target", "lora", "--finetune-steps", "3", "--finetune-lr", "1e30"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "every block's influence is exactly zero: the train gradients vanished; --target lora" in err[0]
    assert not (work / "out").exists()
