"""Token caps and weighted mixtures in `lmlab prepare` (issue 13, item 1)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmlab.cli import main as cli_main
from lmlab.data.mixture import parse_count, parse_inputs
from lmlab.data.prepare import prepare
from lmlab.errors import UserError

QUIET = {"log": lambda *a: None}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Two JSONL inputs with very different characters per token, and a parquet file."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    short = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "up"]
    long = ["extraordinarily", "incomprehensible", "notwithstanding", "photosynthesis", "a"]
    with open(root / "short.jsonl", "w") as f:
        for _ in range(3000):
            words = " ".join(rng.choice(short) for _ in range(rng.randint(10, 120)))
            f.write(json.dumps({"text": words}) + "\n")
    with open(root / "long.jsonl", "w") as f:
        for _ in range(1500):
            words = " ".join(rng.choice(long) for _ in range(rng.randint(5, 60)))
            f.write(json.dumps({"text": words}) + "\n")
    import datasets

    rows = [
        {"text": f"record {i}: " + " ".join(rng.choice(short) for _ in range(40))}
        for i in range(2000)
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(root / "records.parquet"))
    return {
        "short": root / "short.jsonl",
        "long": root / "long.jsonl",
        "parquet": root / "records.parquet",
    }


def total_tokens(manifest: dict) -> int:
    return sum(s["tokens"] for s in manifest["splits"].values())


def test_parse_inputs_and_counts():
    assert parse_inputs(["a.jsonl", "b/"]) == (["a.jsonl", "b/"], None)
    specs, weights = parse_inputs(["a.jsonl@0.7", "hf:org/name@0.3"])
    assert specs == ["a.jsonl", "hf:org/name"] and weights == pytest.approx([0.7, 0.3])
    assert parse_inputs(["a@2", "b@6"])[1] == pytest.approx([0.25, 0.75])
    with pytest.raises(UserError, match="every --input a weight"):
        parse_inputs(["a@0.5", "b"])
    with pytest.raises(UserError, match="must be positive"):
        parse_inputs(["a@0", "b@1"])
    assert [parse_count(x) for x in ("1000", "1e6", "50M", "2.5k", "2B")] == [
        1000,
        1_000_000,
        50_000_000,
        2500,
        2_000_000_000,
    ]
    for bad in ("-5", "0", "nan", "lots", "1e400"):
        with pytest.raises(UserError):
            parse_count(bad)


@pytest.mark.parametrize("tokenizer", ["bpe:300", "char"])
def test_a_weighted_mixture_is_honoured_within_1_percent(inputs, tmp_path, tokenizer):
    manifest = prepare(
        [f"{inputs['short']}@0.7", f"{inputs['long']}@0.2", f"hf:{inputs['parquet']}@0.1"],
        tmp_path / "out",
        tokenizer,
        max_tokens=120_000,
        **QUIET,
    )
    mixture = manifest["source"]["mixture"]
    shares = [row["share"] for row in mixture]
    assert shares == pytest.approx([0.7, 0.2, 0.1], abs=0.01), mixture
    assert sum(row["tokens"] for row in mixture) == total_tokens(manifest)
    assert abs(total_tokens(manifest) - 120_000) < 0.01 * 120_000


def test_the_same_mixture_twice_gives_the_same_shards(inputs, tmp_path):
    args = [f"{inputs['short']}@0.5", f"{inputs['long']}@0.5"]
    a = prepare(args, tmp_path / "a", "char", max_tokens=50_000, **QUIET)
    b = prepare(args, tmp_path / "b", "char", max_tokens=50_000, **QUIET)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == [
        s["sha256"] for s in b["splits"]["train"]["shards"]
    ]


def test_a_total_cap_takes_the_inputs_in_order(inputs, tmp_path):
    manifest = prepare(
        [str(inputs["short"]), str(inputs["long"])],
        tmp_path / "o",
        "char",
        max_tokens=40_000,
        **QUIET,
    )
    short, long = manifest["source"]["mixture"]
    assert long["tokens"] == 0 and abs(short["tokens"] - 40_000) <= 400  # half a document
    assert total_tokens(manifest) == short["tokens"]


def test_a_per_input_cap(inputs, tmp_path):
    manifest = prepare(
        [str(inputs["short"]), str(inputs["long"])],
        tmp_path / "o",
        "char",
        max_input_tokens=20_000,
        **QUIET,
    )
    for row in manifest["source"]["mixture"]:
        assert abs(row["tokens"] - 20_000) <= 600, row


def test_an_uncapped_mixture_ends_with_its_first_input(inputs, tmp_path):
    manifest = prepare(
        [f"{inputs['long']}@0.5", f"{inputs['short']}@0.5"], tmp_path / "o", "char", **QUIET
    )
    long, short = manifest["source"]["mixture"]
    assert long["share"] == pytest.approx(0.5, abs=0.02), manifest["source"]["mixture"]
    assert short["tokens"] < 0.95 * sum(
        len(json.loads(line)["text"]) + 1 for line in inputs["short"].read_text().splitlines()
    )  # the short input was not read to its end


def test_the_command_line_shows_the_mixture(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "prepare",
                "--input",
                f"{inputs['short']}@3",
                f"{inputs['long']}@1",
                "--max-tokens",
                "40k",
                "--tokenizer",
                "char",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    out = capsys.readouterr().out
    assert info.value.code == 0 and "weight 75.0%" in out and "weight 25.0%" in out
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "prepare",
                "--input",
                str(inputs["short"]),
                "--max-tokens",
                "-3",
                "--out",
                str(tmp_path / "x"),
            ]
        )
    assert info.value.code == 2 and not (tmp_path / "x").exists()
