"""Exceptions raised by recforge.

Every error a user can trigger with bad input derives from :class:`RecforgeError`, so applications and the CLI
can catch one class and show its message, which always names the problem and, where there is one, the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: How messages name a setting: as a Python argument, or (set by the CLI) as the command-line option.
_STYLE: ContextVar[str] = ContextVar("recforge_error_style", default="python")
#: Python arguments whose command-line option is not their name in kebab case.
_OPTIONS = {"timestamp_col": "--time-col"}


def setting(name: str) -> str:
    """Setting ``name`` as the user writes it: ``user_col`` in Python, ``--user-col`` under the CLI."""
    return _OPTIONS.get(name, "--" + name.replace("_", "-")) if _STYLE.get() == "cli" else name


def argument(name: str, value: str | None = None) -> str:
    """How a message tells the user to pass setting ``name`` (``value``: an example): ``user_col=...`` or
    ``on_unknown='warn'`` in Python, ``--user-col ...`` or ``--on-unknown warn`` under the CLI."""
    if _STYLE.get() == "cli":
        return f"{setting(name)} {value or '...'}"
    return f"{name}={'...' if value is None else repr(value)}"


@contextmanager
def settings_named_as_options() -> Iterator[None]:
    """Within this block, messages name settings as command-line options (the CLI runs its commands in one)."""
    token = _STYLE.set("cli")
    try:
        yield
    finally:
        _STYLE.reset(token)


class RecforgeError(Exception):
    """Base class of every error recforge raises on purpose."""


class DataError(RecforgeError, ValueError):
    """Input data is malformed: a missing column, NaN or empty ids, an unreadable file, bad values."""


class ParameterError(RecforgeError, ValueError):
    """A hyper-parameter or setting is out of range, of the wrong type or unknown; the message names the model,
    the parameter and what is allowed."""


class DeviceError(ParameterError):
    """A device name that is none, or a device this machine lacks (``device=``, ``--device``,
    ``$RECFORGE_DEVICE``): this machine's setting, never a dataset's or an artifact's fault."""


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
