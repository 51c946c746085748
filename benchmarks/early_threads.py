"""The ``--threads`` value of a benchmark script, read from ``sys.argv`` before numpy (or torch) is imported:
their thread pools are sized at import, so the environment variables must be set first. Standard library only, so
the peer scripts can use it from their own environments."""

from __future__ import annotations


def early_threads(argv: list[str], default: int) -> int:
    """The value of ``--threads N`` or ``--threads=N`` in ``argv``, else ``default``."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default
