"""The local Functions host with its invocations profiled, for the overhead benchmark.

    python -m bench.profiled_host --settings FILE --port P --function-key K --stats FILE [--timer cpu|wall]
                                  [--only FUNCTION] [--one-at-a-time]

Same CLI and behaviour as `python -m tools.local_host` (real host.json queue options, worker pools of
PYTHON_THREADPOOL_THREAD_COUNT threads). Every invocation run on a worker pool (or only those of --only) runs
under cProfile on its worker thread, an asynchronous function's event loop under one profiler for its life (one
"invocation" in the counts), and the merged statistics go to --stats when the host stops (SIGTERM).

--timer cpu (the default) times each function by its thread's CPU time (time.thread_time): concurrent
invocations then add up to the CPU they cost, without the waits (Table round trips, the Autopilot call, the
pacer's sleep, the GIL). --timer wall shows those waits, and is best read with --one-at-a-time (batchSize 1,
newBatchThreshold 0), since concurrent invocations under a wall-clock profiler mostly measure each other.
The host also logs how much of its process CPU the profiled invocations account for (the rest is the queue
pollers, the HTTP server, logging and the interpreter), as `profiled CPU: X s of Y s` when it stops.
"""

from __future__ import annotations

import cProfile
import logging
import os
import pstats
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from tools import local_host
from tools.local_host import LocalHost, QueueOptions, host_parser, load_app, serve

log = logging.getLogger("profiled_host")
TIMERS = {"cpu": time.thread_time, "wall": time.perf_counter}


class Profiles:
    def __init__(self, timer: str, only: str | None):
        self.timer, self.only = TIMERS[timer], only
        self._lock = threading.Lock()
        self.stats: pstats.Stats | None = None
        self.cpu = 0.0  # thread CPU seconds spent inside profiled invocations
        self.invocations = 0

    def wrap(self, fn):
        if self.only and getattr(fn, "__name__", "") != self.only:
            return fn

        def profiled(*args, **kwargs):
            profiler = cProfile.Profile(self.timer)
            cpu = time.thread_time()
            try:
                return profiler.runcall(fn, *args, **kwargs)
            finally:
                self._merge(profiler, time.thread_time() - cpu)

        return profiled

    def _merge(self, profiler: cProfile.Profile, cpu: float) -> None:
        with self._lock:
            self.cpu += cpu
            self.invocations += 1
            if self.stats is None:
                self.stats = pstats.Stats(profiler)
            else:
                self.stats.add(profiler)


def _profiling_pool(profiles: Profiles):
    class Pool(ThreadPoolExecutor):
        """The worker pools (thread_name_prefix "worker...") profile what they run; the pollers' pools do not."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._profiled = (kwargs.get("thread_name_prefix") or "").startswith("worker")

        def submit(self, fn, /, *args, **kwargs):
            return super().submit(profiles.wrap(fn) if self._profiled else fn, *args, **kwargs)

    return Pool


class ProfiledHost(LocalHost):
    """Coroutine functions (send_batch) run on an event loop per function: that loop's thread runs under one
    profiler for its whole life (the storage calls they hand to shared.runtime.blocking's pool are not profiled)."""

    def __init__(self, profiles: Profiles, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.profiles = profiles

    def _run_loop(self, loop) -> None:
        self.profiles.wrap(loop.run_forever)()


def main(argv: list[str] | None = None) -> None:
    parser = host_parser(__doc__.splitlines()[0])
    parser.add_argument("--stats", required=True, type=Path)
    parser.add_argument("--timer", choices=sorted(TIMERS), default="cpu")
    parser.add_argument("--only", help="profile only this function (its Python name, e.g. send_batch)")
    parser.add_argument("--one-at-a-time", action="store_true", help="batchSize 1, newBatchThreshold 0")
    args = parser.parse_args(argv)
    app, values = load_app(args)
    profiles = Profiles(args.timer, args.only)
    local_host.ThreadPoolExecutor = _profiling_pool(profiles)
    options = QueueOptions.from_host_json()
    if args.one_at_a_time:
        options = replace(options, batch_size=1, new_batch_threshold=0)
    host = ProfiledHost(profiles, app, values, port=args.port, function_key=args.function_key, options=options)
    serve(host, "local host listening on {url}/api (profiling " + (args.only or "every invocation") +
          f", {args.timer} timer, worker threads {host.threads})")
    times = os.times()
    print(f"profiled CPU: {profiles.cpu:.3f} s of {times.user + times.system:.3f} s in "
          f"{profiles.invocations} invocations", flush=True)
    if profiles.stats is not None:
        profiles.stats.dump_stats(args.stats)


if __name__ == "__main__":
    main()
