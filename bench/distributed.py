"""One run on several processes: ``torchrun --nproc_per_node N -m bench run ...``.

Every rank builds the same model from the same seed; each step's global batch (the protocol's
batch size) is split between the ranks and the method trains inside
``torch.nn.parallel.DistributedDataParallel`` (``data_parallel``), whose bucketed all-reduce averages
the gradients while backward runs, so parameters stay identical on every rank. BatchNorm statistics
are averaged over the ranks at every checkpoint and before evaluation; with ``train.sync_bn`` (on by
default for real-data protocols) the BatchNorm layers become SyncBatchNorm on CUDA, normalising with
the statistics of the global batch.
Evaluation is sharded over the ranks and its confusion matrices are summed. Rank 0 alone writes
records, checkpoints and logs. Methods reduce their own cross-image state with ``all_reduce_sum``
and ``all_gather_cat`` (both are the identity in a single process).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (a new tensor; the input itself in one process)."""
    if not active():
        return tensor
    out = _on_backend(tensor).clone()
    dist.all_reduce(out)
    return out.to(tensor.device)


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    """NCCL moves CUDA tensors only: a CPU tensor (a method's counts, evaluation's per-image
    matrices) goes through this rank's GPU."""
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        return tensor.to("cuda", non_blocking=False)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (any number per rank), in rank order."""
    if not active():
        return tensor
    mine = _on_backend(tensor)
    n = torch.tensor([mine.shape[0]], device=mine.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
    padded[:mine.shape[0]] = mine
    parts = [torch.zeros_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]).to(tensor.device)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, on every rank."""
    if not active():
        return flag
    t = _on_backend(torch.tensor([int(flag)]))
    dist.broadcast(t, 0)
    return bool(t.item())


def data_parallel(module: torch.nn.Module, trained: list[torch.nn.Parameter], device: torch.device,
                  find_unused: bool = False) -> torch.nn.Module:
    """What the training step runs through: ``module`` itself in one process; under torchrun, the
    module in ``DistributedDataParallel``, which averages the gradients of ``trained`` over the ranks
    in buckets, all-reduced while backward is still running.

    Only ``trained`` (the stage's optimiser parameters) is synchronised: every other parameter (a
    frozen teacher, another stage's network) is left to DDP's ignore list, so a stage that trains
    one network of several needs no search for unused parameters. ``find_unused``: some steps leave
    trained parameters without a gradient (a loss term that is skipped); DDP then walks the graph
    after each forward, and a parameter no rank used keeps no gradient, as in one process.
    Buffers are not broadcast (BatchNorm statistics are averaged at checkpoints and before
    evaluation, or synchronised by SyncBatchNorm); the wrapper adds no prefix to ``module``'s state
    dict, which callers keep saving, so checkpoints are the same for 1 and N processes."""
    if not active():
        return module
    keep = {id(p) for p in trained}
    ignored = [name for name, p in module.named_parameters() if id(p) not in keep]
    # the public constructor has no ignore argument; this static helper is how torch's own wrappers set it
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    on_gpu = device.type == "cuda"
    return DistributedDataParallel(module, device_ids=[device] if on_gpu else None,
                                   output_device=device if on_gpu else None, broadcast_buffers=False,
                                   find_unused_parameters=find_unused)


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
        # NCCL: on this rank's GPU (it would otherwise guess one, and warn)
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)
