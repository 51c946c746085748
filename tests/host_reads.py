"""Counting the host's reads of tensor values: on a GPU each one waits for every queued kernel to finish."""

from __future__ import annotations

import pytest
import torch

_READS = ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero", "unique", "cpu", "numpy")


def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that receives the name of every host read of a tensor (``bool(t)``, ``t.item()``, ``t.nonzero()``,
    ``torch.unique``, ...) until the test ends."""
    reads: list[str] = []

    def counted(name: str, method):
        def read(*args, **kwargs):
            reads.append(name)
            return method(*args, **kwargs)
        return read

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "unique", counted("unique", torch.unique))
    return reads
