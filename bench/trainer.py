"""The training loop: every stage of a method, poly LR, AMP, checkpoints and exact resume.

Kept in the spirit of torchvision's ``references/segmentation``: one explicit loop."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bench import BenchError, distributed
from bench.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from bench.data.views import make_loader
from bench.device import amp_context, to_device
from bench.method import Method
from bench.protocol import TrainSpec
from bench.telemetry import LOG_EVERY, RunLog, children_cpu_seconds, load_average


def build_optimizer(groups: list[dict], spec: TrainSpec) -> torch.optim.Optimizer:
    o = spec.optimizer
    for g in groups:
        g.setdefault("lr_mult", 1.0)
        name = g.get("name")
        if name is not None and name != "backbone" and not name.endswith("_backbone"):
            g["lr_mult"] *= spec.head_lr_mult
        g["lr"] = o.lr * g["lr_mult"]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)


class Trainer:
    """Runs every stage of a method, checkpointing to ``ckpt_path`` and resuming from it."""

    def __init__(self, method: Method, views: dict[str, tuple], spec: TrainSpec, device: torch.device,
                 seed: int, ckpt_path: Path, config_hash: str, progress: bool = True, log: RunLog | None = None,
                 validate=None, eval_every: int | None = None):
        """``log``: telemetry (``metrics.jsonl``); ``validate``: a callable returning evaluation metrics,
        called every ``eval_every`` steps of the method's last stage (the one that trains what
        ``predict`` uses), its mIoU logged and the best one kept in ``self.telemetry["best"]``."""
        self.method, self.views, self.spec, self.device = method, views, spec, device
        self.seed, self.ckpt_path, self.config_hash, self.progress = seed, ckpt_path, config_hash, progress
        self.log, self.validate, self.eval_every = log, validate, eval_every
        self.elapsed_s, self.images_seen = 0.0, 0
        self.done_stages: list[str] = []
        self.resumed_from: int | None = None
        self.not_workers: set[int] = set()  # child pids that are no loader worker (_run_stage)
        # kept in the checkpoint, so a resumed run's telemetry continues where the checkpoint was taken
        self.telemetry = {"iteration": 0, "cpu_s": 0.0, "images_by_view": {name: 0 for name in views},
                          "load_sum": 0.0, "load_n": 0, "load_max": None, "best": None, "validations": 0,
                          "log_offset": 0, "window": None,
                          # loader workers' CPU seconds: of exited workers, and of live ones by pid (None:
                          # not measurable here, no /proc)
                          "workers_cpu_done": 0.0, "workers_cpu_live": {}}

    def _checkpoint(self, stage_index: int, step: int, optimizer, scaler) -> None:
        distributed.average_batchnorm_stats(self.method)  # every rank saves and evaluates the same state
        if not distributed.is_main():
            return
        save_atomic({
            "config_hash": self.config_hash, "stage_index": stage_index, "step": step,
            "done_stages": list(self.done_stages), "method": self.method.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "rng": rng_state(), "elapsed_s": self.elapsed_s, "images_seen": self.images_seen,
            "telemetry": {**self.telemetry, "log_offset": self.log.offset() if self.log else 0},
        }, self.ckpt_path)

    def run(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt is not None and ckpt["config_hash"] != self.config_hash:
            raise BenchError(f"checkpoint {self.ckpt_path} belongs to another config; delete it to start over")
        if ckpt is not None:
            self.method.load_state_dict(ckpt["method"])
            self.done_stages = list(ckpt["done_stages"])
            self.elapsed_s, self.images_seen = ckpt["elapsed_s"], ckpt["images_seen"]
            self.telemetry.update(ckpt.get("telemetry", {}))  # checkpoints from before telemetry lack it
            t = self.telemetry
            if t["workers_cpu_live"] is not None:  # the interrupted process's workers are gone
                t["workers_cpu_done"] += sum(t["workers_cpu_live"].values())
                t["workers_cpu_live"] = {}
        if self.log is not None and distributed.is_main():
            self.log.start(self.telemetry["log_offset"] if ckpt is not None else 0, self.telemetry["iteration"])
        self._sample_load()
        for index, stage in enumerate(self.method.stages()):
            if stage.name in self.done_stages:
                continue
            if self.method.skip_stage(stage):
                self.done_stages.append(stage.name)
                continue
            resume = ckpt if ckpt is not None and ckpt["stage_index"] == index else None
            self._run_stage(index, stage, resume, last=index == len(self.method.stages()) - 1)
            ckpt = None
        if self.log is not None:
            self.log.close()

    def _accumulate(self, out: dict, batch_sizes: dict[str, int], seconds: float) -> None:
        """Add one step's scalar parts (one device sync for all), images and time to the window."""
        names = [k for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1]
        device = out["loss"].device
        values = torch.stack([out[k].detach().float().reshape(()).to(device) for k in names]).tolist() if names else []
        values += [float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        names += [k for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        w = self.telemetry["window"] or {"n": 0, "seconds": 0.0, "sums": {}, "images": {k: 0 for k in batch_sizes}}
        w["n"], w["seconds"] = w["n"] + 1, w["seconds"] + seconds
        for k, v in zip(names, values):
            w["sums"][k] = w["sums"].get(k, 0.0) + v
        for k, bs in batch_sizes.items():
            w["images"][k] += bs
            self.telemetry["images_by_view"][k] = self.telemetry["images_by_view"].get(k, 0) + bs
        self.telemetry["window"] = w

    def _sample_load(self) -> None:
        load, t = load_average(), self.telemetry
        if load is not None:
            t["load_sum"], t["load_n"] = t["load_sum"] + load, t["load_n"] + 1
            t["load_max"] = load if t["load_max"] is None else max(t["load_max"], load)

    def _sample_workers(self) -> None:
        """Add up the loader workers' CPU time (sampled every logging window and at a stage's end,
        so a worker's last few steps before it exits may be missed): what the run's own load was."""
        t, now = self.telemetry, children_cpu_seconds()
        if now is None or t["workers_cpu_live"] is None:
            t["workers_cpu_live"] = None
            return
        now = {pid: seconds for pid, seconds in now.items() if pid not in self.not_workers}
        live = t["workers_cpu_live"]
        for pid, seconds in list(live.items()):
            if now.get(int(pid), -1.0) < seconds:  # exited (or its pid now belongs to a new worker)
                t["workers_cpu_done"] += live.pop(pid)
        live.update({str(pid): seconds for pid, seconds in now.items()})

    def workers_cpu_s(self) -> float | None:
        """The loader workers' CPU seconds during training so far, None where not measurable."""
        t = self.telemetry
        return None if t["workers_cpu_live"] is None else t["workers_cpu_done"] + sum(t["workers_cpu_live"].values())

    def _log_window(self, stage: str, step: int, lr: float, bar) -> None:
        """Write the window's mean loss parts, LR and throughput; show the parts on the bar."""
        w, t = self.telemetry["window"], self.telemetry
        if not w or not w["n"]:
            return
        parts = {k: round(v / w["n"], 6) for k, v in w["sums"].items()}
        seconds = max(w["seconds"], 1e-9)
        self._sample_load()
        self._sample_workers()
        entry = {"kind": "train", "stage": stage, "step": step, "iteration": t["iteration"], "lr": lr,
                 "parts": parts, "images_per_s": {k: round(v / seconds, 2) for k, v in w["images"].items()},
                 "load_1min": load_average()}
        if self.log is not None and distributed.is_main():
            self.log.write(entry)
        bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()} | {"lr": f"{lr:.2e}"})
        t["window"] = None

    def _validate(self, stage: str, step: int) -> None:
        """Periodic validation; the RNG state is restored afterwards, so training goes on exactly as
        without it (the evaluation loader draws a seed from the global generator)."""
        state = rng_state()
        metrics = self.validate()
        set_rng_state(state)
        self.method.train()
        t = self.telemetry
        t["validations"] += 1
        entry = {"kind": "val", "stage": stage, "step": step, "iteration": t["iteration"],
                 "miou": round(metrics["miou"], 4), "pixel_acc": round(metrics["pixel_acc"], 4)}
        if t["best"] is None or metrics["miou"] > t["best"]["miou"]:
            t["best"] = {"iteration": t["iteration"], "step": step, "miou": metrics["miou"],
                         "pixel_acc": metrics["pixel_acc"], "per_class_iou": metrics["per_class_iou"]}
        if self.log is not None and distributed.is_main():
            self.log.write(entry)

    def _run_stage(self, index: int, stage, ckpt: dict | None, last: bool = True) -> None:
        method, spec, device = self.method, self.spec, self.device
        method.on_stage_start(stage.name)
        total = spec.iterations if stage.iterations is None else stage.iterations
        optimizer = build_optimizer(method.param_groups(stage.name), spec)
        autocast, scaler = amp_context(device, spec.amp, spec.cpu_amp)
        start = 0
        if ckpt is not None:
            start = ckpt["step"]
            self.resumed_from = start
            if ckpt["optimizer"]:
                optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt["scaler"]:
                scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"])
        else:
            torch.manual_seed(self.seed + 1000 * index)

        names = list(self.views)
        rank, world = distributed.rank(), distributed.world()
        loaders = [make_loader(ds, bs, self.seed, f"{name}/{stage.name}", start, total, spec.num_workers,
                               pin_memory=device.type == "cuda", rank=rank, world=world)
                   for name, (ds, bs) in self.views.items()]
        # children from before the loaders start their workers (multiprocessing's resource tracker,
        # a launcher's helpers) are not this stage's loader workers
        self.not_workers = set(children_cpu_seconds() or ())
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # under torchrun: the method in DistributedDataParallel over this stage's parameters
        network = distributed.data_parallel(method, params, device, find_unused=method.unused_parameters(stage.name))
        primary = loaders[0].batch_sampler
        images_per_step = sum(bs for _, bs in self.views.values())
        method.train()
        bar = tqdm(total=total, initial=start, desc=f"{method.name} {stage.name}",
                   disable=not self.progress or not distributed.is_main(),
                   dynamic_ncols=True, leave=False)
        batch_sizes = {name: bs for name, (_, bs) in self.views.items()}
        t0, c0 = time.perf_counter(), time.process_time()
        step_t0 = t0  # end of the previous step: a step's time includes loading its batch
        for step, batches in zip(range(start, total), zip(*loaders)):
            if step == 0 or primary.epoch_of(step) != primary.epoch_of(step - 1):
                method.on_epoch_start(primary.epoch_of(step))
            batch = {name: to_device(b, device) for name, b in zip(names, batches)}
            factor = (1 - step / total) ** spec.lr_power
            for g in optimizer.param_groups:
                g["lr"] = spec.optimizer.lr * g["lr_mult"] * factor
            with autocast:
                out = network(batch, step, stage.name)  # Method.forward is training_step
            loss = out["loss"]
            loss_value = float(loss.detach())
            if not np.isfinite(loss_value):
                parts = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1}
                kept = (f"last good checkpoint kept at {self.ckpt_path}" if self.ckpt_path.exists() else
                        "no checkpoint was written before it")
                raise BenchError(f"{method.name}: loss is {loss_value} at step {step} of stage {stage.name!r} "
                                 f"(parts: {parts}); {kept}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()  # under DDP: gradients averaged over the ranks here
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            method.on_step_end(step)
            self.telemetry["iteration"] += 1
            self.images_seen += images_per_step  # the global batch: every rank's share
            bar.update(1)
            now = time.perf_counter()
            self._accumulate(out, batch_sizes, now - step_t0)
            step_t0 = now
            if (step + 1) % LOG_EVERY == 0 or step + 1 == total:
                self._log_window(stage.name, step + 1, optimizer.param_groups[0]["lr"], bar)
            validate = (last and self.validate is not None and self.eval_every
                        and (step + 1) % self.eval_every == 0 and step + 1 < total)  # the final one: the runner's
            checkpoint = (step + 1) % spec.checkpoint_every == 0 and step + 1 < total
            if validate or checkpoint:  # neither validation nor checkpoint I/O is training time
                self.elapsed_s += time.perf_counter() - t0
                self.telemetry["cpu_s"] += time.process_time() - c0
                if validate:
                    self._validate(stage.name, step + 1)
                if checkpoint:
                    self._checkpoint(index, step + 1, optimizer, scaler)
                t0, c0 = time.perf_counter(), time.process_time()
                step_t0 = t0
        bar.close()
        self.elapsed_s += time.perf_counter() - t0
        self.telemetry["cpu_s"] += time.process_time() - c0
        self._sample_workers()  # before the stage's loaders, and their workers, go
        method.on_stage_end(stage.name)
        self.done_stages.append(stage.name)
        # the stage is finished: record it, so a resume never repeats it
        self._checkpoint(index + 1, 0, None, None)
