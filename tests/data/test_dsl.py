"""The practice languages: interpreters, parsers, generators, splits, scoring and CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter

import pytest

import lmlab.cli
from lmlab.commands.dsl import main as dsl_main
from lmlab.data.dsl import (
    DIMMATCH,
    FLOWROLL,
    LANGUAGES,
    DSLSyntaxError,
    DSLTypeError,
    Language,
    evaluate,
    format_line,
    format_prompt,
    generate_corpus,
    get_language,
    parse_difficulty,
    split_line,
    split_of,
)
from lmlab.errors import UserError

# ---------------------------------------------------------------------------------------
# FLOWROLL


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("[3 1 4] | rot 1 | map *2 | sort", "[2 6 8]"),
        ("[5 2 7 2] | filter odd | sum", "12"),
        ("[1 2 3] | rot 1", "[2 3 1]"),  # rotates left
        ("[1 2 3] | rot 4", "[2 3 1]"),  # modulo the length
        ("[] | rot 2", "[]"),
        ("[4 -1 0] | map -3", "[1 -4 -3]"),
        ("[4 -1 0] | map +3", "[7 2 3]"),
        ("[1 2 3 4 5] | filter >2 | rev", "[5 4 3]"),
        ("[-3 0 2] | filter <-1", "[-3]"),
        ("[6 7 8 -2] | filter even", "[6 8 -2]"),
        ("[9 8 7] | take 2 | drop 1", "[8]"),
        ("[1 2] | take 5", "[1 2]"),
        ("[1 2] | drop 5 | sum", "0"),
        ("[3 1 2] | sort | rev", "[3 2 1]"),
        ("[-2 -3] | sum", "-5"),
        ("  [3   1]|map * 2 ", "[6 2]"),  # any whitespace between tokens
    ],
)
def test_flowroll_runs(program: str, expected: str) -> None:
    assert FLOWROLL.run(program) == expected


def test_flowroll_operation_after_sum_is_a_type_error() -> None:
    tree = FLOWROLL.parse("[1 2] | sum | sort")  # it parses ...
    with pytest.raises(DSLTypeError, match="'sort' needs a list.*'sum' may only be the last"):
        FLOWROLL.check(tree)  # ... but does not type-check
    with pytest.raises(DSLTypeError):
        FLOWROLL.run("[1 2] | map +1 | sum | map +1")


@pytest.mark.parametrize(
    "program",
    [
        "",
        "[1 2",
        "[1 2]",  # no operation
        "[1 2] |",
        "[1 2] | foo",
        "[1 2] | rot",
        "[1 2] | rot -1",
        "[1 2] | map /2",
        "[1 2] | map +-2",
        "[1 2] | filter =3",
        "[1 2] | filter big",
        "[3-1] | sort",
        "[1 a] | sort",
        "[1 2] sort",
        "[1 2] | sort extra",
        "[1 2] | sort | | rev",
    ],
)
def test_flowroll_rejects_malformed_programs(program: str) -> None:
    with pytest.raises(DSLSyntaxError):
        FLOWROLL.parse(program)


def test_flowroll_syntax_error_has_position_and_message() -> None:
    with pytest.raises(DSLSyntaxError) as info:
        FLOWROLL.parse("[1 2] | foo")
    assert info.value.position == 8
    assert "expected an operation" in info.value.message
    assert "column 9" in str(info.value)
    assert "\n" not in str(info.value)


def test_flowroll_canonical_form() -> None:
    assert FLOWROLL.canonical(" [3  -1]|map * 2 |filter > -1|take 1 ") == (
        "[3 -1] | map *2 | filter >-1 | take 1"
    )
    assert FLOWROLL.difficulty_of("[3 1 4] | rot 1 | map *2 | sort") == 3


# ---------------------------------------------------------------------------------------
# DIMMATCH


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("matmul(2x3, transpose(4x3, 1 0))", "2x4"),
        ("matmul(2x3, 4x5)", "error: matmul(2x3, 4x5)"),
        ("matmul(5x2x3, 3x4)", "5x2x4"),  # a missing batch dim broadcasts
        ("matmul(5x1x2x3, 4x3x6)", "5x4x2x6"),
        ("matmul(2x2x3, 4x3x6)", "error: matmul(2x2x3, 4x3x6)"),  # batch dims 2 vs 4
        ("matmul(3, 3x4)", "error: matmul(3, 3x4)"),  # rank 1 is not a matrix
        ("broadcast(2x1x5, 3x5)", "2x3x5"),
        ("broadcast(8x1x6x1, 7x1x5)", "8x7x6x5"),  # the numpy documentation's example
        ("broadcast(2x3, 3x2)", "error: broadcast(2x3, 3x2)"),
        ("broadcast(4, 1)", "4"),
        ("cat(2x3, 2x5, 1)", "2x8"),
        ("cat(2x3, 4x3, 0)", "6x3"),
        ("cat(2x3, 4x5, 1)", "error: cat(2x3, 4x5, 1)"),
        ("cat(2x3, 2x3, 2)", "error: cat(2x3, 2x3, 2)"),  # axis out of range
        ("cat(2x3, 2x3x1, 0)", "error: cat(2x3, 2x3x1, 0)"),  # ranks differ
        ("reshape(2x3x4, 6x4)", "6x4"),
        ("reshape(2x3, 7)", "error: reshape(2x3, 7)"),
        ("transpose(2x3x4, 2 0 1)", "4x2x3"),
        ("transpose(2x3, 0 0)", "error: transpose(2x3, 0 0)"),
        ("transpose(2x3, 0 1 2)", "error: transpose(2x3, 0 1 2)"),
        ("cat(broadcast(2x1x5, 3x5), 2x3x5, 0)", "4x3x5"),
        # Errors name the failing call with its arguments evaluated to shapes ...
        ("matmul(transpose(2x3, 1 0), 4x5)", "error: matmul(3x2, 4x5)"),
        ("transpose(broadcast(2x3, 4x3), 1 0)", "error: broadcast(2x3, 4x3)"),
        # ... and the first one in evaluation order wins.
        ("broadcast(reshape(2x3, 5), matmul(2x3, 4x5))", "error: reshape(2x3, 5)"),
        ("7x2", "7x2"),
    ],
)
def test_dimmatch_runs(program: str, expected: str) -> None:
    assert DIMMATCH.run(program) == expected


@pytest.mark.parametrize(
    "program",
    [
        "",
        "2x",
        "x3",
        "2x0",
        "2x3 3x4",
        "2 x 3",
        "matmul(2x3)",
        "matmul(2x3, 3x4",
        "matmul(2x3, 3x4))",
        "matmul(2x3,, 3x4)",
        "MATMUL(2x3, 3x4)",
        "foo(2x3, 3x4)",
        "cat(2x3, 2x3)",
        "cat(2x3, 2x3, -1)",
        "transpose(2x3)",
        "transpose(2x3, )",
        "reshape(2x3, matmul(1x6, 6x1))",
        "transpose(" * 100 + "2" + ", 0)" * 100,  # nested too deep
    ],
)
def test_dimmatch_rejects_malformed_programs(program: str) -> None:
    with pytest.raises(DSLSyntaxError):
        DIMMATCH.parse(program)


def test_dimmatch_syntax_error_position() -> None:
    with pytest.raises(DSLSyntaxError) as info:
        DIMMATCH.parse("matmul(2x3, 3x4")
    assert info.value.position == 15
    assert "expected ')'" in info.value.message and "end of program" in info.value.message


def test_dimmatch_canonical_form_and_difficulty() -> None:
    assert DIMMATCH.canonical(" matmul( 2x3 ,transpose(4x3,1   0) ) ") == (
        "matmul(2x3, transpose(4x3, 1 0))"
    )
    assert DIMMATCH.difficulty_of("matmul(2x3, transpose(4x3, 1 0))") == 2
    assert DIMMATCH.difficulty_of("2x3") == 0


def test_dimmatch_generator_mixes_valid_and_error_results() -> None:
    rng = random.Random(0)
    results = [DIMMATCH.run(DIMMATCH.generate_program(rng, 3)) for _ in range(500)]
    error_fraction = sum(r.startswith("error: ") for r in results) / len(results)
    assert 0.1 < error_fraction < 0.5


# ---------------------------------------------------------------------------------------
# Both languages: registry, generators, round trips


def test_registry() -> None:
    assert LANGUAGES == ("flowroll", "dimmatch")
    assert [get_language(name).name for name in LANGUAGES] == list(LANGUAGES)
    assert get_language("flowroll") is FLOWROLL
    with pytest.raises(UserError, match="valid names: flowroll, dimmatch"):
        get_language("brainfudge")


@pytest.mark.parametrize("lang", [FLOWROLL, DIMMATCH], ids=lambda lang: lang.name)
def test_generated_programs_round_trip(lang: Language) -> None:
    rng = random.Random(1)
    for difficulty in lang.difficulties:
        for _ in range(100):
            tree = lang.generate(rng, difficulty)
            program = lang.format(tree)
            assert lang.parse(program) == tree
            assert lang.canonical(program) == program
            assert lang.difficulty_of(program) == difficulty
            assert lang.run(program) == lang.evaluate(tree)


@pytest.mark.parametrize("lang", [FLOWROLL, DIMMATCH], ids=lambda lang: lang.name)
def test_generator_is_deterministic_by_seed(lang: Language) -> None:
    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [lang.generate_program(rng, 1 + i % 5) for i in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    with pytest.raises(UserError, match="difficulty"):
        lang.generate_program(random.Random(0), 6)


def test_line_helpers() -> None:
    assert format_line("[1] | sum", "1") == "[1] | sum => 1"
    assert format_prompt("[1] | sum") == "[1] | sum =>"
    assert split_line("[1] | sum => 1") == ("[1] | sum", "1")
    assert split_line("[1] | sum =>") == ("[1] | sum", "")  # an empty completion
    with pytest.raises(DSLSyntaxError):
        split_line("[1] | sum")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(3, (3, 3)), ((1, 3), (1, 3)), ("1-3", (1, 3)), (" 2 ", (2, 2)), ("2 - 5", (2, 5))],
)
def test_parse_difficulty(spec: object, expected: tuple[int, int]) -> None:
    assert parse_difficulty(spec) == expected  # type: ignore[arg-type]
    assert parse_difficulty(spec, range(1, 6)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", [0, 6, "3-1", "1-6", "a", "", (1,), (1, 2, 3), True])
def test_parse_difficulty_rejects(spec: object) -> None:
    with pytest.raises(UserError, match="difficulty"):
        parse_difficulty(spec)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Splits and corpora


def test_splits_are_stable() -> None:
    # Fixed forever: if these move, every held-out set moves with them.
    assert split_of("[7 4 2 5 4] | take 2 | filter even") == "train"
    assert split_of("[5 4] | sort | rev") == "val"
    assert split_of("[1 1 6 0 5] | drop 2 | sum") == "test"
    assert split_of("reshape(transpose(14x10, 1 0), 4x5x7)") == "train"
    assert split_of("transpose(broadcast(7x5, 1x5), 1 0)") == "val"
    assert split_of("cat(cat(1, 1, 0), 5, 0)") == "test"


def test_split_fractions() -> None:
    rng = random.Random(0)
    programs = {FLOWROLL.generate_program(rng, 1 + i % 5) for i in range(20_000)}
    counts = Counter(split_of(p) for p in programs)
    fractions = {split: counts[split] / len(programs) for split in ("train", "val", "test")}
    assert fractions["train"] == pytest.approx(0.90, abs=0.01)
    assert fractions["val"] == pytest.approx(0.05, abs=0.01)
    assert fractions["test"] == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("lang", [FLOWROLL, DIMMATCH], ids=lambda lang: lang.name)
def test_corpus_splits_are_disjoint_and_distinct(lang: Language) -> None:
    programs = {}
    for split in ("train", "val", "test"):
        lines = generate_corpus(lang, 300, seed=0, difficulty=(1, 5), split=split)
        assert len(lines) == 300
        pairs = [split_line(line) for line in lines]
        assert all(split_of(program) == split for program, _ in pairs)
        assert all(lang.run(program) == result for program, result in pairs)
        programs[split] = {program for program, _ in pairs}
        assert len(programs[split]) == 300
    assert not programs["train"] & programs["val"]
    assert not programs["train"] & programs["test"]
    assert not programs["val"] & programs["test"]


def test_corpus_is_deterministic_and_mixes_difficulties() -> None:
    lines = generate_corpus("flowroll", 900, seed=5, difficulty=(1, 3))
    assert lines == generate_corpus("flowroll", 900, seed=5, difficulty="1-3")
    assert lines != generate_corpus("flowroll", 900, seed=6, difficulty=(1, 3))
    levels = Counter(FLOWROLL.difficulty_of(split_line(line)[0]) for line in lines)
    assert set(levels) == {1, 2, 3}
    assert all(240 <= count <= 360 for count in levels.values())


class _Digit(Language[int]):
    """A language with only ten programs, to exhaust."""

    name = "digit"
    difficulties = range(1, 2)

    def parse(self, program: str) -> int:
        return int(program)

    def format(self, tree: int) -> str:
        return str(tree)

    def evaluate(self, tree: int) -> str:
        return str(tree * 2)

    def generate(self, rng: random.Random, difficulty: int) -> int:
        return rng.randint(0, 9)

    def difficulty(self, tree: int) -> int:
        return 1


def test_corpus_gives_up_when_the_space_is_too_small() -> None:
    train_digits = [str(d) for d in range(10) if split_of(str(d)) == "train"]
    lines = generate_corpus(_Digit(), len(train_digits), seed=0, difficulty=1)
    assert sorted(split_line(line)[0] for line in lines) == sorted(train_digits)
    with pytest.raises(UserError, match="found only"):
        generate_corpus(_Digit(), 11, seed=0, difficulty=1)


def test_corpus_rejects_bad_arguments() -> None:
    with pytest.raises(UserError, match="positive"):
        generate_corpus("flowroll", 0, seed=0, difficulty=1)
    with pytest.raises(UserError, match="split"):
        generate_corpus("flowroll", 5, seed=0, difficulty=1, split="dev")
    with pytest.raises(UserError, match="difficulty"):
        generate_corpus("dimmatch", 5, seed=0, difficulty=(0, 2))


@pytest.mark.slow
@pytest.mark.parametrize("lang", [FLOWROLL, DIMMATCH], ids=lambda lang: lang.name)
def test_corpus_speed(lang: Language) -> None:
    # CPU time of this process, not wall time: other jobs share the cores in CI, and a
    # wall-clock limit failed there at 2.03 s for a generation that takes 1.4 s alone.
    start = time.process_time()
    generate_corpus(lang, 20_000, seed=0, difficulty=(1, 5))
    assert time.process_time() - start < 2.0


# ---------------------------------------------------------------------------------------
# Evaluation


def test_evaluate_hand_made_predictions() -> None:
    lines = [
        "[3 1 4] | rot 1 | map *2 | sort => [2 6 8]",  # difficulty 3, right
        "[5 2 7 2] | filter odd | sum => 13",  # difficulty 2, wrong
        "[1 2] | sort =>  [1 2]  ",  # difficulty 1, right (prediction is stripped)
        "[1 2] | sort => [1  2]",  # difficulty 1, wrong (inner spacing counts)
        "[1 2] | sum | sort => 3",  # difficulty 2, ill-typed: invalid
        "[1 2 | sort => [1 2]",  # does not parse: invalid, no difficulty
        "no separator here",  # invalid, no difficulty
        "",  # blank: skipped
    ]
    report = evaluate(FLOWROLL, lines)
    assert report["language"] == "flowroll"
    assert report["overall"] == {"count": 7, "valid_fraction": 4 / 7, "exact_match": 2 / 7}
    assert report["by_difficulty"] == {
        "1": {"count": 2, "valid_fraction": 1.0, "exact_match": 0.5},
        "2": {"count": 2, "valid_fraction": 0.5, "exact_match": 0.0},
        "3": {"count": 1, "valid_fraction": 1.0, "exact_match": 1.0},
    }
    assert json.loads(json.dumps(report)) == report


def test_evaluate_reference_corpus_is_perfect_and_empty_input_is_zero() -> None:
    lines = generate_corpus("dimmatch", 200, seed=1, difficulty=(1, 2), split="val")
    report = evaluate("dimmatch", lines)
    assert report["overall"] == {"count": 200, "valid_fraction": 1.0, "exact_match": 1.0}
    assert set(report["by_difficulty"]) == {"1", "2"}
    assert evaluate("dimmatch", [])["overall"] == {
        "count": 0,
        "valid_fraction": 0.0,
        "exact_match": 0.0,
    }


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_generate_then_eval(tmp_path, capsys) -> None:
    out = tmp_path / "corpus" / "train.txt"
    args = ["--lang", "flowroll", "--n", "40", "--seed", "3", "--difficulty", "1-2"]
    assert dsl_main(["generate", *args, "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines == generate_corpus("flowroll", 40, seed=3, difficulty=(1, 2))
    assert [p.name for p in out.parent.iterdir()] == ["train.txt"]  # no temp file left

    assert dsl_main(["generate", *args, "--out", "-"]) == 0
    assert capsys.readouterr().out.splitlines() == lines

    # A model that gets every other line right.
    predictions = [
        line if i % 2 == 0 else format_line(split_line(line)[0], "[999]")
        for i, line in enumerate(lines)
    ]
    predictions_file = tmp_path / "predictions.txt"
    predictions_file.write_text("\n".join(predictions) + "\n")
    assert (
        dsl_main(["eval", "--lang", "flowroll", "--predictions", str(predictions_file), "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["overall"] == {"count": 40, "valid_fraction": 1.0, "exact_match": 0.5}

    assert dsl_main(["eval", "--lang", "flowroll", "--predictions", str(predictions_file)]) == 0
    table = capsys.readouterr().out
    assert "exact match" in table and "50.0%" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["generate", "--lang", "cobol", "--n", "5", "--difficulty", "1", "--out", "-"],
            "unknown practice language",
        ),
        (
            ["generate", "--lang", "flowroll", "--n", "0", "--difficulty", "1", "--out", "-"],
            "--n must be",
        ),
        (
            ["generate", "--lang", "flowroll", "--n", "5", "--difficulty", "1-9", "--out", "-"],
            "difficulty",
        ),
        (
            ["generate", "--lang", "flowroll", "--n", "5", "--difficulty", "x", "--out", "-"],
            "difficulty",
        ),
        (["eval", "--lang", "dimmatch", "--predictions", "/no/such/file.txt"], "not found"),
    ],
)
def test_cli_bad_input_is_a_user_error(argv: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        dsl_main(argv)


def test_top_level_cli_reports_user_errors_in_one_line(capsys) -> None:
    argv = ["dsl", "generate", "--lang", "cobol", "--n", "5", "--difficulty", "1", "--out", "-"]
    with pytest.raises(SystemExit) as info:
        lmlab.cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err
        == "lmlab dsl: error: unknown practice language 'cobol'; valid names: flowroll, dimmatch\n"
    )


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_cli_help_has_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        dsl_main([command, "--help"])
    assert info.value.code == 0
    assert f"example:\n  lmlab dsl {command} --lang" in capsys.readouterr().out


def test_import_does_not_pull_in_torch() -> None:
    code = "import sys, lmlab.data.dsl; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
