"""Seeded random numbers for numba kernels: independent xorshift64* streams, uniform integers, shuffles, hashes.

A fixed seed gives the same numbers on every machine, whatever numpy's global state: kernels take an array of
generator states (one per stream, e.g. one per thread chunk) made by :func:`seed_states` from ``(seed, stream)``,
and advance them in place. :func:`uniform_hash` gives a reproducible pseudo-random number per (seed, row,
column) that depends on nothing else (not on batching or call order).
"""

from __future__ import annotations

import numba as nb
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROW_MIX = np.uint64(0xD1B54A32D192ED03)


def seed_states(seed: int, stream: int, n: int) -> np.ndarray:
    """``n`` independent non-zero 64-bit generator states for ``(seed, stream)`` (e.g. stream = epoch)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stream) & 0xFFFFFFFF, n])
    states = ss.generate_state(n, dtype=np.uint64)
    states[states == 0] = _GOLDEN  # xorshift must not start at zero
    return states


@nb.njit(cache=True, inline="always")
def rand_u64(states: np.ndarray, t: int) -> np.uint64:
    """Next number of xorshift64* stream ``t`` (advances ``states[t]``)."""
    x = states[t]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    states[t] = x
    return x * np.uint64(2685821657736338717)


@nb.njit(cache=True, inline="always")
def rand_below(states: np.ndarray, t: int, n: int) -> int:
    """Uniform integer in ``[0, n)`` from stream ``t`` (32 high bits times ``n``: no modulo bias worth noting)."""
    return np.int64(((rand_u64(states, t) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@nb.njit(cache=True)
def shuffle_in_place(arr: np.ndarray, states: np.ndarray) -> None:
    """Fisher-Yates shuffle driven by stream 0 of ``states``."""
    for i in range(arr.shape[0] - 1, 0, -1):
        j = rand_below(states, 0, i + 1)
        tmp = arr[i]
        arr[i] = arr[j]
        arr[j] = tmp


@nb.njit(cache=True, inline="always")
def mix64(x: np.uint64) -> np.uint64:
    """The splitmix64 finaliser: a fast, well-distributed 64-bit hash."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@nb.njit(cache=True, parallel=True)
def _uniform_hash(seed: np.uint64, rows: np.ndarray, out: np.ndarray) -> None:
    scale = np.float32(1.0 / 2**24)
    for r in nb.prange(rows.shape[0]):
        base = mix64(seed * _GOLDEN + np.uint64(rows[r]) * _ROW_MIX)
        for j in range(out.shape[1]):
            out[r, j] = np.float32(mix64(base + np.uint64(j) * _GOLDEN) >> np.uint64(40)) * scale


def uniform_hash(seed: int, rows: np.ndarray, n_cols: int) -> np.ndarray:
    """A float32 block (len(rows) × n_cols) of numbers uniform in [0, 1), each a hash of (seed, row, column)."""
    out = np.empty((len(rows), n_cols), np.float32)
    _uniform_hash(np.uint64(int(seed) % 2**64), np.asarray(rows, dtype=np.int64), out)
    return out
