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
    cut = round(len(TEXT) * 0.9)
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
