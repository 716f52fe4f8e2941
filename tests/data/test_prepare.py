import json
from pathlib import Path

import numpy as np
import pytest

from lmlab.cli import main as cli_main
from lmlab.data.corpus import Corpus
from lmlab.data.prepare import prepare, split_of
from lmlab.data.shards import load_manifest, open_split, verify
from lmlab.data.tokenizer import load_tokenizer, train_char


def decode_documents(data_dir: Path, split: str) -> list[str]:
    manifest = load_manifest(data_dir)
    tok = load_tokenizer(data_dir / "tokenizer.json")
    tokens = np.concatenate([np.asarray(s) for s in open_split(data_dir, split).shards])
    assert tokens[-1] == manifest["tokenizer"]["eot_id"]
    docs, start = [], 0
    for end in np.flatnonzero(tokens == manifest["tokenizer"]["eot_id"]):
        docs.append(tok.decode(tokens[start:end].tolist()))
        start = end + 1
    return docs


@pytest.mark.parametrize("tokenizer", ["bpe:300", "char"])
def test_decoding_shards_reproduces_documents(tmp_path: Path, text_corpus: Path, tokenizer: str):
    out = tmp_path / "data"
    manifest = prepare(
        [str(text_corpus)], out, tokenizer, val_fraction=0.3, seed=1, log=lambda *_: None
    )
    corpus = Corpus([str(text_corpus)], seed=1)
    expected = {"train": [], "val": []}
    for doc in corpus.documents():
        expected[split_of(doc.text, 1, 0.3)].append(doc.text)
    assert expected["val"], "the fixture should put something into val"
    for split in ("train", "val"):
        assert decode_documents(out, split) == expected[split]
        assert manifest["splits"][split]["documents"] == len(expected[split])
    assert manifest["dtype"] == "uint16"
    assert verify(out) == []


def test_split_is_deterministic_and_seeded(tmp_path: Path, text_corpus: Path):
    a = prepare(
        [str(text_corpus)], tmp_path / "a", "bpe:300", seed=3, val_fraction=0.3, log=lambda *_: None
    )
    b = prepare(
        [str(text_corpus)], tmp_path / "b", "bpe:300", seed=3, val_fraction=0.3, log=lambda *_: None
    )
    assert [s["sha256"] for s in a["splits"]["val"]["shards"]] == [
        s["sha256"] for s in b["splits"]["val"]["shards"]
    ]
    texts = [f"document number {i}" for i in range(2000)]
    val = [t for t in texts if split_of(t, 0, 0.1) == "val"]
    assert 150 < len(val) < 250
    assert val != [t for t in texts if split_of(t, 1, 0.1) == "val"]


def test_uint32_for_large_vocabularies(tmp_path: Path):
    chars = "".join(chr(c) for c in range(0x10000, 0x10000 + 66000))
    text = chars + "\n\n" + chars[::-1] + "\n\n" + "".join(f"abc {i}\n\n" for i in range(50))
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    tok = train_char([text])
    assert tok.vocab_size > 65536
    out = tmp_path / "data"
    manifest = prepare([str(tmp_path / "in.txt")], out, tok, val_fraction=0.2, log=lambda *_: None)
    assert manifest["dtype"] == "uint32"
    assert decode_documents(out, "train")[0] in (chars + "\n\n", chars[::-1] + "\n\n")


def test_verify_detects_a_flipped_byte(tmp_path: Path, text_corpus: Path):
    out = tmp_path / "data"
    manifest = prepare([str(text_corpus)], out, "bpe:300", val_fraction=0.3, log=lambda *_: None)
    shard = out / manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01
    shard.write_bytes(bytes(raw))
    problems = verify(out)
    assert len(problems) == 1 and "checksum mismatch" in problems[0]
    assert cli_exit(["data", "verify", str(out)]) == 1


def test_large_documents_are_encoded_in_pieces_losslessly(tmp_path: Path):
    text = "".join(f"line {i} ünï\n" for i in range(20000))  # > 64K characters, one document
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    prepare(
        [str(tmp_path / "big.txt")],
        out,
        "bpe:300",
        val_fraction=0.0,
        doc_unit="file",
        log=lambda *_: None,
    )
    assert decode_documents(out, "train") == [text]


def test_hf_dataset_from_local_files(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"row {i}: ünïcode and more text", "id": i} for i in range(200)]
    src = tmp_path / "ds"
    src.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(src / "train.parquet"))
    out = tmp_path / "data"
    manifest = prepare([f"hf:{src}"], out, "bpe:300", log=lambda *_: None)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 200
    assert sorted(decode_documents(out, "train") + decode_documents(out, "val")) == sorted(
        r["text"] for r in rows
    )
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    manifest = prepare([f"hf:{saved}"], tmp_path / "data2", "bpe:300", log=lambda *_: None)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 200
    assert (
        cli_exit(
            [
                "prepare",
                "--input",
                f"hf:{src}",
                "--text-field",
                "body",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


def test_hf_hub_name_offline_fails_clearly(tmp_path: Path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert (
        cli_exit(
            ["prepare", "--input", "hf:no-such-org/no-such-dataset", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "could not load dataset" in capsys.readouterr().err


def cli_exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return info.value.code


def assert_clean_failure(capsys, tmp_path: Path, argv: list[str], match: str) -> None:
    before = set(tmp_path.iterdir())
    assert cli_exit(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    errors = [line for line in err.splitlines() if line.startswith("lmlab prepare: error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert set(tmp_path.iterdir()) == before, "no partial output may be left behind"


def test_bad_inputs_give_one_line_errors(tmp_path: Path, text_corpus: Path, capsys):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.txt").write_bytes(b"\x00\xff\x00binary")
    (binary / "b.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    cases = [
        (["--input", str(tmp_path / "missing.txt")], "no such file"),
        (["--input", str(empty)], "no text found"),
        (["--input", str(binary)], "skipped 2 files"),
        (["--input", str(text_corpus), "--tokenizer", "bpe:10"], "too small"),
        (["--input", str(text_corpus), "--tokenizer", "bpe:10000000"], "too large"),
        (["--input", "corpus:nothing"], "unknown corpus"),
        (["--input", "dsl:cobolish"], "cobolish"),
        (["--input", str(text_corpus), "--val-fraction", "1.5"], "val-fraction"),
    ]
    for args, match in cases:
        assert_clean_failure(capsys, tmp_path, ["prepare", *args, "--out", out], match)
    Path(out).mkdir()
    (Path(out) / "keep.txt").write_text("mine")
    assert_clean_failure(
        capsys, tmp_path, ["prepare", "--input", str(text_corpus), "--out", out], "already exists"
    )
    assert (Path(out) / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_only_when_complete(tmp_path: Path, text_corpus: Path, capsys):
    out = tmp_path / "out"
    assert (
        cli_exit(
            ["prepare", "--input", str(text_corpus), "--tokenizer", "bpe:300", "--out", str(out)]
        )
        == 0
    )
    first = json.loads((out / "manifest.json").read_text())
    # A failing overwrite leaves the old data in place.
    assert (
        cli_exit(["prepare", "--input", str(tmp_path / "nope"), "--out", str(out), "--overwrite"])
        == 2
    )
    assert json.loads((out / "manifest.json").read_text()) == first
    assert (
        cli_exit(
            [
                "prepare",
                "--input",
                str(text_corpus),
                "--tokenizer",
                "char",
                "--out",
                str(out),
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["kind"] == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]
    capsys.readouterr()
