"""`lmlab report` and `lmlab plot`: curves read from real runs, one self-contained HTML page,
PNG figures of the asked size, one-line errors; the slow test renders the page in headless
Chromium to prove a browser shows its figures."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402 (matplotlib depends on pillow)

from lmlab.cli import main as cli_main  # noqa: E402
from lmlab.commands import plot as plot_command  # noqa: E402
from lmlab.commands import report as report_command  # noqa: E402
from lmlab.config import build_config  # noqa: E402
from lmlab.errors import UserError  # noqa: E402
from lmlab.report.curves import (  # noqa: E402
    WALL_KEY,
    available_metrics,
    metric_series,
    plot_metric,
    plot_series,
    read_history,
    run_labels,
)
from lmlab.report.html import FIGURES, ReportOptions, build_report  # noqa: E402
from lmlab.report.samples import PROMPT_TOKENS, default_prompt  # noqa: E402
from lmlab.runs.metrics import read_metrics  # noqa: E402
from lmlab.train.loop import train  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def tiny_run(data: Path, runs: Path, name: str, *extra: str) -> Path:
    """A ~2 s CPU run with val lines every 4 steps and a checkpoint at its last step."""
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            f"logging.name={name}",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.max_steps=8",
            "train.warmup_steps=2",
            "train.device=cpu",
            "eval.interval=4",
            "eval.batches=2",
            "checkpoint.interval=8",
            "logging.interval=2",
            "logging.tensorboard=false",
            *extra,
        ],
    )
    return train(cfg, log=lambda *a, **k: None).run_dir


@pytest.fixture(scope="module")
def two_runs(flowroll_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    runs = tmp_path_factory.mktemp("runs")
    first = tiny_run(flowroll_data, runs, "alpha")
    # a config value a careless page would run as a script
    second = tiny_run(
        flowroll_data, runs, "beta", "train.lr=3e-3", f"finetune.lora_targets={SCRIPT}"
    )
    return first, second


@pytest.fixture(scope="module")
def report_html(two_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    argv = [str(run) for run in two_runs]
    code = report_command.main([*argv, "--out", str(out), "--device", "cpu"])
    assert code == 0
    return out


def decoded_images(html: str) -> list[Image.Image]:
    images = []
    for data in IMG.findall(html):
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG_SIGNATURE)
        image = Image.open(io.BytesIO(png))
        image.load()  # reads every pixel: a truncated PNG fails here
        images.append(image)
    return images


# -- the HTML report ----------------------------------------------------------------------


def test_report_is_one_self_contained_file(report_html: Path):
    html = report_html.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<script", html, re.IGNORECASE)  # no script at all
    assert not re.search(r"<link\b", html, re.IGNORECASE)  # the style sheet is inline
    assert "@import" not in html and "url(" not in html
    srcs = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", html)
    assert srcs and all(src.startswith("data:image/png;base64,") for src in srcs)
    assert not list(report_html.parent.glob(".*.tmp"))  # written atomically


def test_report_has_one_valid_png_per_figure(report_html: Path):
    html = report_html.read_text(encoding="utf-8")
    images = decoded_images(html)
    assert len(images) == len(FIGURES)
    for image in images:
        assert image.format == "PNG"
        assert image.size == (640, 340)
        assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # drawn on
    for _, title, _ in FIGURES:
        assert f'alt="{title}"' in html


def test_report_names_both_runs_and_shows_their_metrics_and_configs(report_html, two_runs):
    html = report_html.read_text(encoding="utf-8")
    for run in two_runs:
        label = f"{run.parent.name}/{run.name}"
        assert html.count(label) >= 4  # title, runs table, metrics, samples, config
    assert "lmlab report: alpha/" in html
    assert "<details><summary>" in html and "config.yaml</summary>" in html
    for key in ("val_loss (last)", "val_loss (best)", "val_perplexity (last)", "train loss"):
        assert key in html
    assert "train.lr" in html  # the config keys that differ


def test_report_escapes_what_runs_wrote(report_html: Path):
    html = report_html.read_text(encoding="utf-8")
    assert SCRIPT not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_samples_continue_the_val_data(report_html: Path, two_runs):
    html = report_html.read_text(encoding="utf-8")
    samples = re.findall(r'<pre class="sample"><b>(.*?)</b>', html, re.DOTALL)
    assert len(samples) == 2 * len(two_runs)  # two per prompt, one prompt per run
    assert all(samples)


def test_default_prompt_is_the_start_of_the_val_data(two_runs, flowroll_data: Path):
    from lmlab.runs.load import build_from_checkpoint

    _, tokenizer, cfg, _ = build_from_checkpoint(two_runs[0])
    prompt = default_prompt(cfg, tokenizer)
    assert 0 < len(tokenizer.encode(prompt)) <= PROMPT_TOKENS
    cfg.data.path = str(flowroll_data.parent / "gone")
    assert default_prompt(cfg, tokenizer) == ""  # the data moved away: a new document


def test_report_without_samples_and_with_prompts(two_runs, tmp_path: Path, capsys):
    out = tmp_path / "plain.html"
    assert report_command.main([str(two_runs[0]), "--out", str(out), "--no-samples"]) == 0
    assert "<h2>Samples</h2>" not in out.read_text(encoding="utf-8")
    assert "0 sample(s)" in capsys.readouterr().out

    seen = []
    report = build_report(
        [two_runs[0]],
        ReportOptions(prompts=["[", "[3 1 2] |"], samples_per_prompt=1, max_new_tokens=5),
        on_progress=lambda label, done, total: seen.append((done, total)),
    )
    assert report.samples == 2 and not report.warnings
    assert seen == [(0, 1), (1, 1)]


def test_a_prompt_outside_the_vocabulary_is_a_warning_not_a_failure(two_runs):
    report = build_report([two_runs[0]], ReportOptions(prompts=["日本"], max_new_tokens=4))
    assert report.samples == 0
    assert len(report.warnings) == 1 and "outside its vocabulary" in report.warnings[0]
    assert "no samples: the prompt" in report.html


def test_report_of_a_run_without_checkpoints_or_metrics(two_runs, tmp_path: Path):
    run = tmp_path / "runs" / "empty" / "20261123-101500"
    run.mkdir(parents=True)
    shutil.copy(two_runs[0] / "config.yaml", run / "config.yaml")
    report = build_report([run])
    assert report.figures == [] and report.samples == 0
    assert "no checkpoint yet" in report.html and "not logged:" in report.html


# -- lmlab plot ---------------------------------------------------------------------------


def test_plot_writes_a_png_of_the_asked_size(two_runs, tmp_path: Path, capsys):
    out = tmp_path / "curves.png"
    runs = [str(run) for run in two_runs]
    assert plot_command.main([*runs, "--metric", "loss", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 400)
    assert "loss of 2 run(s)" in capsys.readouterr().out
    for x in ("tokens", "elapsed"):
        argv = [*runs, "--x", x, "--log-y", "--width", "640", "--height", "320", "--out", str(out)]
        assert plot_command.main(argv) == 0
        with Image.open(out) as image:
            assert image.size == (640, 320)


def test_plot_of_a_missing_metric_is_one_line_listing_the_metrics(two_runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plot", str(two_runs[0]), "--metric", "val_accuracy", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmlab plot: error: run alpha/")
    assert "no 'val_accuracy' values; it has: " in err
    assert "val_loss" in err and "grad_norm" in err
    assert not out.exists()


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(UserError, match=r"pip install 'lmlab\[export\]'"):
        plot_series({"a": [(0, 1)]}, title="t", xlabel="x", ylabel="y")


def test_plot_series_returns_png_bytes_and_writes_out(tmp_path: Path):
    out = tmp_path / "sub" / "fig.png"
    png = plot_series(
        {"run a": [(0, 3.0), (10, 2.0)], "run b": [], "run c": [(0, 1.0)]},
        title="loss",
        xlabel="step",
        ylabel="loss",
        log_y=True,
        out=out,
        width_px=300,
        height_px=200,
    )
    assert png.startswith(PNG_SIGNATURE) and out.read_bytes() == png
    assert Image.open(io.BytesIO(png)).size == (300, 200)
    empty = plot_series({}, title="nothing", xlabel="x", ylabel="y")  # says "no data"
    assert empty.startswith(PNG_SIGNATURE)


# -- curves -------------------------------------------------------------------------------


def test_series_skip_missing_null_and_non_finite_values():
    history = [
        {"step": 0, "val_loss": 4.0},
        {"step": 2, "loss": 3.5, "tokens_seen": 20, "grad_norm": None, "nonfinite": ["grad_norm"]},
        {"step": 4, "loss": None, "tokens_seen": 40, "nonfinite": ["loss"]},
        {"step": 4, "val_loss": 3.0},
        {"step": 6, "loss": math.nan, "tokens_seen": 60},
        {"step": 8, "loss": math.inf, "tokens_seen": 80, "grad_norm": True},
        {"step": 10, "loss": 2.5, "tokens_seen": 100, "lr": "0.1"},
        {"event": "note", "step": 10},
        {"step": 12, "val_loss": 2.0},
    ]
    assert metric_series(history, "loss") == [(2.0, 3.5), (10.0, 2.5)]
    assert metric_series(history, "grad_norm") == []
    assert metric_series(history, "lr") == []
    # eval lines take the tokens at their step: 10 per step here, continued past the end
    assert metric_series(history, "val_loss", "tokens") == [(0.0, 4.0), (40.0, 3.0), (120.0, 2.0)]
    assert metric_series(history, "loss", "elapsed") == []  # no elapsed_s logged
    assert available_metrics(history) == ["val_loss", "loss", "tokens_seen"]
    with pytest.raises(ValueError):
        metric_series(history, "loss", "epoch")


def test_history_is_read_metrics_with_wall_time_over_resumes(tmp_path: Path):
    lines = [
        {"event": "start", "step": 0, "time": "t0"},
        {"step": 2, "loss": 3.0, "elapsed_s": 1.0},
        {"step": 4, "loss": 2.8, "elapsed_s": 2.0},
        {"step": 6, "loss": 2.7, "elapsed_s": 3.0},  # after the checkpoint at 4: superseded
        {"event": "start", "step": 4, "time": "t1"},
        {"step": 6, "loss": 2.6, "elapsed_s": 0.5},
        {"step": 6, "val_loss": 2.5, "elapsed_s": 0.75},
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 8, "lo'  # a torn line
    )
    history = read_history(tmp_path)
    assert [{k: v for k, v in r.items() if k != WALL_KEY} for r in history] == read_metrics(
        tmp_path
    )
    assert [r[WALL_KEY] for r in history] == [1.0, 2.0, 3.5, 3.75]
    assert metric_series(history, "loss", "elapsed") == [(1.0, 3.0), (2.0, 2.8), (3.5, 2.6)]


def test_plot_metric_names_the_run_that_lacks_the_metric():
    histories = {"a/1": [{"step": 1, "loss": 2.0}], "b/2": [{"step": 1, "lr": 0.1}]}
    with pytest.raises(UserError, match=r"run b/2 has no 'loss' values; it has: lr$"):
        plot_metric(histories, "loss")
    with pytest.raises(UserError, match="it has logged no metrics yet"):
        plot_metric({"c/3": []}, "loss")


def test_run_labels_are_unique():
    runs = [Path("x/runs/tiny/1"), Path("y/runs/tiny/1"), Path("y/runs/tiny/2")]
    assert run_labels(runs) == ["x/runs/tiny/1", "y/runs/tiny/1", "tiny/2"]


# -- rendering in a browser ---------------------------------------------------------------


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report_html: Path, tmp_path: Path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium (or chrome) binary on PATH to render the report")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            report_html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32).reshape(-1, 3)
    non_white = int((pixels.min(axis=1) < 240).sum())
    assert non_white > 0.02 * len(pixels), "the page looks blank"
    assert len(np.unique(pixels @ np.array([1 << 16, 1 << 8, 1]))) > 200  # distinct colours
    # The runs' lines are matplotlib's first two colours: seen only if the images rendered.
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        near = (np.abs(pixels - np.array(colour)) <= 40).all(axis=1)
        assert int(near.sum()) > 300, colour
