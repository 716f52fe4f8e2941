from pathlib import Path

import pytest

from lmlab.data.tokenizer import (
    EOT,
    PAD,
    UNK,
    load_tokenizer,
    parse_train_spec,
    train_bpe,
    train_char,
)
from lmlab.errors import UserError

MIXED_TEXT = [
    "The quick brown fox jumps over the lazy dog.\n\nA second paragraph, with numbers 1234.\n",
    "Ünïcödé: naïve café, smörgåsbord, Ελληνικά, русский, 日本語のテキスト, emoji 🦊🚀.\n\n  indented\tline\n",
    "Code: def f(x):\n    return x ** 2  # comment\n\n\n\nTrailing blank lines\n\n",
]
TRAIN_TEXT = MIXED_TEXT * 3
UNSEEN = "Völlig neuer Text — with unseen symbols ∮∯∰ and 中文 and \x00\x7f and \u200b!"


def test_bpe_is_lossless_on_any_utf8():
    tok = train_bpe(TRAIN_TEXT, vocab_size=300)
    for text in MIXED_TEXT + [UNSEEN, "", " ", "\n\n\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id == 0 and tok.pad_id == 1
    assert tok.tokenizer.id_to_token(0) == EOT and tok.tokenizer.id_to_token(1) == PAD
    assert tok.vocab_size <= 300


def test_bpe_special_tokens_are_not_produced_by_text():
    tok = train_bpe(TRAIN_TEXT, vocab_size=300)
    assert tok.eot_id not in tok.encode("<|endoftext|> is plain text here")


def test_char_tokenizer_roundtrip_and_unknown():
    tok = train_char(["hello world", "héllo"])
    assert tok.decode(tok.encode("hello héllo")) == "hello héllo"
    assert len(tok.encode("hello")) == 5
    unk = tok.tokenizer.token_to_id(UNK)
    assert tok.encode("z") == [unk]
    # vocab: 3 specials + the distinct characters
    assert tok.vocab_size == 3 + len(set("hello worldhéllo"))


def test_char_vocab_cap_keeps_most_frequent():
    tok = train_char(["aaaa bbb cc d"], vocab_size=5)  # 3 specials + 'a' and ' '
    vocab = tok.tokenizer.get_vocab()
    assert "a" in vocab and " " in vocab and "d" not in vocab


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_transformers_loads_saved_tokenizer_with_identical_ids(tmp_path: Path, kind: str):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe(TRAIN_TEXT, 320) if kind == "bpe" else train_char(TRAIN_TEXT)
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in MIXED_TEXT:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert auto.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids)
    assert auto.eos_token_id == tok.eot_id


def test_load_from_file_and_directory(tmp_path: Path):
    tok = train_bpe(TRAIN_TEXT, 300)
    tok.save(tmp_path / "t")
    for spec in (tmp_path / "t", tmp_path / "t" / "tokenizer.json"):
        loaded = load_tokenizer(spec)
        assert loaded.sha256() == tok.sha256()
        assert loaded.eot_id == tok.eot_id and loaded.kind == "bpe"


def test_load_errors(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_hub_name_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="Hugging Face Hub"):
        load_tokenizer("some-org/some-tokenizer-that-is-not-cached")


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("bpe:512", ("bpe", 512)),
        ("char:100", ("char", 100)),
        ("bpe:4_096", ("bpe", 4096)),
        ("gpt2", None),
        ("./t", None),
    ],
)
def test_parse_train_spec(spec, expected):
    assert parse_train_spec(spec) == expected or (
        expected is None and parse_train_spec(spec) is None
    )


@pytest.mark.parametrize(
    "spec,match",
    [
        ("bpe:100", "too small"),
        ("bpe:99999999", "too large"),
        ("bpe:x", "bad vocabulary"),
        ("bpe", "needs a vocabulary"),
        ("char:2", "too small"),
    ],
)
def test_bad_vocab_specs(spec, match):
    with pytest.raises(UserError, match=match):
        parse_train_spec(spec)
