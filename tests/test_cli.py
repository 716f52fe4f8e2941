import pytest

from lmlab.cli import COMMANDS
from lmlab.cli import main as cli_main

NESTED = {
    "dsl": ["generate", "eval"],
    "tokenizer": ["train"],
    "data": ["inspect", "verify"],
    "config": ["show"],
    "lora": ["export", "merge"],
    "runs": ["list", "show", "compare", "delete", "clean"],
}


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli_main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help_with_an_example(command, capsys):
    for argv in [[command, sub] for sub in NESTED[command]] if command in NESTED else [[command]]:
        text = help_text(argv, capsys)
        assert "example" in text and "lmlab " + command in text, argv
