"""hf: inputs beyond a Hub name: single data files, dataset files and saved folders given
without hf:, a dataset's own validation split, and offline lookups that fail at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmlab.data.corpus import Corpus, hub_offline
from lmlab.data.prepare import prepare
from lmlab.errors import UserError

datasets = pytest.importorskip("datasets")

ROWS = [{"text": f"document {i}: some text, ünïcode {i * i}", "id": i} for i in range(60)]
VAL_ROWS = [{"text": f"held out {i}", "id": i} for i in range(12)]


def texts(corpus: Corpus, split: str | None = "any") -> list[str]:
    return [d.text for d in corpus.documents() if split == "any" or d.split == split]


def quiet(*args, **kwargs) -> None:
    pass


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv", ".json", ".arrow"])
def test_single_data_files_read_with_hf(tmp_path: Path, suffix: str):
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        ds.to_parquet(str(path))
    elif suffix == ".csv":
        ds.to_csv(str(path), index=False)
    elif suffix == ".arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        [arrow] = (tmp_path / "saved").glob("*.arrow")
        arrow.rename(path)
    else:
        ds.to_json(str(path), lines=suffix == ".jsonl")
    assert texts(Corpus([f"hf:{path}"])) == [r["text"] for r in ROWS]


def test_dataset_files_and_saved_folders_need_no_hf_prefix(tmp_path: Path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "data.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for spec in ("data.parquet", "saved", "saved_dict"):
        assert texts(Corpus([str(tmp_path / spec)])) == [r["text"] for r in ROWS], spec
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    with pytest.raises(UserError, match="pass hf:"):
        Corpus([str(tmp_path / "pq")])


def test_a_datasets_own_validation_split_is_the_val_split(tmp_path: Path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "validation": datasets.Dataset.from_list(VAL_ROWS),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    dd["train"].to_parquet(str(tmp_path / "files" / "train.parquet"))
    dd["validation"].to_parquet(str(tmp_path / "files" / "validation.parquet"))
    for spec in (tmp_path / "saved", tmp_path / "files"):
        corpus = Corpus([f"hf:{spec}"])
        assert texts(corpus, "train") == [r["text"] for r in ROWS]
        assert texts(corpus, "val") == [r["text"] for r in VAL_ROWS]
    manifest = prepare([f"hf:{tmp_path / 'saved'}"], tmp_path / "data", "bpe:300", log=quiet)
    assert manifest["splits"]["train"]["documents"] == len(ROWS)
    assert manifest["splits"]["val"]["documents"] == len(VAL_ROWS)
    # Without a validation split the train split is held out by hash, as before.
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "one.parquet"))
    manifest = prepare([f"hf:{tmp_path / 'one.parquet'}"], tmp_path / "data2", "bpe:300", log=quiet)
    assert 0 < manifest["splits"]["val"]["documents"] < len(ROWS)


def test_bad_data_files_are_one_line_errors(tmp_path: Path):
    (tmp_path / "notes.xml").write_text("<a/>")
    with pytest.raises(UserError, match="a single data file must be one of"):
        texts(Corpus([f"hf:{tmp_path / 'notes.xml'}"]))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(UserError, match="only a train split"):
        texts(Corpus([f"hf:{tmp_path / 'd.parquet'}"], hf_split="validation"))


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_route(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr("socket.create_connection", no_route)
    assert hub_offline()
    before = datasets.config.HF_HUB_OFFLINE
    seen = []
    load = datasets.load_dataset

    def recording_load(*args, **kwargs):
        seen.append(datasets.config.HF_HUB_OFFLINE)  # what `datasets` is told during the lookup
        return load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording_load)
    start = time.perf_counter()
    with pytest.raises(UserError, match="could not load dataset 'no-such-org/no-such-data'"):
        texts(Corpus(["hf:no-such-org/no-such-data"]))
    assert time.perf_counter() - start < 5
    assert seen == [True]
    after = datasets.config.HF_HUB_OFFLINE
    assert after == before  # offline only for that lookup


def test_val_input_is_the_whole_val_split(tmp_path: Path, capsys):
    from lmlab.cli import main as cli_main

    train_text = "\n\n".join(f"training paragraph {i} with words" for i in range(40))
    val_text = "\n\n".join(f"validation paragraph {i}" for i in range(7))
    (tmp_path / "train.txt").write_text(train_text)
    (tmp_path / "val.txt").write_text(val_text)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "validation": datasets.Dataset.from_list(VAL_ROWS),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    corpus = Corpus(
        [str(tmp_path / "train.txt"), "dsl:flowroll:50"],
        val_inputs=[str(tmp_path / "val.txt"), f"hf:{tmp_path / 'saved'}"],
    )
    docs = list(corpus.documents())
    val = [d.text for d in docs if d.split == "val"]
    # Every paragraph of val.txt and the dataset's validation split (the one asked for by
    # hf_val_split; its train split is not read); nothing of the training inputs.
    paragraphs = [f"validation paragraph {i}" + ("\n\n" if i < 6 else "") for i in range(7)]
    assert val == [r["text"] for r in VAL_ROWS] + paragraphs  # datasets first, then files
    train = [d.text for d in docs if d.split == "train"]
    assert len(train) == 40 + 50  # the practice language's own val programs are left out
    assert {d.split for d in docs} == {"train", "val"}

    out = tmp_path / "data"
    argv = [
        "prepare",
        "--input",
        str(tmp_path / "train.txt"),
        "--val-input",
        str(tmp_path / "val.txt"),
    ]
    with pytest.raises(SystemExit) as info:
        cli_main([*argv, "--tokenizer", "char", "--out", str(out)])
    assert info.value.code == 0
    manifest = json_load(out / "manifest.json")
    assert (
        manifest["splits"]["val"]["documents"] == 7
        and manifest["splits"]["train"]["documents"] == 40
    )
    assert manifest["source"]["val_inputs"] == [str(tmp_path / "val.txt")]
    (tmp_path / "empty.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(UserError, match="holds no documents"):
        prepare(
            [str(tmp_path / "train.txt")],
            tmp_path / "data2",
            "char",
            val_inputs=[str(tmp_path / "empty.jsonl")],
            log=quiet,
        )
    assert not (tmp_path / "data2").exists()


def json_load(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
