"""A stopped `lmlab prepare` continues with --resume and ends byte-identical to one that
never stopped (issue 13, item 2)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.data.prepare import prepare
from lmlab.errors import UserError

pytestmark = pytest.mark.posix

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """About 10 MB of text: a few seconds of prepare, so a kill lands in the middle."""
    if not SHAKESPEARE.is_file():
        pytest.skip("needs ../shared/data/tinyshakespeare.txt")
    path = tmp_path_factory.mktemp("text") / "ts10.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8") * 10, encoding="utf-8")
    return path


def command(text: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmlab",
        "prepare",
        "--input",
        str(text),
        "--tokenizer",
        "char",
        "--shard-tokens",
        "2000000",
        "--out",
        str(out),
        *extra,
    ]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def splits(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["splits"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_stopped_prepare_resumes_to_identical_shards(text: Path, tmp_path: Path, sig):
    subprocess.run(command(text, tmp_path / "straight"), check=True, capture_output=True)
    out = tmp_path / "stopped"
    partial = tmp_path / "stopped.partial"
    rng = random.Random(13 + int(sig))
    for attempt in range(2):  # stopped twice, resumed each time
        before = _mtime(partial / "progress.json")
        proc = subprocess.Popen(
            command(text, out, *(["--resume"] if attempt else [])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while _mtime(partial / "progress.json") <= before and time.monotonic() < deadline:
            time.sleep(0.01)  # until this process has recorded progress of its own
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            break  # finished before the stop: nothing left to test on this attempt
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err
        if out.exists():  # the signal came as it was finishing: a complete output, no partial
            assert not partial.exists()
            break
        assert (partial / "progress.json").is_file()
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "--resume continues it" in err
    if not out.exists():
        result = subprocess.run(command(text, out, "--resume"), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "resuming:" in result.stderr
    assert not partial.exists()
    assert shard_bytes(out) == shard_bytes(tmp_path / "straight")
    assert splits(out) == splits(tmp_path / "straight")


def test_resume_refuses_other_settings_and_missing_work(text: Path, tmp_path: Path):
    out = tmp_path / "o"
    with pytest.raises(UserError, match="nothing to resume"):
        prepare([str(text)], out, "char", resume=True, log=lambda *a: None)
    partial = tmp_path / "o.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(
        json.dumps({"settings": {"inputs": [str(text)], "tokenizer": "bpe:512"}})
    )
    with pytest.raises(UserError, match="cannot resume: tokenizer was 'bpe:512'"):
        prepare([str(text)], out, "char", resume=True, log=lambda *a: None)
    with pytest.raises(UserError, match="holds a prepare that was stopped"):
        prepare([str(text)], out, "char", log=lambda *a: None)


def test_a_failed_prepare_leaves_nothing(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(UserError):
        prepare([str(empty)], tmp_path / "o", "char", log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def test_a_streamed_parquet_dataset_resumes_to_the_same_tokens(tmp_path: Path, monkeypatch):
    """In the spirit of torchtitan's test: a local dataset of 4 parquet shards, streamed
    through `datasets`, stopped after some batches and resumed, gives exactly the tokens of
    an uninterrupted pass."""
    import datasets

    from lmlab.data import prepare as prepare_module

    folder = tmp_path / "dataset"
    folder.mkdir()
    rng = random.Random(4)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for shard in range(4):
        rows = [
            {
                "text": f"{shard}-{i}: "
                + " ".join(rng.choice(words) for _ in range(rng.randint(5, 80)))
            }
            for i in range(600)
        ]
        datasets.Dataset.from_list(rows).to_parquet(str(folder / f"part-{shard}.parquet"))
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 20_000)  # many batches
    monkeypatch.setattr(prepare_module, "PROGRESS_EVERY_S", 0.0)  # a record after each
    quiet = {"log": lambda *a: None}
    straight = prepare(
        [f"hf:{folder}"], tmp_path / "straight", "char", shard_tokens=50_000, **quiet
    )

    original_add, calls = prepare_module._Done.add, {"n": 0}

    def stop_after_some(self, *args, **kwargs):
        original_add(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module._Done, "add", stop_after_some)
    with pytest.raises(KeyboardInterrupt):
        prepare([f"hf:{folder}"], tmp_path / "out", "char", shard_tokens=50_000, **quiet)
    monkeypatch.setattr(prepare_module._Done, "add", original_add)
    saved = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert 0 < saved["documents"] < 2400
    resumed = prepare(
        [f"hf:{folder}"], tmp_path / "out", "char", shard_tokens=50_000, resume=True, **quiet
    )
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "straight")
    assert resumed["splits"] == straight["splits"]
    import numpy as np

    hashes = [np.load(tmp_path / d / "doc_hashes.r1.npy") for d in ("out", "straight")]
    assert np.array_equal(*hashes) and len(hashes[0]) > 2000  # every document's, once


def _interrupted_then_resumed(monkeypatch, args: list[str], out: Path, **kwargs) -> dict:
    """prepare(args) stopped by a KeyboardInterrupt after its 5th written batch, then resumed."""
    from lmlab.data import prepare as prepare_module

    original_add, calls = prepare_module._Done.add, {"n": 0}

    def stop_after_some(self, *a, **k):
        original_add(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(prepare_module._Done, "add", stop_after_some)
        with pytest.raises(KeyboardInterrupt):
            prepare(args, out, "char", **kwargs)
    assert (out.parent / f"{out.name}.partial" / "progress.json").is_file()
    return prepare(args, out, "char", resume=True, **kwargs)


@pytest.mark.parametrize(
    "caps",
    [{"max_tokens": 150_000}, {"max_input_tokens": 60_000}, {}],
    ids=["weighted-capped", "per-input-cap", "weighted-uncapped"],
)
def test_a_capped_or_mixed_prepare_resumes_to_identical_shards(tmp_path: Path, monkeypatch, caps):
    from lmlab.data import prepare as prepare_module

    rng = random.Random(5)
    for name, words in (("a", ["ox", "a", "is"]), ("b", ["elephant", "rhinoceros"])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for _ in range(1500):
                f.write(
                    json.dumps(
                        {"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 90)))}
                    )
                    + "\n"
                )
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(prepare_module, "PROGRESS_EVERY_S", 0.0)
    weighted = "max_input_tokens" not in caps
    args = [str(tmp_path / f"{n}.jsonl") + ("@0.5" if weighted else "") for n in ("a", "b")]
    quiet = {"log": lambda *a: None, **caps}
    straight = prepare(args, tmp_path / "straight", "char", **quiet)
    # The output does not depend on how many workers return results, or when.
    monkeypatch.setattr(prepare_module.os, "cpu_count", lambda: 1)
    one_worker = prepare(args, tmp_path / "one", "char", **quiet)
    resumed = _interrupted_then_resumed(monkeypatch, args, tmp_path / "out", **quiet)
    for other in ("one", "out"):
        assert shard_bytes(tmp_path / other) == shard_bytes(tmp_path / "straight"), other
    assert (
        resumed["source"]["mixture"]
        == straight["source"]["mixture"]
        == one_worker["source"]["mixture"]
    )
