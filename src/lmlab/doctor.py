"""`lmlab doctor`'s checks of this machine: Python, torch, devices, threads, disk, extras, Hub.

Each check is a `Check`: a status, a name, what was found and, for a warning or an error,
the fix (a command or a setting). The functions here return data and print nothing;
`lmlab.commands.doctor` prints. torch is imported inside the checks, so a broken torch
install is reported as a check instead of stopping the doctor at import time.

The Hub token is only ever tested for presence: no check reads it into a message.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from lmlab.runs import cpu as cpu_load

Status = Literal["ok", "warning", "error"]
STATUSES: tuple[Status, ...] = get_args(Status)

GIB = 1024**3
MIN_PYTHON = (3, 10)  # pyproject.toml's requires-python
MIN_TORCH = (2, 4)  # pyproject.toml's torch>=2.4
DISK_WARNING_BYTES = 5 * GIB
DISK_ERROR_BYTES = GIB // 2
HUB_TIMEOUT_S = 3.0
HUB_URL = "https://huggingface.co"

# Optional package (its distribution name) -> (the extra that brings it, what needs it).
# One table for every optional package; tests check it against the extras lmlab declares.
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "transformers": ("hf", "Hugging Face models and tokenizers, export to a transformers folder"),
    "datasets": ("hf", "Hugging Face datasets in `lmlab prepare hf:NAME`"),
    "huggingface_hub": ("hf", "downloading Hub models, `lmlab publish`"),
    "peft": ("finetune", "PEFT adapters: `lmlab lora`, fine-tuning PEFT models"),
    "sacrebleu": ("eval", "BLEU and chrF in `lmlab score`"),
    "rouge-score": ("eval", "ROUGE in `lmlab score`"),
    "gguf": ("export", "GGUF export for llama.cpp"),
    "matplotlib": ("export", "loss-curve plots in model cards"),
    "tensorboard": ("tensorboard", "TensorBoard logging"),
    "lz4": ("compress", "compressed shards: `lmlab prepare --compress lz4`"),
    "zstandard": ("compress", "compressed shards: `lmlab prepare --compress zstd`"),
}

_TRUE = ("1", "true", "yes", "on")


@dataclass
class Check:
    """One line of the report."""

    status: Status
    name: str
    found: str
    fix: str = ""
    """A command or setting that mends a warning or an error ("" when ok)."""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def summarize(checks: list[Check]) -> dict[str, Any]:
    """Counts per status and the worst status."""
    counts = {status: sum(c.status == status for c in checks) for status in STATUSES}
    worst = next((s for s in reversed(STATUSES) if counts[s]), "ok")
    return {**counts, "status": worst}


def run_checks(runs_dir: str | Path = "runs", network: bool = True) -> list[Check]:
    """Every check, in the order they are shown. `network=False` skips the Hub request."""
    checks = [check_python(), check_lmlab()]
    torch_checks = check_torch()
    checks += torch_checks
    torch_ok = torch_checks[0].status != "error"
    if torch_ok:
        checks += check_devices()
    checks.append(check_cpu())
    if torch_ok:
        checks.append(check_threads())
        checks.append(check_cpu_load())
    checks.append(check_disk(runs_dir))
    checks += check_extras()
    checks += check_hub(network)
    return checks


# -- Python, lmlab, torch ----------------------------------------------------------------


def check_python(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(map(str, version))
    if tuple(version[:2]) < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return Check(
            "error", "python", text, f"install Python {need} or newer and reinstall lmlab in it"
        )
    return Check("ok", "python", f"{text} ({sys.executable})")


def check_lmlab() -> Check:
    try:
        return Check("ok", "lmlab", importlib.metadata.version("lmlab"))
    except importlib.metadata.PackageNotFoundError:
        return Check(
            "warning", "lmlab", "not installed (run from a source tree)", "pip install -e ."
        )


def _release(version: str) -> tuple[int, ...]:
    """(2, 4) of "2.4.1+cu121"."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])


