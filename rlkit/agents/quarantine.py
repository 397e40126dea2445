"""User code's standard streams while it runs: what it prints goes to stderr, stdin reads as empty.

stdout carries only OUT's path (SPEC.md), so a tool or an environment that prints must not reach
it, and one that calls `input()` must not block a run that nobody is typing into. Tools run in
threads (see `execution`), and a tool abandoned at its timeout may go on printing after its call has
returned, so the routing is per thread, not a process-wide `redirect_stdout`: while any quarantined
code runs (an abandoned thread included), `sys.stdout` and `sys.stdin` are proxies that send a
quarantined thread's writes to `sys.stderr` and give it an empty stdin, and hand every other thread
the streams that were there before. The last quarantined thread to finish puts those back.

Python-level only: a child process a tool starts inherits file descriptors 0 and 1 (a tool should
capture its subprocess's output anyway, to return it to the model).
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_local = threading.local()
_lock = threading.Lock()
_users = 0


class _Routed:
    """A stream that is `quarantined()` for quarantined threads and `original` for the others."""

    def __init__(self, original: Any, quarantined: Callable[[], Any]):
        self._original = original
        self._quarantined = quarantined

    def _target(self) -> Any:
        return self._quarantined() if getattr(_local, "depth", 0) else self._original

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._target())


def _install() -> None:
    """Wrap the current streams, unless they are wrapped already."""
    if not isinstance(sys.stdout, _Routed):
        sys.stdout = _Routed(sys.stdout, lambda: sys.stderr)
    if not isinstance(sys.stdin, _Routed):
        sys.stdin = _Routed(sys.stdin, io.StringIO)


def _uninstall() -> None:
    """Put the streams back, unless someone else has swapped them meanwhile (theirs stay)."""
    if isinstance(sys.stdout, _Routed):
        sys.stdout = sys.stdout._original
    if isinstance(sys.stdin, _Routed):
        sys.stdin = sys.stdin._original


@contextlib.contextmanager
def quarantined() -> Iterator[None]:
    """Run the block's user code with prints on stderr and an empty stdin (this thread only)."""
    global _users
    with _lock:
        _install()  # also when already in use: whoever swapped sys.stdout meanwhile (a test's capture) is wrapped
        _users += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _lock:
            _users -= 1
            if _users == 0:
                _uninstall()
