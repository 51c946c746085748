"""Exceptions raised by recforge.

Every error a user can trigger with bad input derives from :class:`RecforgeError`, so applications and the CLI
can catch one class and show its message, which always names the problem and, where there is one, the fix.
"""

from __future__ import annotations


class RecforgeError(Exception):
    """Base class of every error recforge raises on purpose."""


class DataError(RecforgeError, ValueError):
    """Input data is malformed: a missing column, NaN or empty ids, an unreadable file, bad values."""


class ParameterError(RecforgeError, ValueError):
    """A hyper-parameter or setting is out of range, of the wrong type or unknown; the message names the model,
    the parameter and what is allowed."""


class EmptyDatasetError(DataError):
    """A dataset has no interactions (for example after filtering)."""


class DuplicateInteractionError(DataError):
    """Duplicate (user, item) rows were found while the duplicate policy is ``"raise"``."""


class UnknownNameError(RecforgeError, KeyError):
    """A name (model, dataset, metric, split protocol) is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class UnknownModelError(UnknownNameError):
    """No model is registered under the given name."""


class UnknownDatasetError(UnknownNameError):
    """No dataset is registered under the given name and no such path exists."""


class UnknownIdError(RecforgeError, KeyError):
    """Ids (users or items) that the id map or the fitted model has never seen."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFittedError(RecforgeError, RuntimeError):
    """A model method that needs a fitted model was called before ``fit``."""


class ArtifactError(RecforgeError):
    """A saved model artifact is missing, incomplete, of an unknown format version or of another model."""


class StorageError(RecforgeError):
    """A folder or file recforge must write to cannot be used (a file where a folder belongs, no permission)."""


class DownloadError(RecforgeError):
    """A dataset download failed or its checksum did not match."""


class UnsupportedError(RecforgeError):
    """The model cannot do what was asked (e.g. an incremental update of a model without one)."""
