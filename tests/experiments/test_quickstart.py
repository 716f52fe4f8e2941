from pathlib import Path

import pytest

from lmlab.cli import main as cli_main


@pytest.mark.slow
def test_quickstart_runs_end_to_end_offline(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [
        "quickstart",
        "--out",
        str(tmp_path / "qs"),
        "--programs",
        "3000",
        "--steps",
        "60",
        "--test-programs",
        "20",
    ]
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exact match:" in out and "val loss:" in out and "samples" in out
    start, end = (float(x.split()[0]) for x in out.split("val loss:")[1].split("\n")[0].split("->"))
    assert end < start - 1.0  # 60 steps already cut the loss a lot
    runs = list((tmp_path / "qs" / "runs").glob("*/*/checkpoints/step_*"))
    assert runs and (tmp_path / "qs" / "data" / "manifest.json").is_file()
