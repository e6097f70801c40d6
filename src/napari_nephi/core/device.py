"""Device choice and memory guards."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

import torch

from .errors import InputError, OutOfMemoryError


def available_devices() -> list[tuple[str, str]]:
    """(device string, human name) for every device this machine offers, best first."""
    out: list[tuple[str, str]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"cuda:{i}", f"cuda:{i} ({torch.cuda.get_device_name(i)})"))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append(("mps", "mps (Apple GPU)"))
    out.append(("cpu", "cpu"))
    return out


def choose_device(device: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``"auto"`` to cuda, then mps, then cpu; validate an explicit choice."""
    if isinstance(device, torch.device):
        return device
    if device is None or device == "auto":
        return torch.device(available_devices()[0][0])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {device!r} asked for, but no CUDA GPU is available; use 'auto' or 'cpu'.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"Device {device!r} asked for, but MPS is not available; use 'auto' or 'cpu'.")
    return dev


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release_free_memory(device: torch.device) -> None:
    """Hand memory freed by finished stages back to the system before a memory-heavy one.

    On CUDA that is the caching allocator's free blocks. On Linux (glibc) it is ``malloc_trim``:
    after a stage has freed many large tensors glibc keeps later, smaller ones on its heap instead
    of mapping them, and without a trim the freed pages stay resident through the next stage.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated bytes on a CUDA device since the last reset; None elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on ``device``: free GPU memory, or the system's available RAM.

    None when it cannot be told (MPS, a system without ``/proc/meminfo`` or ``sysconf``).
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed_bytes: float, device: torch.device, what: str, advice: str) -> None:
    """Raise :class:`OutOfMemoryError` before a run whose estimate ``needed_bytes`` does not fit.

    ``advice`` says what to do instead (a coarser level, the chunked mode, ...).
    """
    available = available_memory_bytes(device)
    if available is None or needed_bytes <= available:
        return
    where = "GPU" if device.type == "cuda" else "memory"
    raise OutOfMemoryError(
        f"The {what} needs about {format_bytes(needed_bytes)} but only {format_bytes(available)} of "
        f"{where} is free. {advice}"
    )


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB, or in MiB below one GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _is_allocation_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return "DefaultCPUAllocator" in text or "not enough memory" in text or "out of memory" in text


@contextlib.contextmanager
def memory_guard(what: str = "registration") -> Iterator[None]:
    """Turn device out-of-memory errors into :class:`OutOfMemoryError` with advice."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"The {what} ran out of GPU memory. Downsample the images, lower the number "
            "of sampled points, or run on device='cpu'."
        ) from exc
    except MemoryError as exc:
        if isinstance(exc, OutOfMemoryError):
            raise
        raise OutOfMemoryError(
            f"The {what} ran out of memory. Downsample the images or crop them to the region of interest."
        ) from exc
    except RuntimeError as exc:  # torch's CPU allocator raises a plain RuntimeError
        if not _is_allocation_failure(exc):
            raise
        raise OutOfMemoryError(
            f"The {what} ran out of memory. Downsample the images or crop them to the region of interest."
        ) from exc
