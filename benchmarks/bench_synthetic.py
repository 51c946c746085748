"""Time :func:`recforge.data.datasets.synthetic.make_synthetic` and report its peak memory.

Usage: ``python benchmarks/bench_synthetic.py [--n-interactions 20000000] [--n-users N] [--n-items N]``.
Without sizes, users and items scale with the interactions (100 events per user, 400 per item), which gives
the 200k users x 50k items of the default 20M run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from recforge.data.datasets.synthetic import make_synthetic


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, warm the JIT on a tiny dataset, time one full-size run and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-interactions", type=int, default=20_000_000)
    parser.add_argument("--n-users", type=int, default=None, help="default: n_interactions / 100")
    parser.add_argument("--n-items", type=int, default=None, help="default: n_interactions / 400")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ratings", action="store_true")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    n = args.n_interactions
    n_users = args.n_users or max(1, n // 100)
    n_items = args.n_items or max(8, n // 400)

    # The first call loads (or compiles) the numba kernel; keep that out of the timing, but report it.
    t0 = time.perf_counter()
    make_synthetic(10, 10, 50)
    warmup = time.perf_counter() - t0
    rss_before = peak_rss_mib()

    t0 = time.perf_counter()
    data = make_synthetic(
        n_users, n_items, n, ratings=not args.no_ratings, seed=args.seed, progress=args.progress
    )
    seconds = time.perf_counter() - t0
    rss_peak = peak_rss_mib()

    rows = [
        ("interactions", f"{len(data):,}"),
        ("users", f"{n_users:,}"),
        ("items", f"{n_items:,}"),
        ("warm-up (JIT) s", f"{warmup:.2f}"),
        ("generation s", f"{seconds:.2f}"),
        ("interactions / s", f"{len(data) / seconds:,.0f}"),
        ("peak RSS MiB", f"{rss_peak:,.0f}"),
        ("peak RSS before MiB", f"{rss_before:,.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>14}")


if __name__ == "__main__":
    main()
