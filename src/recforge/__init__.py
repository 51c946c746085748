"""recforge: build, evaluate, simulate and serve recommender systems."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recforge.errors import RecforgeError

__version__ = "0.2.0"

if TYPE_CHECKING:
    from recforge.data import Interactions


def __getattr__(name: str) -> Any:
    # Interactions pulls in pandas and scipy: imported on first use, so that `recforge --help` starts at once.
    if name == "Interactions":
        from recforge.data import Interactions

        return Interactions
    raise AttributeError(f"module 'recforge' has no attribute {name!r}")


__all__ = ["Interactions", "RecforgeError", "__version__"]
