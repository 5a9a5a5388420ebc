"""Stop signals for the long-running processes (the API and the dispatcher) and their supervisor.

Each process must get one stop signal, not several: a second one that arrives while its event loop is closing
breaks the clean exit with a traceback.  A terminal's Ctrl-C reaches every process of its group, so under
``python -m common run`` (which sets :data:`SUPERVISED`) the children leave SIGINT to the supervisor, which
sends each of them one SIGTERM.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import signal
from typing import Callable

SUPERVISED = "_SMSGATE_SUPERVISED"  # set by the supervisor; outside the settings' SMSGATE_* namespace
_PR_SET_PDEATHSIG = 1              # prctl(2): the signal a process gets when its parent dies


def handle_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM, and on SIGINT unless supervised (then SIGINT is ignored); ``stop`` may be
    called more than once and must be harmless the second time."""
    if os.environ.get(SUPERVISED):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, stop)
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def die_with_parent() -> None:
    """Have Linux send this process SIGTERM when its parent dies, even by SIGKILL (it survives exec).

    The supervisor calls it for itself (``make run`` killed) and in each child before exec: a child that ignores
    Ctrl-C would otherwise outlive a killed supervisor.  Elsewhere than on Linux it does nothing.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover  # not Linux
        pass
