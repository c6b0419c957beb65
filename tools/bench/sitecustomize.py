"""Seeded randomness for a load generator: copied into the inference-perf environment's
site-packages by ``igw_bench.peers.ensure`` and imported by every Python process started there.

inference-perf 0.7 seeds its data generators from ``base_seed`` but builds its arrival timers
with ``numpy.random.default_rng()`` (no seed: fresh OS entropy every time), so two runs of one
comparison get different burst patterns. When ``IGW_BENCH_SEED`` is set this module seeds
``random`` and numpy's legacy generator and makes an unseeded ``default_rng()`` deterministic:
the n-th unseeded call in a process gets the seed ``[IGW_BENCH_SEED, crc32(process name), n]``.
Calls with an explicit seed are untouched. Without the variable nothing happens (numpy is not
even imported).
"""

from __future__ import annotations

import os

_SEED = os.environ.get("IGW_BENCH_SEED")


def _install(seed: int) -> None:
    import itertools
    import multiprocessing
    import random
    import zlib

    random.seed(seed)
    try:
        import numpy.random as npr
    except ImportError:  # not a numpy environment: seeding ``random`` is all there is to do
        return
    npr.seed(seed % 2**32)
    original = npr.default_rng
    calls = itertools.count()

    def default_rng(seed_arg: object = None) -> object:
        if seed_arg is None:
            process = zlib.crc32(multiprocessing.current_process().name.encode())
            seed_arg = [seed % 2**32, process, next(calls)]
        return original(seed_arg)

    default_rng.__doc__ = original.__doc__
    npr.default_rng = default_rng  # type: ignore[assignment]


if _SEED:
    _install(int(_SEED))
