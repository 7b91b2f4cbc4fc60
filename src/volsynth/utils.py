"""Small shared helpers: atomic file writes inside a checked folder, file modes, and device choice.

Torch-free at import time, so the command line can answer ``--help`` and usage errors without loading torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from volsynth.errors import ConfigError, DeviceError, OutputError

if TYPE_CHECKING:
    import torch


def _read_umask() -> int:
    # os.umask can only be read by setting it: done once, at import (single-threaded), never from writer threads.
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _read_umask()


def normal_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would create (0644 under a 022 umask)."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (never half-written).

    The temporary name keeps the real suffix (``.nii.gz`` etc.) so writers that pick a format by extension work.
    The file gets the mode an ordinary write would give it (``mkstemp`` creates 0600, which hides reports and
    checkpoints from colleagues on a shared drive). ``fsync`` flushes the data to disk before the rename, so a
    power loss cannot leave a zero-length file under the final name (checkpoints use it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes[-2:]) if path.name.endswith(".gz") \
        else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, normal_file_mode())
            if fsync:
                with tmp.open("rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def inside(path: str | Path, folder: str | Path) -> Path:
    """``path`` resolved, after checking it lies inside ``folder`` (raises :class:`OutputError` otherwise).

    Every write path derived from user data (subject names, file names) goes through this, so a name such as
    ``../../x`` or ``/etc/x`` can never place a file outside the output folder.
    """
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if resolved != root and root not in resolved.parents:
        raise OutputError(f"{path}: refusing to write outside the output folder {folder}")
    return resolved


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory mapped (``mallopt``), before torch allocates anything.

    By default glibc returns large freed blocks to the OS, so every 3D convolution step page-faults its buffers
    back in (measured here: a small conv3d step 2–3× slower). This is what ``GLIBC_TUNABLES`` in the scripts does,
    done in-process so `volsynth` run from any shell gets it. Returns whether it applied (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or "musl" in name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        # 32 MiB is glibc's largest mmap threshold; freed blocks below it stay in the heap, and the heap is not
        # trimmed back to the OS.
        return bool(libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)) and bool(libc.mallopt(m_trim_threshold,
                                                                                                2**31 - 1))
    except (OSError, AttributeError):
        return False


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware computes bf16 natively: CUDA with bf16, or a CPU with AVX-512 BF16 / AMX.

    Elsewhere bf16 convolutions are emulated and 10–100× slower than fp32 (measured on an AVX2-only EPYC), so
    ``precision: auto`` must not pick them.
    """
    import re

    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` for ``device``. ``auto``: fp16 (+ loss scaling) on CUDA, fp32 on a CPU.

    Why not bf16 on CPUs that compute it natively: with torch 2.13 the CPU bf16 conv3d backward can return
    garbage weight gradients (huge, or NaN within a few steps of the flagship on an AVX-512 BF16 EPYC; see
    benchmarks/RESULTS.md), so CPU training stays in fp32 unless a config asks for bf16 explicitly.
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision fp16 needs CUDA; use bf16 (or fp32) on a CPU")
    return precision


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise ``torch.device(name)``, checked before any work.

    Raises:
        DeviceError: the name is not a device, or names a CUDA device this machine does not have.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device '{name}' is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{name}' requested but CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    elif device.type != "cpu":
        raise DeviceError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device