def check_torch() -> list[Check]:
    """torch's version and build (CPU-only, CUDA, ROCm, MPS), and whether it fits the GPU."""
    try:
        import torch
    except (ImportError, OSError) as e:  # OSError: a shared library that will not load
        return [
            Check("error", "torch", f"cannot import: {e}", "pip install --force-reinstall torch")
        ]
    version = torch.__version__
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    elif torch.backends.mps.is_built():
        build = "MPS build"
    else:
        build = "CPU-only build"
    found = f"{version}, {build}"
    if _release(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        return [Check("error", "torch", found, f"pip install -U 'torch>={need}'")]
    gpu_driver = shutil.which("nvidia-smi") is not None
    if torch.version.cuda and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        note = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return [
            Check(
                "warning",
                "torch",
                f"{found}, but no GPU is visible{note}: training runs on the CPU",
                "check the driver with `nvidia-smi` and CUDA_VISIBLE_DEVICES; on a machine "
                "without a GPU the CPU build is smaller: "
                "pip install torch --index-url https://download.pytorch.org/whl/cpu",
            )
        ]
    if gpu_driver and not torch.version.cuda:
        return [
            Check(
                "warning",
                "torch",
                f"{found}, but this machine has an NVIDIA GPU (nvidia-smi): it goes unused",
                "install a CUDA build: pip install torch --index-url "
                "https://download.pytorch.org/whl/cu126 (pick the CUDA version your driver "
                "supports at https://pytorch.org/get-started)",
            )
        ]
    return [Check("ok", "torch", found)]


# -- devices, CPU, threads, load -----------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_devices() -> list[Check]:
    """One check per CUDA device (name, memory total and free), then MPS."""
    import torch

    checks = []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        found = (
            f"{props.name}, {_gib(total)} total, {_gib(free)} free, "
            f"compute capability {props.major}.{props.minor}"
        )
        if free < total / 2:  # our own context holds well under a GiB
            checks.append(
                Check(
                    "warning",
                    f"cuda:{i}",
                    found,
                    f"other processes hold {_gib(total - free)}: see `nvidia-smi`, or pick "
                    "another GPU with CUDA_VISIBLE_DEVICES",
                )
            )
        else:
            checks.append(Check("ok", f"cuda:{i}", found))
    if not count:
        checks.append(Check("ok", "cuda", "no CUDA device visible"))
    if torch.backends.mps.is_available():
        mps = "available"
    elif torch.backends.mps.is_built():
        mps = "built but not available (needs macOS 12.3+ on Apple silicon)"
    else:
        mps = "not available (Apple silicon only)"
    checks.append(Check("ok", "mps", mps))
    return checks


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS
        return os.cpu_count() or 1


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes: /proc/meminfo on Linux, else sysconf (total only)."""
    try:
        fields = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024  # kB
        return fields.get("MemTotal"), fields.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
    except (AttributeError, ValueError, OSError):
        return None, None


def check_cpu() -> Check:
    cores, usable = os.cpu_count() or 1, usable_cores()
    found = f"{cores} cores" + (f" ({usable} usable by this process)" if usable < cores else "")
    total, available = memory_bytes()
    if total:
        found += f", {_gib(total)} RAM"
        if available is not None:
            found += f" ({_gib(available)} available)"
    return Check("ok", "cpu", found)


def _torch_backends() -> str:
    """A few words on torch's CPU parallelism and math libraries: "OpenMP, BLAS mkl, oneDNN"."""
    import torch

    parts = []
    match = re.search(r"ATen parallel backend: (.+)", torch.__config__.parallel_info())
    if match:
        parts.append(match.group(1).strip())
    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    if match:
        parts.append(f"BLAS {match.group(1)}")
    if torch.backends.mkldnn.is_available():
        parts.append("oneDNN")
    return ", ".join(parts) or "unknown"


def check_threads() -> Check:
    import torch

    intra, inter = torch.get_num_threads(), torch.get_num_interop_threads()
    found = f"torch {intra} intra-op / {inter} inter-op threads"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if var in os.environ:
            found += f", {var}={os.environ[var]}"
    found += f"; {_torch_backends()}"
    usable = usable_cores()
    if intra > usable:
        return Check(
            "warning",
            "threads",
            f"{found}: more threads than the {usable} usable cores",
            f"export OMP_NUM_THREADS={usable}",
        )
    return Check("ok", "threads", found)


def check_cpu_load(busy: float | None = None) -> Check:
    """How many cores other programs keep busy (a 0.2 s sample unless `busy` is given)."""
    import torch

    if busy is None:
        busy = cpu_load.busy_cores()
    if busy is None:
        return Check("ok", "cpu load", "not measured (needs Linux's /proc/stat)")
    cores = torch.get_num_threads()  # what training starts from (lmlab.train.setup)
    threads = cpu_load.auto_threads(cores, busy)
    found = f"other programs keep {busy:.1f} of {os.cpu_count() or 1} cores busy"
    if threads < cores:
        return Check(
            "warning",
            "cpu load",
            found,
            f"training on the CPU will use {threads} of {cores} threads and benchmark timings "
            "will be noisy: stop the other programs, or fix a count with train.cpu_threads=N",
        )
    return Check("ok", "cpu load", found)


# -- disk -------------------------------------------------------------------------------


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest parent that exists."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(runs_dir: str | Path) -> Check:
    """Free space where runs are written: a warning below 5 GiB, an error below 0.5 GiB."""
    runs_dir = Path(runs_dir)
    where = existing_parent(runs_dir)
    try:
        usage = shutil.disk_usage(where)
    except OSError as e:
        return Check(
            "warning",
            "disk",
            f"cannot measure {where}: {e.strerror}",
            "check the folder's permissions, or choose another with --runs-dir DIR",
        )
    place = (
        str(where)
        if where == runs_dir.expanduser().absolute()
        else f"{where} ({runs_dir} does not exist yet)"
    )
    found = f"{_gib(usage.free)} free of {_gib(usage.total)} at {place}"
    fix = "free space there, or write runs elsewhere: --runs-dir DIR (train: logging.runs_dir=DIR)"
    if usage.free < DISK_ERROR_BYTES:
        return Check("error", "disk", f"{found}: below {_gib(DISK_ERROR_BYTES)}", fix)
    if usage.free < DISK_WARNING_BYTES:
        return Check(
            "warning",
            "disk",
            f"{found}: below {_gib(DISK_WARNING_BYTES)}, checkpoints may not fit",
            fix,
        )
    return Check("ok", "disk", found)


# -- optional packages -----------------------------------------------------------------


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None (no module is imported)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_extras() -> list[Check]:
    """One check per optional package: its version, or the extra that installs it."""
    checks = []
    for name, (extra, feature) in OPTIONAL_PACKAGES.items():
        version = package_version(name)
        if version is None:
            checks.append(
                Check(
                    "warning",
                    name,
                    f"not installed (needed for {feature})",
                    f"pip install 'lmlab[{extra}]'",
                )
            )
        else:
            checks.append(Check("ok", name, version))
    return checks


# -- Hugging Face Hub --------------------------------------------------------------------


def hub_offline_vars() -> list[str]:
    """The offline-mode variables that are set: HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return [n for n in names if os.environ.get(n, "").strip().lower() in _TRUE]


def _login_token_path() -> Path:
    """Where `huggingface-cli login` keeps the token (huggingface_hub's own constant when
    it is installed, else its documented default)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_TOKEN_PATH)
    except (ImportError, AttributeError):
        if "HF_TOKEN_PATH" in os.environ:
            return Path(os.environ["HF_TOKEN_PATH"]).expanduser()
        home = os.environ.get("HF_HOME") or Path(
            os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
        )
        return Path(home).expanduser() / "token"


