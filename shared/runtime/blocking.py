"""Blocking calls made from the asynchronous send path (Table, Blob and Queue storage, Key Vault: their SDK
clients are synchronous) run on a pool of threads of their own, never on the event loop: a storage request takes
milliseconds of a thread, while the seconds a request spends waiting for its slot and for the API's answer take
none."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

THREADS = 16  # the Azure Python worker's PYTHON_THREADPOOL_THREAD_COUNT as infra/ sets it
_pool = ThreadPoolExecutor(THREADS, thread_name_prefix="blocking")


async def off(function, *args: Any, **kwargs: Any):
    """Await `function(*args, **kwargs)` run on the blocking pool, with the caller's context variables."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, function, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
