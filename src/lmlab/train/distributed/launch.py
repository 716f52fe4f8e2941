"""`lmlab train --nproc K` (and `lmlab bench --nproc K`): start torchrun for the user.

Runs `python -m torch.distributed.run --standalone --nproc_per_node K -m lmlab ARGS` on
this machine. torchrun's agent watches the workers: if one dies or fails, it stops the
others and exits non-zero, and this launcher adds one line saying what happened and
where the newest (complete, atomically written) checkpoint is.
For several machines, call torchrun yourself (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from lmlab.errors import UserError
from lmlab.processes import die_with_parent
from lmlab.train.distributed.runtime import under_torchrun


def without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`argv` without the given options and their values (`--opt V` or `--opt=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(arg.startswith(f"{option}=") for option in options):
            out.append(arg)
    return out


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc K` / `--nproc=K`."""
    return without_options(argv, ("--nproc",))


def torchrun_command(nproc: int, lmlab_args: list[str]) -> list[str]:
    """The command line that runs `lmlab LMLAB_ARGS` in `nproc` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a private rendezvous on a free port
        f"--nproc_per_node={nproc}",
        "-m",
        "lmlab",
        *lmlab_args,
    ]


def available_workers(device: str = "auto") -> tuple[int, str]:
    """How many processes this machine runs side by side on `device`, and of what: one per
    GPU when the job trains on CUDA, else one per CPU core this process may use."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count(), "GPU(s)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1, "CPU core(s) and no GPU in use"


def check_nproc(nproc: int, device: str = "auto", force: bool = False) -> None:
    """Refuse K < 1, and (unless `force`) more processes than GPUs, or than CPU cores."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    present, what = available_workers(device)
    if nproc > present and not force:
        raise UserError(
            f"--nproc {nproc} is more processes than this machine has: {present} {what}; "
            f"use --nproc {max(present, 1)} or less, or add --force-nproc"
        )


def launch(
    command: str, nproc: int, argv: list[str], device: str = "auto", force: bool = False
) -> int:
    """Run `lmlab COMMAND ARGV` in `nproc` processes under torchrun; its exit status.

    torchrun runs in its own session, so a terminal's Ctrl-C reaches this launcher alone.
    The launcher passes a Ctrl-C or SIGTERM on to the workers as one SIGINT each: they stop
    at the same step, rank 0 saves and says how to continue, and every worker exits 0 (so
    torchrun ends quietly); the launcher then exits 130, as one process would. A second
    Ctrl-C stops everything at once. On Linux, torchrun is also stopped if the launcher
    itself is killed. `device` and `force` as `check_nproc` takes them."""
    check_nproc(nproc, device, force)
    if os.name != "posix":
        raise UserError(
            "--nproc needs Linux or macOS (process groups and signals); on Windows use WSL2, "
            "or start torchrun yourself (docs/windows.md)"
        )
    if under_torchrun():
        raise UserError("--nproc starts torchrun itself: drop it when running under torchrun")
    with tempfile.TemporaryDirectory(prefix="lmlab-launch-") as tmp:
        run_dir_file = Path(tmp) / "run_dir"
        env = {**os.environ, "LMLAB_RUN_DIR_FILE": str(run_dir_file), LAUNCHED: "1"}
        # Share the cores out (torchrun's own default is one thread per worker).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = torchrun_command(nproc, [command, *strip_nproc(argv)])
        job = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        signals = _Forwarder(job)
        try:
            rc = job.wait()
        finally:
            signals.restore()
        run_dir = run_dir_file.read_text(encoding="utf-8") if run_dir_file.exists() else None
    if signals.count:
        if signals.count > 1 or rc != 0:
            print(f"lmlab {command}: stopped", file=sys.stderr, flush=True)
        return 130
    if rc != 0:
        if run_dir and any(Path(run_dir).glob("checkpoints/step_*/meta.json")):
            where = (
                f"the newest complete checkpoint in {run_dir} is intact; continue with "
                f"`lmlab train --resume {run_dir} --nproc {nproc}`"
            )
        elif run_dir:
            where = (
                f"{run_dir} has no checkpoint yet; the first failure is in torchrun's report above"
            )
        else:
            where = "the first failure is in torchrun's report above"
        print(
            f"lmlab {command}: a worker process failed or was stopped (torchrun exit status {rc}); "
            f"all {nproc} processes have been stopped. {where[0].upper() + where[1:]}",
            file=sys.stderr,
            flush=True,
        )
    return rc


LAUNCHED = "LMLAB_LAUNCHED"
"""Set in the workers `launch` starts: a worker stopped by a signal exits 0 there."""


def launched() -> bool:
    """True in a worker that `lmlab ... --nproc K` started."""
    return os.environ.get(LAUNCHED) == "1"


class _Forwarder:
    """SIGINT / SIGTERM handlers for the launcher: the first is passed on to the workers,
    a second stops the whole job at once."""

    def __init__(self, job: subprocess.Popen):
        self.job, self.count = job, 0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.count += 1
        workers = _children(self.job.pid) if self.count == 1 else []
        if workers:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)
        else:  # still starting, or asked twice: nothing to save, stop it all now
            for pid in [*_children(self.job.pid), self.job.pid]:  # each leads its own group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc; empty elsewhere)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _die_with_parent() -> None:
    """In torchrun, before exec: on Linux, SIGTERM when the launcher dies (torchrun then
    stops its workers, which save as they would on SIGTERM)."""
    die_with_parent(signal.SIGTERM)
