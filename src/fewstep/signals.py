"""SIGTERM is Ctrl-C: what cluster schedulers and `timeout` send gets the same clean shutdown as SIGINT.

`interrupts()` makes both signals raise inside the main thread (SIGINT as KeyboardInterrupt, SIGTERM as
`Terminated`, a KeyboardInterrupt subclass), so every `except KeyboardInterrupt` cleanup (checkpoints, removal of
temporary files) runs for both. It also resets SIGINT to Python's default handler, so a process started with
SIGINT ignored (a background job of a non-interactive shell) can still be interrupted.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"received signal {signum}")


@contextmanager
def interrupts() -> Iterator[None]:
    """Within the block SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated; the previous handlers
    are restored afterwards. Does nothing outside the main thread (signals can only be handled there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
