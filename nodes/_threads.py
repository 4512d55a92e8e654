"""Daemon threads for sync tool calls, kept idle for the next call instead of started anew.

A sync tool with a timeout runs on a daemon thread of its own, so a hung call never delays or
starves another call, and a call reported as timed out was already running, never waiting in a
queue. Starting a thread per call costs a thread start and a wait for the OS to schedule it;
`start_daemon` hands the call to an idle thread when one is waiting, else starts a new one. A
call never waits for a busy thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

__all__ = ["start_daemon"]

_KEEP = 8
"""Idle threads kept at most."""
_IDLE = 30.0
"""Seconds an idle thread waits for a call before it ends."""

_idle: list[queue.SimpleQueue[Callable[[], None]]] = []
_lock = threading.Lock()


def start_daemon(call: Callable[[], None], name: str) -> None:
    """Run `call` on a daemon thread named `name`: an idle one, or a new one."""
    with _lock:
        inbox = _idle.pop() if _idle else None
    if inbox is None:
        inbox = queue.SimpleQueue()
        threading.Thread(target=_serve, args=(inbox,), name=name, daemon=True).start()
    inbox.put(lambda: _named(call, name))


def _named(call: Callable[[], None], name: str) -> None:
    threading.current_thread().name = name
    call()


def _serve(inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        try:
            call = inbox.get(timeout=_IDLE)
        except queue.Empty:
            with _lock:
                if inbox in _idle:  # nobody took this thread meanwhile: end it
                    _idle.remove(inbox)
                    return
            continue  # a call is on its way
        call()  # the callers' targets catch everything they raise
        with _lock:
            if len(_idle) >= _KEEP:
                return
            _idle.append(inbox)
