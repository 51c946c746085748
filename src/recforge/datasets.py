"""Short import path for the dataset registry: ``recforge.datasets.load("ml-latest-small")``.

The implementation lives in :mod:`recforge.data.datasets`.
"""

from recforge.data.datasets import *
from recforge.data.datasets import __all__  # noqa: F401
