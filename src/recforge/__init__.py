"""recforge: build, evaluate, simulate and serve recommender systems."""

__version__ = "0.1.0"

from recforge.data import Interactions  # noqa: E402
from recforge.errors import RecforgeError  # noqa: E402

__all__ = ["Interactions", "RecforgeError", "__version__"]
