"""spanfill's benchmark suite: the workloads of shared/BENCHMARKS.md, the peers that
solve them, and a runner that checks every output against :mod:`spanfill.reference`
before timing it.

Run ``python -m bench.run --help``; see ``bench/README.md``.
"""
