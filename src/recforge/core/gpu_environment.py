"""Process-wide settings that must precede a process's first GPU work, and the variable that chooses the device,
kept free of torch so the command line can make and check them before anything imports it."""

from __future__ import annotations

import os

#: The environment variable that chooses the device of everything left at ``device="auto"`` (``cpu``, ``cuda``,
#: ``cuda:N``): the CLI's ``--device`` sets it, so trial workers and torchrun ranks inherit it.
DEVICE_ENV = "RECFORGE_DEVICE"

#: cuBLAS's workspace setting under which its kernels repeat run to run (torch's reproducibility notes); cuBLAS
#: reads it once, when the process first uses it.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
REPEATABLE_CUBLAS_WORKSPACE = ":4096:8"


def fix_cublas_workspace() -> bool:
    """Choose cuBLAS's repeatable workspace unless the environment already chose one; False when it had."""
    if CUBLAS_WORKSPACE_ENV in os.environ:
        return False
    os.environ[CUBLAS_WORKSPACE_ENV] = REPEATABLE_CUBLAS_WORKSPACE
    return True
