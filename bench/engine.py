"""The engine: training loop (poly LR, AMP, checkpoints, resume), and evaluation.

Kept in the spirit of torchvision's ``references/segmentation``: one explicit loop, one explicit
evaluation over a bincount confusion matrix.
"""
from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from bench import BenchError, distributed
from bench.data.folder import FolderSource
from bench.data.views import LabeledDataset, make_loader
from bench.method import Method
from bench.metrics import ConfusionMatrix, cluster_scores, scores
from bench.protocol import EvalSpec, TrainSpec
from bench.results import atomic_path
from bench.telemetry import LOG_EVERY, RunLog, load_average


def amp_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA where supported (no loss scaling needed), fp16 otherwise."""
    if device.type != "cuda" or not enabled:
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return torch.autocast("cuda", dtype=dtype), scaler


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temp file and a rename: never a half-written checkpoint. Saved through
    a Python file object, so a full disk is an OSError ("No space left on device") rather than
    torch's "unexpected pos"."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise BenchError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_KEYS = ("config_hash", "stage_index", "step", "done_stages", "method", "optimizer", "scaler", "rng",
                   "elapsed_s", "images_seen")


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's own message advises weights_only=False: never for a file we cannot vouch for
        raise BenchError(f"checkpoint {path} is damaged or not a bench checkpoint; "
                         "delete it to start the run over") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else ["(not a mapping)"]
    if missing:
        raise BenchError(f"checkpoint {path} is not a bench checkpoint (lacks {', '.join(missing)}); "
                         "delete it to start the run over")
    return ckpt


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
        # kept in the checkpoint, so a resumed run's telemetry continues where the checkpoint was taken
        self.telemetry = {"iteration": 0, "cpu_s": 0.0, "images_by_view": {name: 0 for name in views},
                          "load_sum": 0.0, "load_n": 0, "load_max": None, "best": None, "validations": 0,
                          "log_offset": 0, "window": None}

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

    def _log_window(self, stage: str, step: int, lr: float, bar) -> None:
        """Write the window's mean loss parts, LR and throughput; show the parts on the bar."""
        w, t = self.telemetry["window"], self.telemetry
        if not w or not w["n"]:
            return
        parts = {k: round(v / w["n"], 6) for k, v in w["sums"].items()}
        seconds = max(w["seconds"], 1e-9)
        self._sample_load()
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
        optimizer = build_optimizer(method.param_groups(), spec)
        autocast, scaler = amp_context(device, spec.amp)
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
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # under torchrun: the method in DistributedDataParallel over this stage's parameters
        network = distributed.data_parallel(method, params, device, find_unused=method.unused_parameters())
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
                out = network(batch, step)  # Method.forward is training_step
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
        method.on_stage_end(stage.name)
        self.done_stages.append(stage.name)
        # the stage is finished: record it, so a resume never repeats it
        self._checkpoint(index + 1, 0, None, None)


@torch.no_grad()
def slide_logits(method: Method, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Sliding-window logits: average over overlapping crops; images smaller than the crop are padded."""
    b, _, h, w = images.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    x = F.pad(images, (0, pw, 0, ph))
    H, W = x.shape[-2:]
    out, count = None, torch.zeros(1, 1, H, W, device=images.device)
    tops = sorted({min(t, H - crop) for t in range(0, H - crop + stride, stride)})
    lefts = sorted({min(l, W - crop) for l in range(0, W - crop + stride, stride)})
    for top in tops:
        for left in lefts:
            logits = method.predict(x[:, :, top:top + crop, left:left + crop]).float()
            if out is None:
                out = torch.zeros(b, logits.shape[1], H, W, device=images.device)
            out[:, :, top:top + crop, left:left + crop] += logits
            count[:, :, top:top + crop, left:left + crop] += 1
    return (out / count)[:, :, :h, :w]


def _collate_list(items):
    return items


@torch.no_grad()
def evaluate(method: Method, source: FolderSource, ids: list[str], spec: EvalSpec, device: torch.device,
             amp: bool = True, progress: bool = True) -> tuple[dict, torch.Tensor]:
    """Predict every evaluation image at its label's resolution and score the whole set at once.

    Returns the metrics and the per-image confusion matrices [N, C, K] (int32, in ``ids`` order),
    from which paired bootstrap comparisons over images are computed later.
    """
    method.eval()
    distributed.average_batchnorm_stats(method)
    dataset = LabeledDataset(source, ids, augment=None)
    # under torchrun each rank predicts every world-th image; the matrices are summed below
    mine = range(distributed.rank(), len(ids), distributed.world())
    loader = DataLoader(dataset, sampler=[(i, 0) for i in mine], batch_size=spec.batch_size,
                        collate_fn=_collate_list)
    cm = ConfusionMatrix(source.num_classes, method.num_outputs, source.ignore_index, device)
    per_image = torch.zeros(len(ids), source.num_classes, method.num_outputs, dtype=torch.int32)
    autocast, _ = amp_context(device, amp)
    for items in tqdm(loader, desc=f"{method.name} eval", disable=not progress or not distributed.is_main(),
                      leave=False, dynamic_ncols=True):
        # images of one size are stacked into one forward pass; real datasets mix sizes
        by_size: dict[tuple, list] = {}
        for item in items:
            by_size.setdefault(tuple(item["image"].shape), []).append(item)
        for group in by_size.values():
            images = torch.stack([it["image"] for it in group]).to(device)
            with autocast:
                if spec.mode == "slide":
                    logits = slide_logits(method, images, spec.crop, spec.stride)
                else:
                    logits = method.predict(images)
            for it, pred in zip(group, logits.argmax(1)):
                per_image[it["index"]] = cm.update(it["mask"].to(device), pred).to("cpu", torch.int32)
    cm.all_reduce()
    per_image = distributed.all_reduce_sum(per_image.long()).to(torch.int32)  # each image on one rank only
    if method.output == "clusters":
        metrics = cluster_scores(cm.mat.cpu(), source.class_names)
    else:
        metrics = scores(cm.mat.cpu(), source.class_names)
        metrics["matching"] = "direct"
    metrics["n_images"] = len(ids)
    return metrics, per_image


@torch.no_grad()
def predict_classes(method: Method, images: torch.Tensor, spec: EvalSpec, device: torch.device,
                    amp: bool = True, cluster_to_class: list[int] | None = None,
                    ignore_index: int = 255) -> torch.Tensor:
    """Class index map [B, H, W] (int64, CPU) of a batch of normalised images, as ``evaluate``
    predicts them; cluster outputs go through the record's cluster -> class map (unmatched
    clusters -> ``ignore_index``)."""
    method.eval()
    autocast, _ = amp_context(device, amp)
    with autocast:
        images = images.to(device)
        if spec.mode == "slide":
            logits = slide_logits(method, images, spec.crop, spec.stride)
        else:
            logits = method.predict(images)
    pred = logits.argmax(1).cpu()
    if cluster_to_class is not None:
        table = torch.as_tensor(cluster_to_class, dtype=torch.int64)
        pred = torch.where(table[pred] < 0, torch.full_like(pred, ignore_index), table[pred])
    return pred
