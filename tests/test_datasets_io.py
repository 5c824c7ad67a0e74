"""layerif.datasets_io: the hub data sets as the papers load them (stood in by local data of the same layout),
local files, the sampling rules against hand computations, bad input. Nothing here touches the network."""

from __future__ import annotations

import builtins
import json
import random

import pytest
import torch

from layerif import datasets_io as D
from layerif.errors import UserError

datasets = pytest.importorskip("datasets")


class WordTokenizer:
    """One id per whitespace-separated word (its index in a growing vocabulary), plus a BOS id 0 by default."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def documents(n: int = 40, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randint(0, 50)}" for _ in range(rng.randint(3, 30))) for _ in range(n)]


@pytest.fixture
def hub(monkeypatch):
    """datasets.load_dataset answering the hub's names with small local data sets of the same fields."""
    calls = []
    tables = {"allenai/c4": {"train": documents(40, 1), "validation": documents(1500, 2)},
              "wikitext": {"train": documents(30, 3), "test": documents(20, 4)}}

    def load_dataset(path, name=None, *, data_files=None, split=None):
        calls.append((path, name, data_files, split))
        return datasets.Dataset.from_dict({"text": tables[path][split], "timestamp": ["x"] * len(tables[path][split])})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, tables


def test_c4_calibration_follows_the_wanda_rule(hub):
    calls, tables = hub
    tok = WordTokenizer()
    got = D.calibration_windows(tok, "c4", 6, 10, seed=3)
    assert calls == [("allenai/c4", None, {"train": "en/c4-train.00000-of-01024.json.gz"}, "train")]
    # the same random calls in a plain loop, as in Wanda's get_c4
    docs, expected = tables["allenai/c4"]["train"], []
    random.seed(3)
    for _ in range(6):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i])["input_ids"]
            if len(ids) > 10:
                break
        i = random.randint(0, len(ids) - 10 - 1)
        expected.append(ids[i : i + 10])
    assert got.tolist() == expected and got.dtype == torch.long


def test_c4_evaluation_is_1100_documents_cut_to_256_windows(hub):
    calls, tables = hub
    text, most = D.evaluation_text("c4")
    assert calls[-1] == ("allenai/c4", None, {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "validation")
    assert text == " ".join(tables["allenai/c4"]["validation"][:1100]) and most == 256


def test_wikitext2_windows(hub):
    calls, tables = hub
    tok = WordTokenizer()
    text, most = D.evaluation_text("wikitext2")
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", None, "test")
    assert text == "\n\n".join(tables["wikitext"]["test"]) and most is None
    got = D.calibration_windows(tok, "wikitext2", 5, 8, seed=7)
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", None, "train")
    ids = tok(" ".join(tables["wikitext"]["train"]))["input_ids"]
    random.seed(7)
    starts = [random.randint(0, len(ids) - 8 - 1) for _ in range(5)]
    assert got.tolist() == [ids[s : s + 8] for s in starts]


def test_the_sampling_leaves_the_global_random_state_alone():
    state = random.getstate()
    D.random_windows(list(range(100)), 4, 10, seed=0)
    assert random.getstate() == state


def test_no_network_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"^cannot load c4 \(allenai/c4\): Couldn't reach") as err:
        D.preload("c4", "calib")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow", "disk", "txt"])
def test_local_files(tmp_path, kind):
    rows = [{"body": f"paragraph {i} " * 20, "id": i} for i in range(10)]
    data = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        data.to_parquet(str(path))
    elif kind == "arrow":
        data.save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif kind == "disk":
        path = tmp_path / "saved"
        data.save_to_disk(str(path))
    else:
        path.write_text("\n\n".join(r["body"] for r in rows))
    text = D.local_text(str(path), "body")
    assert text.split() == "\n\n".join(r["body"] for r in rows).split()
    calib = D.calibration_windows(WordTokenizer(), str(path), 3, 5, seed=0, text_field="body")
    held_out, most = D.evaluation_text(str(path), "body")
    assert calib.shape == (3, 5) and held_out and most is None


def test_a_local_file_without_the_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "words"}) + "\n")
    with pytest.raises(UserError, match=r"has no field 'text' \(fields: body\); choose one with --text-field"):
        D.preload(str(path), "calib")


def test_unknown_source_and_missing_extra(monkeypatch):
    with pytest.raises(UserError, match="--calib 'c5' is neither builtin, c4, wikitext2 nor an existing"):
        D.check_source("c5", "--calib")
    D.check_source("builtin", "--eval")  # needs nothing
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match=r"needs the `data` extra: pip install 'layerif\[data\]'"):
        D.check_source("wikitext2", "--eval")
    D.check_source("builtin", "--calib")


def test_calibration_size_defaults(monkeypatch):
    assert D.calibration_size(None, None, "cpu", (16, 128)) == (16, 128, "cpu default")
    assert D.calibration_size(None, None, "cuda:0", (16, 128)) == (128, 2048, "cuda default")
    assert D.calibration_size(4, None, "cuda", (16, 128)) == (4, 2048, "n_calib given, seqlen cuda default")
    assert D.calibration_size(4, 32, "cuda", (16, 128)) == (4, 32, "given")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.calibration_size(None, None, "auto", (128, 512)) == (128, 512, "cpu default")


def test_the_cli_turns_bad_sources_into_one_line(capsys):
    from layerif.cli import main

    assert main(["prune", "--calib", "c5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerif prune: error: --calib 'c5' is neither") and "\n" not in err
