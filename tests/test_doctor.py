"""`lmlab doctor`: every check reported, fixes named, the token never shown, no network."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmlab import doctor
from lmlab.commands.doctor import main

FAKE_TOKEN = "hf_FAKEtokenDoNotPrintQx7Zr93"
GIB = doctor.GIB
FIXED_NAMES = {"python", "lmlab", "torch", "mps", "cpu", "threads", "cpu load", "disk"}
HUB_NAMES = {"hub offline", "hub token", "hub reachable"}
REAL_REACHABILITY = doctor.hub_unreachable_reason  # the autouse fixture replaces it


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch, tmp_path):
    """No Hub request (calls are recorded), no 0.2 s load sample, no token, online mode."""
    calls: list[str] = []

    def reachable(url: str, timeout_s: float = doctor.HUB_TIMEOUT_S) -> str | None:
        calls.append(url)
        return None

    monkeypatch.setattr(doctor, "hub_unreachable_reason", reachable)
    monkeypatch.setattr(doctor.cpu_load, "busy_cores", lambda sample_s=0.2: 0.0)
    monkeypatch.setattr(doctor, "_login_token_path", lambda: tmp_path / "no-token")
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(var, raising=False)
    return calls


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def _report(capsys, tmp_path: Path, *argv: str) -> tuple[int, dict]:
    code, out = _run(capsys, "--json", "--runs-dir", str(tmp_path), *argv)
    return code, json.loads(out)


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def _usage(free_bytes: int):
    return shutil._ntuple_diskusage(100 * GIB, 100 * GIB - free_bytes, free_bytes)


# -- the report ---------------------------------------------------------------------------


def test_json_has_every_check_and_a_summary(capsys, tmp_path):
    code, report = _report(capsys, tmp_path, "--no-network")
    names = [c["name"] for c in report["checks"]]
    assert FIXED_NAMES | HUB_NAMES | set(doctor.OPTIONAL_PACKAGES) <= set(names)
    assert "cuda" in names or "cuda:0" in names
    assert len(names) == len(set(names))
    for check in report["checks"]:
        assert set(check) == {"status", "name", "found", "fix"}
        assert check["status"] in doctor.STATUSES
        assert check["found"]
        assert bool(check["fix"]) == (check["status"] != "ok"), check
    summary = report["summary"]
    assert sum(summary[s] for s in doctor.STATUSES) == len(names)
    assert code == (1 if summary["error"] else 0)


def test_plain_output_is_one_line_per_check(capsys, tmp_path):
    code, out = _run(capsys, "--runs-dir", str(tmp_path), "--no-network")
    lines = out.strip().splitlines()
    checks = doctor.run_checks(tmp_path, network=False)
    assert len(lines) == len(checks) + 1  # and the summary
    assert all(line.split()[0] in doctor.STATUSES for line in lines[:-1])
    assert re.fullmatch(r"\d+ ok, \d+ warnings?, \d+ errors?", lines[-1])


def test_the_rich_table_prints_every_check(capsys, tmp_path):
    from lmlab.commands.doctor import _print_table

    checks = doctor.run_checks(tmp_path, network=False)
    _print_table(checks, doctor.summarize(checks))
    out = capsys.readouterr().out
    assert "hub reachable" in out and "lz4" in out


def test_summary_counts_and_worst_status():
    checks = [
        doctor.Check("ok", "a", "x"),
        doctor.Check("warning", "b", "y", "fix"),
        doctor.Check("warning", "c", "z", "fix"),
    ]
    assert doctor.summarize(checks) == {"ok": 1, "warning": 2, "error": 0, "status": "warning"}
    assert doctor.summarize([])["status"] == "ok"


def test_python_below_310_is_an_error():
    assert doctor.check_python((3, 9, 18)).status == "error"
    assert doctor.check_python((3, 10, 0)).status == "ok"


# -- optional packages ------------------------------------------------------------------


def test_a_missing_extra_is_a_warning_naming_its_extra(monkeypatch, capsys, tmp_path):
    missing = {"peft", "rouge-score", "zstandard"}
    monkeypatch.setattr(
        doctor, "package_version", lambda name: None if name in missing else "9.9.9"
    )
    code, report = _report(capsys, tmp_path, "--no-network")
    checks = _by_name(report)
    assert checks["peft"]["status"] == "warning"
    assert checks["peft"]["fix"] == "pip install 'lmlab[finetune]'"
    assert "lora" in checks["peft"]["found"]
    assert checks["rouge-score"]["fix"] == "pip install 'lmlab[eval]'"
    assert "ROUGE" in checks["rouge-score"]["found"]
    assert checks["zstandard"]["fix"] == "pip install 'lmlab[compress]'"
    assert checks["transformers"] == {
        "status": "ok",
        "name": "transformers",
        "found": "9.9.9",
        "fix": "",
    }
    assert code == 0  # missing extras are never errors


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_extras_table_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(__file__).parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    declared: dict[str, set[str]] = {}
    for extra, requirements in extras.items():
        if extra in ("dev", "docs", "llamacpp"):  # for developers: the doctor skips them
            continue
        for requirement in requirements:
            package = _normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
            declared.setdefault(package, set()).add(extra)
    table = {_normalized(name): extra for name, (extra, _) in doctor.OPTIONAL_PACKAGES.items()}
    assert set(table) == set(declared)
    for package, extra in table.items():
        assert extra in declared[package], (package, extra)


# -- Hugging Face Hub ---------------------------------------------------------------------


def test_a_token_in_the_environment_is_found_and_never_shown(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    _, report = _report(capsys, tmp_path, "--no-network")
    assert _by_name(report)["hub token"]["found"] == "found (from env)"
    _, plain = _run(capsys, "--runs-dir", str(tmp_path), "--no-network")
    assert "found (from env)" in plain
    for text in (json.dumps(report), plain):
        assert FAKE_TOKEN not in text
        assert "FAKEtoken" not in text and "Qx7Zr93" not in text


def test_a_login_token_file_is_found_and_never_shown(monkeypatch, capsys, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(FAKE_TOKEN + "\n", encoding="utf-8")
    monkeypatch.setattr(doctor, "_login_token_path", lambda: token_file)
    _, out = _run(capsys, "--json", "--runs-dir", str(tmp_path), "--no-network")
    assert _by_name(json.loads(out))["hub token"]["found"] == "found (from login)"
    assert "FAKEtoken" not in out


def test_no_token_is_not_a_problem(capsys, tmp_path):
    _, report = _report(capsys, tmp_path, "--no-network")
    token = _by_name(report)["hub token"]
    assert token["status"] == "ok" and token["found"].startswith("none")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_mode_skips_the_network(monkeypatch, capsys, tmp_path, quiet_machine, var):
    monkeypatch.setenv(var, "1")
    _, report = _report(capsys, tmp_path)
    checks = _by_name(report)
    assert quiet_machine == []
    assert checks["hub offline"]["found"] == f"on ({var}=1)"
    assert checks["hub reachable"] == {
        "status": "ok",
        "name": "hub reachable",
        "found": "not checked (offline mode)",
        "fix": "",
    }


def test_no_network_skips_the_request(capsys, tmp_path, quiet_machine):
    _, report = _report(capsys, tmp_path, "--no-network")
    assert quiet_machine == []
    assert _by_name(report)["hub reachable"]["found"] == "not checked (--no-network)"


def test_the_hub_is_asked_by_default_and_unreachable_is_a_warning(
    monkeypatch, capsys, tmp_path, quiet_machine
):
    _report(capsys, tmp_path)
    assert quiet_machine == ["https://huggingface.co"]

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.test/")
    monkeypatch.setattr(doctor, "hub_unreachable_reason", lambda url: "no route")
    code, report = _report(capsys, tmp_path)
    check = _by_name(report)["hub reachable"]
    assert check["status"] == "warning"
    assert check["found"] == "https://hub.example.test unreachable: no route"
    assert "HF_HUB_OFFLINE=1" in check["fix"]
    assert code == 0


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)  # any answer means the server was reached
        self.end_headers()

    def log_message(self, *args):
        pass


def test_reachability_against_local_servers():
    """A server that answers, a closed port and one that never answers (no network used)."""
    real = REAL_REACHABILITY
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert real(f"http://127.0.0.1:{server.server_port}", timeout_s=2) is None
    finally:
        server.shutdown()
        server.server_close()

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert real(f"http://127.0.0.1:{port}", timeout_s=2) is not None

    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        reason = real(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3)
        assert reason is not None
        assert time.monotonic() - start < 1.5


# -- torch and devices (CUDA faked, so these run on any machine) -------------------------


def test_a_cuda_build_without_a_visible_gpu_is_a_warning(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    [check] = doctor.check_torch()
    assert check.status == "warning"
    assert "CUDA 12.4 build" in check.found and "no GPU is visible" in check.found
    assert "CUDA_VISIBLE_DEVICES=''" in check.found
    assert "nvidia-smi" in check.fix


def test_a_cpu_build_beside_an_nvidia_gpu_is_a_warning(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(doctor.shutil, "which", lambda name: f"/usr/bin/{name}")
    [check] = doctor.check_torch()
    assert check.status == "warning"
    assert "goes unused" in check.found
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu" in check.fix

    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    assert doctor.check_torch()[0].status == "ok"


def test_each_cuda_device_reports_its_memory(monkeypatch):
    import torch

    memory = {0: (130 * GIB, 140 * GIB), 1: (20 * GIB, 80 * GIB)}  # (free, total)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(name=["NVIDIA H200", "NVIDIA A100"][i], major=9, minor=0),
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: memory[i])
    checks = {c.name: c for c in doctor.check_devices()}
    assert set(checks) == {"cuda:0", "cuda:1", "mps"}
    assert checks["cuda:0"].status == "ok"
    assert checks["cuda:0"].found.startswith("NVIDIA H200, 140.0 GiB total, 130.0 GiB free")
    assert checks["cuda:1"].status == "warning"  # others hold most of it
    assert "60.0 GiB" in checks["cuda:1"].fix


# -- disk, CPU load -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free_bytes", "status", "code"),
    [(50 * GIB, "ok", 0), (2 * GIB, "warning", 0), (100 * 1024**2, "error", 1)],
)
def test_low_disk_is_a_warning_then_an_error(
    monkeypatch, capsys, tmp_path, free_bytes, status, code
):
    measured = []

    def disk_usage(path):
        measured.append(Path(path))
        return _usage(free_bytes)

    monkeypatch.setattr(doctor.shutil, "disk_usage", disk_usage)
    runs_dir = tmp_path / "not" / "yet"
    got, report = _report(capsys, tmp_path, "--no-network", "--runs-dir", str(runs_dir))
    check = _by_name(report)["disk"]
    assert measured == [tmp_path]  # the nearest folder that exists
    assert check["status"] == status
    assert f"{free_bytes / GIB:.1f} GiB free of 100.0 GiB" in check["found"]
    assert "does not exist yet" in check["found"]
    assert got == code
    if status != "ok":
        assert "--runs-dir" in check["fix"]


def test_an_error_makes_the_exit_status_1(monkeypatch, capsys, tmp_path):
    old_python = doctor.check_python((3, 8, 0))
    monkeypatch.setattr(doctor, "check_python", lambda: old_python)
    code, out = _run(capsys, "--runs-dir", str(tmp_path), "--no-network")
    assert code == 1
    assert re.search(r"^error +python +3\.8\.0 .*-> fix: install Python 3\.10", out, re.M)


def test_busy_cores_warn_that_training_uses_fewer_threads(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    check = doctor.check_cpu_load(busy=3.0)
    assert check.status == "warning"
    assert "3.0 of" in check.found
    assert "5 of 8 threads" in check.fix and "noisy" in check.fix
    assert doctor.check_cpu_load(busy=0.2).status == "ok"


def test_the_load_is_measured_by_lmlab_runs_cpu(monkeypatch):
    monkeypatch.setattr(doctor.cpu_load, "busy_cores", lambda sample_s=0.2: 1.5)
    assert "1.5 of" in doctor.check_cpu_load().found


# -- the command as users run it ---------------------------------------------------------


def test_python_m_lmlab_doctor_json_no_network(tmp_path):
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run(
        [sys.executable, "-m", "lmlab", "doctor", "--json", "--no-network"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    assert result.returncode == (1 if report["summary"]["error"] else 0), result.stderr
    checks = _by_name(report)
    assert set(checks) >= FIXED_NAMES | HUB_NAMES
    assert checks["hub token"]["found"] == "found (from env)"
    assert checks["hub reachable"]["found"] == "not checked (--no-network)"
    assert "FAKEtoken" not in result.stdout + result.stderr
