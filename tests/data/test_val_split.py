"""--val-split tail: the last fraction of the text validates, nanoGPT-style."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmlab.data.corpus import Corpus
from lmlab.data.prepare import prepare
from lmlab.data.shards import open_split
from lmlab.data.tokenizer import load_tokenizer
from lmlab.errors import UserError

TEXT = "".join(
    f"Line {i}: the quick brown fox.\n" + ("\n" if i % 7 == 6 else "") for i in range(200)
)


def decoded(data: Path, split: str) -> str:
    tok = load_tokenizer(data / "tokenizer.json")
    ids = [int(t) for shard in open_split(data, split).shards for t in shard]
    return tok.decode([i for i in ids if i != tok.eot_id])


@pytest.mark.parametrize("doc_unit", ["file", "paragraph"])
def test_tail_holds_out_the_last_fraction_of_the_text(tmp_path: Path, doc_unit: str):
    (tmp_path / "a.txt").write_text(TEXT[:3000])
    (tmp_path / "b.txt").write_text(TEXT[3000:])
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    cut = int(len(TEXT) * 0.9)
    corpus = Corpus(files, doc_unit=doc_unit, val_split="tail", val_fraction=0.1)
    docs = list(corpus.documents())
    assert "".join(d.text for d in docs if d.split == "train") == TEXT[:cut]
    assert "".join(d.text for d in docs if d.split == "val") == TEXT[cut:]
    out = tmp_path / "data"
    manifest = prepare(
        files,
        out,
        "char",
        doc_unit=doc_unit,
        val_split="tail",
        val_fraction=0.1,
        log=lambda *_: None,
    )
    assert manifest["source"]["val_split"] == "tail"
    assert decoded(out, "train") == TEXT[:cut] and decoded(out, "val") == TEXT[cut:]


def test_tail_takes_file_inputs_only(tmp_path: Path):
    with pytest.raises(UserError, match="tail cuts file inputs"):
        Corpus(["dsl:flowroll:20"], val_split="tail")
    with pytest.raises(UserError, match="unknown --val-split"):
        Corpus(["dsl:flowroll:20"], val_split="head")


def test_two_tokenizers_one_corpus_same_split(tmp_path: Path, capsys):
    from lmlab.cli import main as cli_main

    (tmp_path / "corpus.txt").write_text(TEXT)
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["prepare", "--input", str(tmp_path / "corpus.txt"), "--tokenizer", "bpe:300", "char"]
    with pytest.raises(SystemExit) as info:
        cli_main([*argv, "--out", str(a), str(b), "--val-fraction", "0.2"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "same documents, same split; bytes per token (train):" in out
    for split in ("train", "val"):
        assert decoded(a, split) == decoded(b, split)  # the same documents in each split
        assert decoded(a, split)
    bytes_per_token = [line.split()[1] for line in out.splitlines() if line.startswith("  ")][-2:]
    assert float(bytes_per_token[0]) > 1.5 and float(bytes_per_token[1]) == 1.0  # BPE, char
    with pytest.raises(SystemExit) as info:
        cli_main([*argv, "--out", str(tmp_path / "c")])
    assert info.value.code == 2 and not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as info:
        cli_main([*argv, "--out", str(tmp_path / "d"), str(a)])  # a exists: nothing done
    assert info.value.code == 2 and not (tmp_path / "d").exists()
