"""Many threads, one storage write: callers that arrive while a write is in flight are served together by the
next one. The senders of an instance use it for the rate budget's slots and, lingering a moment before each write
to gather more, for their run's settled count: a busy instance makes one conditional update where it would make
one per thread (and lose most of them to each other's ETags). Every caller waits for the write that serves it, so
a crash before that write loses no item whose caller has returned."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Call(Generic[Item, Result]):
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: Item):
        self.item, self.result, self.error, self.done = item, None, None, False


class Combiner(Generic[Item, Result]):
    """`combiner(item)` returns `apply(items)[i]` for its item, `apply` called by one caller at a time for every
    item waiting when it starts (`linger` s after the caller that serves them arrived). An exception from `apply`
    is raised to every caller it served."""

    def __init__(self, apply: Callable[[list[Item]], list[Result]], linger: float = 0.0):
        self._apply, self.linger = apply, linger
        self._cond = threading.Condition()
        self._waiting: list[_Call] = []
        self._busy = False

    def __call__(self, item: Item) -> Result:
        call = _Call(item)
        with self._cond:
            self._waiting.append(call)
            while not call.done:
                if self._busy:
                    self._cond.wait()
                else:
                    self._serve()
        if call.error is not None:
            raise call.error
        return call.result

    def _serve(self) -> None:
        """Called holding the condition: apply every waiting item, with the condition released meanwhile."""
        self._busy = True
        if self.linger:
            self._cond.release()
            time.sleep(self.linger)  # others arriving meanwhile join this write
            self._cond.acquire()
        calls, self._waiting = self._waiting, []
        self._cond.release()
        try:
            results = self._apply([c.item for c in calls])
            for call, result in zip(calls, results, strict=True):
                call.result = result
        except Exception as exc:  # handed to every caller it served
            for call in calls:
                call.error = exc
        finally:
            self._cond.acquire()
            self._busy = False
            for call in calls:
                call.done = True
            self._cond.notify_all()

