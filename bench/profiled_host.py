"""The local Functions host with every queue-triggered invocation profiled, for the overhead benchmark.

    python -m bench.profiled_host --settings FILE --port P --function-key K --stats FILE

Same CLI as `python -m tools.local_host`. Differences: one queue invocation at a time (batchSize 1,
newBatchThreshold 0), each `send_batch` invocation under cProfile (wall clock), and the merged statistics
written to --stats when the host stops (SIGTERM). One at a time because concurrent profiled invocations
mostly measure each other: they queue on the GIL and on the logging lock, and the profiler's slowdown makes
them miss their request slots and contend on the rate budget, which the unprofiled host does not do.
"""

from __future__ import annotations

import cProfile
import pstats
import threading
from dataclasses import replace
from pathlib import Path

from tools.local_host import LocalHost, QueueOptions, host_parser, load_app, serve

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
    parser = host_parser(__doc__.splitlines()[0])
    parser.add_argument("--stats", required=True, type=Path)
    args = parser.parse_args(argv)
    app, values = load_app(args)
    profiles = Profiles()
    options = replace(QueueOptions.from_host_json(), batch_size=1, new_batch_threshold=0)
    host = LocalHost(app, values, port=args.port, function_key=args.function_key, options=options)
    host.call = profiles.wrap(host.call)  # the pollers invoke functions through host.call
    serve(host, "local host listening on {url}/api (profiling " + PROFILED + ")")
    if profiles.stats is not None:
        profiles.stats.dump_stats(args.stats)


if __name__ == "__main__":
    main()
