"""`lmlab experiment overfit --quick`: the lesson holds in the numbers it measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmlab
from lmlab.errors import UserError


@pytest.mark.slow
def test_overfit_gap_shrinks_with_more_data(tmp_path: Path):
    result = lmlab.run_experiment("overfit", tmp_path / "of", quick=True, log=lambda *a: None)
    runs = sorted(result.results["runs"].values(), key=lambda r: r["fraction"])
    assert [r["fraction"] for r in runs] == [0.01, 0.1, 1.0]
    assert runs[0]["gap"] > runs[-1]["gap"] + 0.1  # 1% of the text overfits, 100% does not
    assert runs[0]["epochs"] > 10 > 1 > runs[-1]["epochs"]
    saved = json.loads((tmp_path / "of" / "results.json").read_text())
    assert saved["results"]["runs"] == json.loads(json.dumps(result.results["runs"]))
    readme = (tmp_path / "of" / "README.md").read_text()
    assert f"gap of {runs[0]['gap']:.3f}" in readme  # the README quotes this run's numbers
    assert "(curves.png)" in readme and "(gap.png)" in readme
    for plot in result.plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_experiments_and_options_are_one_line_errors(tmp_path: Path):
    with pytest.raises(UserError, match="unknown experiment 'overfitt'"):
        lmlab.run_experiment("overfitt", tmp_path)
    with pytest.raises(UserError, match="no option 'step'"):
        lmlab.run_experiment("overfit", tmp_path, step=3)


def test_experiment_list_shows_every_experiment_and_its_options(capsys):
    from lmlab.commands.experiment import main
    from lmlab.experiments.common import EXPERIMENTS, experiment_options

    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert f"\n{name} " in "\n" + listing
        for key in experiment_options(name):
            assert f"    {key}=" in listing
    assert main(["list", "copy-task"]) == 0
    one = capsys.readouterr().out
    assert one.startswith("copy-task ") and "init_std=" in one and "overfit" not in one
    with pytest.raises(UserError, match="unknown experiment 'nope'"):
        main(["list", "nope"])
