"""One run on several processes: ``torchrun --nproc_per_node N -m bench run ...``.

Every rank builds the same model from the same seed; each step's global batch (the protocol's
batch size) is split between the ranks, gradients are averaged after backward, so parameters stay
identical on every rank. BatchNorm statistics are averaged over the ranks at every checkpoint and
before evaluation (``train.sync_bn: true`` converts to SyncBatchNorm instead, CUDA only).
Evaluation is sharded over the ranks and its confusion matrices are summed. Rank 0 alone writes
records, checkpoints and logs. Methods reduce their own cross-image state with ``all_reduce_sum``
and ``all_gather_cat`` (both are the identity in a single process).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def setup(device_name: str = "auto") -> None:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each rank takes its own GPU."""
    if active() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (a new tensor; the input itself in one process)."""
    if not active():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (any number per rank), in rank order."""
    if not active():
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, 0)
    return bool(t.item())


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over the ranks, in one flat all-reduce. A parameter without a gradient
    on this rank takes part with zeros, so every rank's optimiser sees the same gradients."""
    if not active():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world()
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def average_batchnorm_stats(module: torch.nn.Module) -> None:
    """Running mean and variance of every BatchNorm: the mean over the ranks."""
    if not active():
        return
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf)
                    buf /= world()


def barrier() -> None:
    if active():
        dist.barrier()
