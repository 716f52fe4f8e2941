from pathlib import Path

import pytest

from lmlab.data.corpus import Corpus, split_paragraphs
from lmlab.errors import UserError


@pytest.mark.parametrize(
    "text",
    ["a\n\nb", "a\n\n\n\nb\n", "\n\nlead", "one line", "", "x\n \t\ny\n\n", "a\n\nb\n\n"],
)
def test_paragraphs_keep_every_character(text):
    assert "".join(split_paragraphs(text)) == text


def test_doc_units(text_corpus: Path):
    by_file = list(Corpus([str(text_corpus)], doc_unit="file").documents())
    assert len(by_file) == 5
    by_para = list(Corpus([str(text_corpus)], doc_unit="paragraph").documents())
    assert len(by_para) > len(by_file)
    assert "".join(d.text for d in by_para) == "".join(d.text for d in by_file)
    assert Corpus([str(text_corpus)]).doc_unit == "paragraph"  # auto, few files


def test_glob_and_jsonl(tmp_path: Path):
    (tmp_path / "a.jsonl").write_text(
        '{"text": "one"}\n{"body": "x"}\n\n{"text": "two"}\nnot json\n'
    )
    corpus = Corpus([str(tmp_path / "*.jsonl")])
    assert [d.text for d in corpus.documents()] == ["one", "two"]
    assert corpus.skipped.bad_records == 2
    corpus = Corpus([str(tmp_path / "a.jsonl")], text_field="body")
    assert [d.text for d in corpus.documents()] == ["x"]


def test_binary_and_non_utf8_are_skipped(tmp_path: Path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    corpus = Corpus([str(tmp_path)])
    assert [d.text for d in corpus.documents()] == ["fine text"]
    assert corpus.skipped.count() == 2
    assert "1 binary" in corpus.skipped.summary() and "1 not UTF-8" in corpus.skipped.summary()


@pytest.mark.parametrize(
    "spec,match",
    [
        ("does/not/exist.txt", "no such file"),
        ("nothing*.txt", "matches no files"),
        ("ftp:whatever", "unknown corpus"),
        ("hf:", "needs a dataset"),
        ("sample:hamlet", "shipped samples are sample:shakespeare"),
    ],
)
def test_bad_inputs(tmp_path: Path, monkeypatch, spec, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=match):
        Corpus([spec])


def test_shipped_sample_is_a_text_input(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name around: it comes from the package
    docs = list(Corpus(["sample:shakespeare"], doc_unit="file").documents())
    assert len(docs) == 1 and docs[0].text.startswith("First Citizen:")
    assert len(docs[0].text) == 1_115_394  # tinyshakespeare, whole
    tail = list(Corpus(["sample:shakespeare"], doc_unit="file", val_split="tail").documents())
    assert [d.split for d in tail] == ["train", "val"]


def test_folder_without_text_files(tmp_path: Path):
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="no .txt"):
        Corpus([str(tmp_path)])
