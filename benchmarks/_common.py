"""Shared helpers of the CPU benchmarks: conv FLOP counting, peak RSS, worker subprocesses, markdown tables.

Each benchmark configuration runs in a fresh worker subprocess (``python SCRIPT --worker SPEC``) so that its peak
resident memory (``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that configuration alone; the contenders of a
configuration share that process and are interleaved step by step, so the noise of this shared 2-core machine
hits both alike and their *ratio* is meaningful even when the absolute seconds are not.

The worker's environment gets the glibc allocator setting measured on the development machine (glibc keeps freed
tensor memory instead of returning it to the OS, which otherwise causes page-fault storms; see
``benchmarks/RESULTS.md``) unless the caller already set ``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

ALLOCATOR_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
RESULT_PREFIX = "RESULT "


# ----------------------------------------------------------------------------------------------------------------
# FLOP counting


class ConvFlopCounter:
    """Counts the multiply-add FLOPs (2 per MAC) of every convolution that runs, grouped by network.

    Forward hooks see every conv call, including gradient-checkpoint recomputation during the backward pass. The
    backward cost of a call that builds a graph is charged at the call: one forward-sized GEMM for the input
    gradient if its input requires grad and one for the weight gradient if the layer has trainable parameters.
    So a frozen network the loss back-propagates *through* (VGG, the discriminator in the generator step) costs
    2× its forward, a trained network's first layer (input without grad) 2×, any other trained layer 3×, and a
    no-grad pass 1×. Recomputed forwards (run inside the backward pass) are charged as forward only.

    ``naive`` is the rule of thumb "3 × forward for anything that runs with grad enabled, 1 × otherwise".
    """

    def __init__(self, groups: dict[str, nn.Module]) -> None:
        self.groups = groups
        self.forward: dict[str, float] = dict.fromkeys(groups, 0.0)
        self.backward: dict[str, float] = dict.fromkeys(groups, 0.0)
        self.naive = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> ConvFlopCounter:
        for name, module in self.groups.items():
            for layer in module.modules():
                if isinstance(layer, _CONVS + _TRANSPOSED):
                    self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, group: str) -> Callable[..., None]:
        def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            kernel = math.prod(layer.kernel_size)
            if isinstance(layer, _TRANSPOSED):
                flops = 2.0 * kernel * (layer.out_channels // layer.groups) * inputs[0].numel()
            else:
                flops = 2.0 * kernel * (layer.in_channels // layer.groups) * output.numel()
            self.forward[group] += flops
            recompute = torch._C._current_graph_task_id() != -1  # inside backward: checkpoint recomputation
            if not torch.is_grad_enabled() or recompute:
                self.naive += flops if not recompute else 0.0
                return
            self.naive += 3 * flops
            input_grad = inputs[0].requires_grad
            # parameters() sees through spectral-norm parametrisations (weight.original) without recomputing them.
            weight_grad = any(p.requires_grad for p in layer.parameters())
            self.backward[group] += flops * (int(input_grad) + int(weight_grad))

        return hook

    @property
    def total(self) -> float:
        return sum(self.forward.values()) + sum(self.backward.values())

    def as_dict(self) -> dict[str, Any]:
        return {"forward": self.forward, "backward": self.backward, "total": self.total, "naive": self.naive}


# ----------------------------------------------------------------------------------------------------------------
# Memory, timing, environment

# The machine-state probe: Conv3d 64→64, 3×3×3, 32³, batch 1, forward; measured at 427 GFLOP/s fp32 and 888 bf16
# on the otherwise idle development machine (benchmarks/RESULTS.md). Its ratio to those says how fast the shared
# machine ran *today*.
CALIBRATION_REFERENCE = {"fp32": 427.0, "bf16": 888.0}


def _conv3d_rates(channels: int, size: int, batch: int, precision: str, repeats: int, *,
                  channels_last: bool = False) -> list[float]:
    """GFLOP/s of ``repeats`` forward calls (after one warm-up) of a 3×3×3 Conv3d ``channels``→``channels`` at
    ``size``³ and ``batch``."""
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    layer = nn.Conv3d(channels, channels, 3, padding=1).to(memory_format=memory_format)
    x = torch.rand(batch, channels, size, size, size).contiguous(memory_format=memory_format)
    flops = 2.0 * 27 * channels * channels * batch * size**3
    rates = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        layer(x)
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x)
            rates.append(flops / (time.perf_counter() - start) / 1e9)
    return rates


def calibrate(precision: str, repeats: int = 3) -> float:
    """GFLOP/s of the probe layer now (median of ``repeats`` after one warm-up call); about 0.2-1 s."""
    return median(_conv3d_rates(64, 32, 1, precision, repeats))


def measure_ceiling(precision: str, repeats: int = 3) -> float:
    """This machine's conv3d ceiling now: the best GFLOP/s of well-shaped 3×3×3 layers (32 ch @ 48³, 64 ch @ 32³,
    128 ch @ 16³; batch 2, channels-last 3D, oneDNN), each the best of ``repeats`` after a warm-up; about 2-5 s.

    Why measured and not a constant: the development notes (perf-cpu.md) give ~500 GFLOP/s fp32 for an AVX-512
    machine, while an AVX2-only machine of the same kind reaches ~140. A fraction of the wrong ceiling misleads.
    """
    return max(max(_conv3d_rates(channels, size, 2, precision, repeats, channels_last=True))
               for channels, size in ((32, 48), (64, 32), (128, 16)))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def environment_line() -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    allocator = "allocator fix on" if "mmap_threshold" in tunables else "allocator fix OFF (GLIBC_TUNABLES unset)"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, {allocator}, "
            f"load average {load}")


def worker_env(allocator_fix: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if allocator_fix and "GLIBC_TUNABLES" not in env:
        env["GLIBC_TUNABLES"] = ALLOCATOR_TUNABLES
    elif not allocator_fix:
        env.pop("GLIBC_TUNABLES", None)
    return env


def run_worker(script: str, spec: dict[str, Any], *, allocator_fix: bool = True) -> dict[str, Any]:
    """Run ``python SCRIPT --worker JSON`` in a fresh process; returns its result dict plus ``cpu_s``.

    The worker's stderr (progress) streams through; its last ``RESULT {...}`` stdout line is the result.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], env=worker_env(allocator_fix),
                          stdout=subprocess.PIPE, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise RuntimeError(f"worker {spec} failed with exit code {proc.returncode}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def emit_result(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def efficiency(gflop: float, seconds: float, ceiling_gflops: float) -> str:
    """``"123 (25.0 %)"``: achieved conv GFLOP/s and its fraction of the machine's ceiling (:func:`measure_ceiling`)."""
    rate = gflop / seconds if seconds > 0 else float("nan")
    return f"{rate:.0f} ({100 * rate / ceiling_gflops:.1f} %)"


def gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"
