"""A training step on two gloo processes (pytest-benchmark; the ratio to the reference is printed at
the end): ``DistributedDataParallel`` as the engine runs it (``bench.distributed.data_parallel``)
against the hand-written averaging it replaced (one flat all-reduce of every gradient after
backward, kept here as the reference). ``ce`` on the synth protocols' ResNet-18, the global batch
of 8 synth scenes at 96 px split 4 + 4, one thread per process.

Two ranks wait in worker processes for the main process to ask for a step; both step at once.
"""
import multiprocessing as mp

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from bench import distributed
from methods.ce import CE
from tests.benchmarks.conftest import synth_ctx


def flat_average_gradients(params):
    """The averaging the engine used before DDP: after backward, every gradient (zeros where a
    parameter has none) in one flat all-reduce, divided by the number of ranks."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _steps(rank, batch):
    """One step function per way of averaging, each on its own copy of the same network."""
    mine = {"labeled": {k: v[rank::2] for k, v in batch["labeled"].items()}}
    runs = {}
    for name in ("flat", "ddp"):
        torch.manual_seed(0)
        method = CE(CE.Config(), synth_ctx())
        method.train()
        params = [p for g in method.param_groups() for p in g["params"]]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        network = distributed.data_parallel(method, params, torch.device("cpu")) if name == "ddp" else method

        def step(method=method, network=network, params=params, opt=opt, name=name):
            out = network(mine, 10)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            if name == "flat":
                flat_average_gradients(params)
            opt.step()
            return float(out["loss"].detach())

        runs[name] = step
    return runs


def _rank(rank, init_file, batch, conn):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    steps = _steps(rank, batch)
    conn.send("ready")
    while (name := conn.recv()) is not None:
        conn.send(steps[name]())
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, semi_batch):
    ctx = mp.get_context("spawn")
    batch = {"labeled": semi_batch[0]["labeled"]}
    init_file = tmp_path_factory.mktemp("ddp") / "group"
    pipes, procs = [], []
    for rank in range(2):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_rank, args=(rank, init_file, batch, theirs), daemon=True)
        proc.start()
        pipes.append(mine)
        procs.append(proc)
    assert [p.recv() for p in pipes] == ["ready", "ready"]

    def step(name):
        for p in pipes:
            p.send(name)
        return [p.recv() for p in pipes]

    yield step
    for p in pipes:
        p.send(None)
    for proc in procs:
        proc.join(timeout=60)


@pytest.mark.parametrize("name", ["flat", "ddp"])
def test_two_process_step(benchmark, two_ranks, name):
    benchmark.group = "two-process-step"
    benchmark.extra_info["reference"] = name == "flat"
    losses = benchmark(two_ranks, name)
    assert all(np.isfinite(losses))
