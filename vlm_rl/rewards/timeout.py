"""A nestable wall-clock limit for reward code, so one slow reward or one pathological expression cannot hang a run.

It uses `SIGALRM`, which interrupts pure-Python loops, `time.sleep` and blocking socket calls alike (a thread
cannot be stopped from outside). Signals are delivered to the main thread only, where TRL calls rewards; in
another thread, or on a platform without `SIGALRM`, the code runs without a limit.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class RewardTimeout(BaseException):
    """Reward code ran past its time limit.

    A `BaseException`, like `KeyboardInterrupt`: math-verify, sympy and much user code catch `Exception`
    broadly, and would otherwise swallow the timeout and run on without a limit.
    """


def limits_supported() -> bool:
    """Whether `time_limit` can interrupt code here (main thread, a platform with `SIGALRM`)."""
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None, what: str = "reward code") -> Iterator[None]:
    """Raise `RewardTimeout` inside the block once `seconds` have passed; `None` or 0 means no limit.

    Limits nest: an inner limit never extends an outer one, and the outer one keeps running afterwards.
    """
    if not seconds or seconds <= 0 or not limits_supported():
        yield
        return
    outer_remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_remaining and outer_remaining <= seconds:
        yield  # the outer limit fires first anyway
        return

    active = True

    def expire(signum, frame):
        if active:  # an alarm handled after the block ended must not fail code that finished in time
            raise RewardTimeout(f"{what} ran past its time limit of {seconds:g} s")

    started = time.monotonic()
    outer_handler = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_remaining:
            # Re-arm the outer limit with what is left of it (at least a moment, so it still fires).
            signal.setitimer(signal.ITIMER_REAL, max(outer_remaining - (time.monotonic() - started), 1e-3))
