"""Where torch work runs: CUDA when present, else the CPU (``RECFORGE_DEVICE`` overrides what ``"auto"`` picks); how
many CPU threads torch may use; mixed precision."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import torch

from recforge.core.gpu_environment import (  # DEVICE_ENV: re-exported, where the device is chosen
    CUBLAS_WORKSPACE_ENV,
    DEVICE_ENV,
    REPEATABLE_CUBLAS_WORKSPACE,
    fix_cublas_workspace,
)
from recforge.core.params import DEVICE_NAMES, device_name
from recforge.core.threads import resolve_threads
from recforge.errors import DeviceError

log = logging.getLogger(__name__)


def choose_cublas_workspace() -> bool:
    """Choose cuBLAS's repeatable workspace unless the environment did (:func:`fix_cublas_workspace`); True when
    that came after the process had started using a GPU, so cuBLAS may already run without it."""
    return fix_cublas_workspace() and torch.cuda.is_initialized()


#: Chosen when recforge's torch code is first imported, which is before its first GPU work (the command line chose
#: it even earlier).
CUBLAS_CHOSEN_LATE = choose_cublas_workspace()


@functools.cache
def _warn_cublas_chosen_late() -> None:
    log.warning("deterministic=True: this process used a GPU before %s was set, so cuBLAS may not repeat its sums; "
                "set %s=%s in the environment before the process starts (the recforge command does)",
                CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE_ENV, REPEATABLE_CUBLAS_WORKSPACE)


def is_auto(device: str | torch.device | None) -> bool:
    """Whether ``device`` leaves the choice to recforge (``None`` or ``"auto"``)."""
    return device is None or (isinstance(device, str) and device.strip().lower() == "auto")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``) picks ``$RECFORGE_DEVICE`` when set, else ``cuda`` when a GPU is visible and ``cpu``
    otherwise; other values are checked so a typo, a missing GPU or a GPU number beyond those present gives a clear
    error instead of a failure deep inside torch."""
    if is_auto(device):
        chosen = os.environ.get(DEVICE_ENV, "")
        if chosen.strip() and not is_auto(chosen):
            return _checked(chosen, f"{DEVICE_ENV}={chosen!r}")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _checked(device, f"device {device!r}")  # type: ignore[arg-type]


def loaded_device(device: str | torch.device | None) -> torch.device:
    """Where a loaded model's network goes: ``device`` when this machine has it, else where ``"auto"`` points,
    with a warning (an artifact saved with ``device="cuda"`` loads on a machine without a GPU)."""
    try:
        return resolve_device(device)
    except DeviceError as exc:
        if is_auto(device):
            raise
        log.warning("%s: the loaded model runs where device='auto' points", exc)
        return resolve_device("auto")


def ranking_device() -> torch.device | None:
    """Where full-catalogue ranking and top-k run: the GPU ``"auto"`` resolves to, or None for numba on the CPU
    (faster there than torch's sort-based top-k)."""
    device = resolve_device("auto")
    return device if device.type == "cuda" else None


def _checked(device: str | torch.device, what: str) -> torch.device:
    name = device_name(str(device)) if isinstance(device, (str, torch.device)) else None
    if name is None or name == "auto":
        raise DeviceError(f"{what}: a device must be {DEVICE_NAMES}")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{what} was asked for, but no CUDA GPU is available; use 'auto' or 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"{what} was asked for, but this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def free_gpu_bytes(device: torch.device) -> int:
    """Bytes a new allocation on the GPU ``device`` can take: what CUDA reports free plus what torch's caching
    allocator holds without using (CUDA counts that as taken, so a process that trained or ranked before would
    refuse work that fits)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def seed_torch(seed: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator and, for a GPU ``device``, that GPU's: ``torch.manual_seed`` reseeds every GPU of
    the process, whatever the caller was drawing there."""
    torch.random.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


@contextlib.contextmanager
def caller_rng_kept(device: torch.device) -> Iterator[None]:
    """Give torch's CPU generator, and ``device``'s when it is a GPU, their states back after the block."""
    cpu = torch.get_rng_state()
    gpu = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if gpu is not None:
            # after a capture CUDA invalidated, torch < 2.13 leaves the generator mid-capture and it may refuse: its
            # error must not hide the one that says why the training stopped
            with contextlib.suppress(RuntimeError):
                torch.cuda.set_rng_state(gpu, device)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within the block (when ``enabled``), torch runs deterministic kernels only, so a GPU run repeats with the
    same seed: cuBLAS with a fixed workspace, cuDNN without autotuning, deterministic index/scatter backward passes,
    and attention by the plain math kernel (the fused ones accumulate gradients in a varying order). An op without a
    deterministic kernel warns. Slower; settings are restored afterwards. CPU runs are repeatable without it."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if CUBLAS_CHOSEN_LATE:
        _warn_cublas_chosen_late()
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[int]:
    """Run a block with at most ``num_threads`` torch intra-op threads (0/None = all cores), then restore."""
    n = resolve_threads(num_threads)
    previous = torch.get_num_threads()
    if n != previous:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for mixed precision: bfloat16 on GPUs with bfloat16 arithmetic (compute capability 8.0,
    Ampere, and later), float16 on older ones, none on the CPU (CPU autocast is slower than float32 for these small
    models). Not ``torch.cuda.is_bf16_supported()``: it counts emulated bfloat16, so it says yes on a T4 or V100,
    and it asks about the current device, not ``device``."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