def token_source() -> str | None:
    """ "env" or "login" when a Hub token is available, else None. The token itself is
    only tested for being non-empty and never returned."""
    if (
        os.environ.get("HF_TOKEN", "").strip()
        or os.environ.get("HUGGING_FACE_HUB_TOKEN", "").strip()
    ):
        return "env"
    try:
        if _login_token_path().read_text(encoding="utf-8").strip():
            return "login"
    except (OSError, UnicodeDecodeError):
        pass
    return None


def hub_endpoint() -> str:
    """The Hub's address: HF_ENDPOINT (a mirror) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or HUB_URL


def hub_unreachable_reason(url: str, timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """None when `url` answers an HTTP HEAD request within about `timeout_s`, else why not.

    Any HTTP answer, even an error status, means the server was reached. The request runs
    in a daemon thread because urllib's timeout does not cover the DNS lookup, which can
    stall far longer on a machine without a network."""
    result: list[str | None] = []

    def ask() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(request, timeout=timeout_s).close()
            result.append(None)
        except urllib.error.HTTPError:
            result.append(None)
        except urllib.error.URLError as e:
            result.append(str(e.reason))
        except (OSError, ValueError) as e:  # a timeout, a reset, a malformed HF_ENDPOINT
            result.append(str(e) or type(e).__name__)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return result[0] if result else f"no answer within {timeout_s:.0f} s"


def check_hub(network: bool = True) -> list[Check]:
    """Offline mode, token (its source only) and whether the Hub answers."""
    offline = hub_offline_vars()
    checks = [
        Check(
            "ok",
            "hub offline",
            f"on ({', '.join(f'{v}=1' for v in offline)})" if offline else "off",
        )
    ]
    source = token_source()
    if source:
        checks.append(Check("ok", "hub token", f"found (from {source})"))
    else:
        checks.append(
            Check("ok", "hub token", "none (needed only for gated models and `lmlab publish`)")
        )
    endpoint = hub_endpoint()
    if offline:
        checks.append(Check("ok", "hub reachable", "not checked (offline mode)"))
    elif not network:
        checks.append(Check("ok", "hub reachable", "not checked (--no-network)"))
    else:
        reason = hub_unreachable_reason(endpoint)
        if reason is None:
            checks.append(Check("ok", "hub reachable", f"{endpoint} answered"))
        else:
            checks.append(
                Check(
                    "warning",
                    "hub reachable",
                    f"{endpoint} unreachable: {reason}",
                    "check the network or proxy (HTTPS_PROXY); to work from the local cache "
                    "only, export HF_HUB_OFFLINE=1",
                )
            )
    return checks
