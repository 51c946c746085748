"""recforge: build, evaluate, simulate and serve recommender systems."""

__version__ = "0.2.0"

from recforge.data import Interactions
from recforge.errors import RecforgeError

__all__ = ["Interactions", "RecforgeError", "__version__"]
