"""Many threads, one storage write. Combiner: callers that arrive while a write is in flight are served together
by the next one (the senders of an instance take their rate budget's slots this way). Gatherer: callers within a
short window are written together by the first, and only it waits (the settled count of a run). Either way a
busy instance makes one conditional update where it would make one per thread (and lose most of them to each
other's ETags)."""

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
    item waiting when it starts. An exception from `apply` is raised to every caller it served."""

    def __init__(self, apply: Callable[[list[Item]], list[Result]]):
        self._apply = apply
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
        calls, self._waiting, self._busy = self._waiting, [], True
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


class Gatherer(Generic[Item, Result]):
    """`gatherer(item)`: the first caller waits `window` seconds, then returns `apply(items)` for every item that
    came in meanwhile (its own first); the others return None at once, their item in that call. Nothing is
    done outside a caller's own time, so a caller that dies in its window loses the items it gathered."""

    def __init__(self, apply: Callable[[list[Item]], Result], window: float):
        self._apply, self.window = apply, window
        self._lock = threading.Lock()
        self._gathering: list[Item] | None = None

    def __call__(self, item: Item) -> Result | None:
        with self._lock:
            if self._gathering is not None:
                self._gathering.append(item)
                return None
            self._gathering = items = [item]
        time.sleep(self.window)
        with self._lock:
            self._gathering = None
        return self._apply(items)
