"""Process settings of the plug-in: the routes' mode for a run, and glibc's malloc."""

from __future__ import annotations

import ctypes
import platform

from . import autotune


def enable(kernels: str = "auto") -> None:
    """Start a run's routes: `kernels` "auto" (measured) or "off" (PyTorch's operators), and only this run's
    decisions in memory (a checkpoint records them; a resumed run takes them again through `RoutesCallback`)."""
    autotune.configure(kernels)
    autotune.reset()


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than hand it back to the OS.

    Its defaults serve blocks above a (self-adjusting) threshold with fresh `mmap`s and trim the heap top when
    it is freed, so a training step that frees and re-allocates the same activation buffers page-faults them
    all in again (about 40,000 faults and 0.2 s of kernel time per unet_cifar10 bf16 step at batch 16 on a
    2-core CPU, 20% of the step). With both thresholds raised, the process keeps its peak heap and reuses it.
    Returns False (and changes nothing) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1))
