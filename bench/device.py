"""Where a process computes, and how much of the machine it may use: the one home of device choice.

``resolve_device`` turns ``--device`` into a device (the sweep, ``bench eval``/``predict``);
``rank_device`` gives each torchrun rank its own GPU; ``gpu_slots`` hands the local launcher's
workers whole GPUs (or CPU slots); ``available_cores`` and ``threads_per_worker`` size CPU work
(loader workers, ``bench data check``, CPU workers' threads); ``describe_device`` is what a record
says it ran on; ``amp_context`` and ``to_device`` are how a batch reaches it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from bench import BenchError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device {name!r} asked for, but CUDA is not available here (use --device cpu)")
    if name != "cpu" and not name.startswith("cuda"):
        raise BenchError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes its own GPU (LOCAL_RANK); otherwise ``device`` itself."""
    from bench import distributed

    if distributed.active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def gpu_slots(device: str, workers: int | None) -> list[int | None]:
    """The local launcher's slots, one per worker: a GPU index (from CUDA_VISIBLE_DEVICES) or None
    for a CPU worker."""
    if workers is not None and workers < 1:
        raise BenchError(f"--workers must be at least 1, got {workers}")
    resolve_device(device)  # an unknown name, or CUDA asked for where there is none: its own clear error
    if device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [int(g) for g in gpus.split(",") if g.strip()] if gpus else list(range(torch.cuda.device_count()))
        return ids[:workers] if workers else ids
    if device not in ("auto", "cpu"):
        raise BenchError(f"--launcher local pins whole devices; use --device auto, cuda or cpu (got {device!r})")
    return [None] * (workers or 1)


def available_cores(per_local_process: bool = False) -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a slurm or taskset allotment);
    with ``per_local_process``, its share when torchrun runs LOCAL_WORLD_SIZE processes here."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    if per_local_process:
        cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores)


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` CPU processes sharing this machine: several torch
    processes on few cores slow each other down far more than their number if each takes them all."""
    return max(1, available_cores() // workers)


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere ``platform.processor()``), None if unknown.
    Two CPUs can round the same float sums differently, so a record names it beside its threads."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    import platform

    return platform.processor() or None


def describe_device(device: torch.device) -> str:
    """What a record says it ran on: "cuda:0 (NVIDIA H100 ...)" or "cpu (2 threads, AMD EPYC)"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = cpu_model()
    return f"cpu ({torch.get_num_threads()} threads{', ' + model if model else ''})"


def cpu_bf16_fast() -> bool:
    """Whether oneDNN has a bf16 path on this CPU (AVX-512, natively with AVX512-BF16 or AMX).
    Without one, torch's fallback makes a bf16 step many times slower than fp32 (about 11x for the
    synth ce step with oneDNN switched off)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: assume the fast path
        return True


def amp_context(device: torch.device, enabled: bool, cpu: bool = False):
    """bf16 autocast on CUDA where supported (no loss scaling needed), fp16 otherwise; on the CPU
    only when ``cpu`` (``train.cpu_amp``): bf16, which needs no loss scaling either."""
    if device.type == "cpu" and cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    if device.type != "cuda" or not enabled:
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return torch.autocast("cuda", dtype=dtype), scaler


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
