"""A first-come, first-served lock for threads that take turns on MLX.

``threading.Lock`` lets the thread that just released it take it straight back, so one
model's generation loop could starve another's in the same replica; a ticket lock hands
it to whoever asked first.
"""

from __future__ import annotations

import threading


class FairLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> FairLock:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._cond.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()
