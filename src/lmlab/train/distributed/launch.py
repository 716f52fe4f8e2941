"""`lmlab train --nproc K` (and `lmlab bench --nproc K`): start torchrun for the user.

Runs `python -m torch.distributed.run --standalone --nproc_per_node K -m lmlab ARGS` on
this machine. torchrun's agent watches the workers: if one dies or fails, it stops the
others and exits non-zero, and this launcher adds one line saying what happened and
where the newest (complete, atomically written) checkpoint is.
For several machines, call torchrun yourself (docs/distributed.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from lmlab.errors import UserError
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


def launch(command: str, nproc: int, argv: list[str]) -> int:
    """Run `lmlab COMMAND ARGV` in `nproc` processes under torchrun; its exit status."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if under_torchrun():
        raise UserError("--nproc starts torchrun itself: drop it when running under torchrun")
    with tempfile.TemporaryDirectory(prefix="lmlab-launch-") as tmp:
        run_dir_file = Path(tmp) / "run_dir"
        env = {**os.environ, "LMLAB_RUN_DIR_FILE": str(run_dir_file)}
        # Share the cores out (torchrun's own default is one thread per worker).
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = torchrun_command(nproc, [command, *strip_nproc(argv)])
        # Ctrl-C reaches every process of the terminal; torchrun stops the workers and
        # this launcher stays to report.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            rc = subprocess.call(cmd, env=env)
        finally:
            signal.signal(signal.SIGINT, previous)
        run_dir = run_dir_file.read_text(encoding="utf-8") if run_dir_file.exists() else None
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
