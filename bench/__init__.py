"""Benchmarks (not tests): throughput, requests per run, planning speed and memory, overhead, rate discipline.

`python -m bench.run` (make bench) runs them all on the local stack and writes bench/results.json and .md.
"""
