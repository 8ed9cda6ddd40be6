"""Measured kernel choices: in which precision the sparse trainer chooses its latents.

Whether a bfloat16 or int8 matrix product beats float32 depends on the hardware and on torch's
kernels, not on a CPU flag: on an AVX512-BF16 EPYC the encoder product is ~2x faster in bfloat16
and ~4.5x in int8, on an AVX2-only CPU bfloat16 is emulated and ~5-10x slower while int8 is still
~2x faster, and a CPU flag says nothing about how either compares with the rest of a training
step. So the trainer times its own latent choice (`Transcoder.encode_sparse`) in each precision
of `transcoder.LATENT_CHOICES` (int8 for TopK only) on a batch of the run's shape, once per
machine, and caches the fastest in ``cache_dir()/calibration.json`` keyed by the device's model
name (and a digest of the CPU's flags and the instruction set torch's kernels may use), torch's
version, the threads and the shape. On a CPU the timings are the process's CPU seconds, the
measure the trainer is judged by and one that a busy machine barely moves (wall-clock time under
load once picked float32 over an int8 that is 1.4x faster); on a GPU they are wall-clock. Each is
the best of four rounds after a warm-up, the precisions taking turns within each round, on random
inputs of the run's shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from .files import atomic_write
from .models import cache_dir
from .transcoder import LATENT_CHOICES, Transcoder

__all__ = ["device_name", "fastest_latent_choice"]

CALIBRATION_FILE = "calibration.json"


def device_name(device: torch.device) -> str:
    """The model name of a CPU (from /proc/cpuinfo) or GPU, e.g. ``"AMD EPYC"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _instruction_sets(device: torch.device) -> str:
    """A short digest of the CPU's feature flags and of the instruction sets torch's kernels are
    allowed (part of the cache key only: machines sold under one model name, such as "AMD EPYC" in
    a virtual machine, differ in bfloat16 support, and ``ATEN_CPU_CAPABILITY`` or
    ``ONEDNN_MAX_CPU_ISA`` restrict what the kernels use on the same CPU)."""
    if device.type != "cpu":
        return ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    limits = "".join(f" {name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                                                                  "MKL_ENABLE_INSTRUCTIONS") if os.environ.get(name))
    return f"flags {hashlib.sha256(flags.encode()).hexdigest()[:8]}, kernels {torch.backends.cpu.get_cpu_capability()}{limits}"


def fastest_latent_choice(tc: Transcoder, n_tokens: int, *, cache: Path | None = None) -> str:
    """The precision (in `transcoder.LATENT_CHOICES`) in which ``tc.encode_sparse`` on
    ``n_tokens`` tokens runs fastest on ``tc``'s device: measured (CPU seconds on a CPU, best of 4
    rounds after a warm-up) on random inputs, or read from the cache of an earlier measurement with the same
    device model and CPU flags, torch version, threads and shape."""
    device = tc.device
    if device.type not in ("cpu", "cuda"):
        return "float32"
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    key = (f"{device.type}|{device_name(device)}|{_instruction_sets(device)}|torch {torch.__version__}|{threads} threads|"
           f"{n_tokens}x{tc.d_in}x{tc.n_latents}|{tc.config.activation} k={tc.config.k}")
    path = (cache or cache_dir()) / CALIBRATION_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    clock = "cpu" if device.type == "cpu" else "wall"
    if known.get(key, {}).get("clock") != clock:  # unmeasured, or measured by an earlier rule
        seconds = _time_encode_sparse(tc, n_tokens)
        known[key] = {"choice": min(seconds, key=seconds.get), "seconds": seconds, "clock": clock}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1)))
        except OSError:  # a read-only cache: measure again next time
            pass
    return str(known[key]["choice"])


@torch.no_grad()
def _time_encode_sparse(tc: Transcoder, n_tokens: int) -> dict[str, float]:
    """Best seconds (CPU seconds on a CPU, wall-clock on a GPU) of ``tc.encode_sparse`` per
    precision it can run in here (int8: TopK only, and only where ``torch._int_mm`` takes the shape
    on this device)."""
    x = torch.randn(n_tokens, tc.d_in, generator=torch.Generator().manual_seed(0)).to(tc.device)
    clock = time.process_time if tc.device.type == "cpu" else time.perf_counter
    choices = [c for c in LATENT_CHOICES if c != "int8" or tc.config.activation == "topk"]
    times: dict[str, list[float]] = {choice: [] for choice in choices}
    for round in range(5):  # the first is a warm-up
        for choice in [c for c in choices if c in times]:
            try:
                _synchronize(tc.device)
                start = clock()
                tc.encode_sparse(x, low_precision=choice)
                _synchronize(tc.device)
            except RuntimeError:  # no kernel for this precision and shape on this device
                del times[choice]
                continue
            if round:
                times[choice].append(clock() - start)
    return {choice: min(seconds) for choice, seconds in times.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
