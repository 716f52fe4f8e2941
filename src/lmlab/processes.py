"""Child processes that do not outlive their parent.

A worker pool or a torchrun whose parent was killed with SIGKILL would otherwise go on,
orphaned: holding memory, CPU and the parent's output pipes. On Linux the kernel can send a
child a signal when its parent dies (PR_SET_PDEATHSIG); elsewhere this does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import sys


def die_with_parent(sig: int = getattr(signal, "SIGKILL", signal.SIGTERM)) -> None:
    """Call in the child (a pool initializer, or a Popen preexec_fn): get `sig` when the
    parent dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig))
