"""The local Functions host with every queue-triggered invocation profiled, for the overhead benchmark.

    python -m bench.profiled_host --settings FILE --port P --function-key K --stats FILE

Same CLI as `python -m tools.local_host`. Differences: one queue invocation at a time (batchSize 1,
newBatchThreshold 0), each `send_batch` invocation under cProfile (wall clock), and the merged statistics
written to --stats when the host stops (SIGTERM). One at a time because concurrent profiled invocations
mostly measure each other: they queue on the GIL and on the logging lock, and the profiler's slowdown makes
them miss their request slots and contend on the rate budget, which the unprofiled host does not do.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import pstats
import signal
import threading
from dataclasses import replace
from pathlib import Path

from tools.local_host import LocalHost, QueueOptions

PROFILED = "send_batch"


class Profiles:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stats: pstats.Stats | None = None

    def wrap(self, call):
        def profiled(name: str, **arguments):
            if name != PROFILED:
                return call(name, **arguments)
            profiler = cProfile.Profile()
            try:
                return profiler.runcall(call, name, **arguments)
            finally:
                self._merge(profiler)

        return profiled

    def _merge(self, profiler: cProfile.Profile) -> None:
        with self._lock:
            if self.stats is None:
                self.stats = pstats.Stats(profiler)
            else:
                self.stats.add(profiler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--function-key", required=True)
    parser.add_argument("--stats", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    values = json.loads(Path(args.settings).read_text())["Values"]
    from function_app import app

    profiles = Profiles()
    options = replace(QueueOptions.from_host_json(), batch_size=1, new_batch_threshold=0)
    host = LocalHost(app, values, port=args.port, function_key=args.function_key, options=options)
    host.call = profiles.wrap(host.call)  # the pollers invoke functions through host.call
    host.start()
    print(f"local host listening on {host.base_url}/api (profiling {PROFILED})", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    host.stop()
    if profiles.stats is not None:
        profiles.stats.dump_stats(args.stats)


if __name__ == "__main__":
    main()
