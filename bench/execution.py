"""Executing one planned run: its data views, the method, the trainer (resuming its checkpoint),
evaluation, and the run record."""
from __future__ import annotations

import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import BenchError, distributed, supervision
from bench.checkpoint import checkpoint_path
from bench.data import synth
from bench.data.folder import FolderSource
from bench.data.readers import open_source
from bench.data.views import ResizeCenterCrop, TrainAugment
from bench.device import available_cores, cpu_bf16_fast, describe_device
from bench.diagnostics import collapse_check
from bench.evaluation import evaluate, score_pseudo_labels
from bench.method import RunContext
from bench.planning import RunPlan
from bench.predict import N_SAMPLES, predict_sample_ids, samples_path, save_predictions, save_samples
from bench.protocol import Protocol
from bench.record import SCHEMA_VERSION, RunRecord
from bench.registry import get_method_class
from bench.results import PER_IMAGE_FILE, PREDICTIONS_FILE, versions
from bench.splits import ids_sha256, select_labeled, write_split_file
from bench.telemetry import METRICS_FILE, TENSORBOARD_DIR, RunLog
from bench.trainer import Trainer


def prepare_source(protocol: Protocol, cache_dir: Path, progress: bool = True) -> FolderSource:
    ds = protocol.dataset
    if ds.name == "synth":
        s = ds.synth
        root = Path(ds.root) if ds.root else Path(cache_dir) / "data" / synth.synth_folder_name(
            s.seed, s.num_train, s.num_val, s.size)
        synth.generate(root, s.seed, s.num_train, s.num_val, s.size, progress=progress)
        source = FolderSource.open(root)
    else:
        source = open_source(ds.name, ds.root, ds.hf)
    source.resize = ds.resize
    return source


def build_views(method_cls, source: FolderSource, train_ids: list[str], labeled: list[str],
                protocol: Protocol) -> dict[str, tuple]:
    """The datasets a method gets, from what it declares it needs, and nothing more."""
    t = protocol.train
    if method_cls.augment_in_loader:
        augment = TrainAugment(t.crop, tuple(t.scale), source.ignore_index)
    else:
        augment = ResizeCenterCrop(t.crop, source.ignore_index)
    return supervision.views(method_cls.needs, method_cls.name, source, train_ids, labeled, augment, t,
                             protocol.name)


def loader_workers(requested: int, user_set: bool) -> dict:
    """DataLoader workers per loader: the protocol's ``train.num_workers`` capped at the cores
    available (more workers than cores only compete with the training process; torch warns of
    slowness or freezes), unless the user set ``train.num_workers`` on the command line. The
    number cannot change a run's numbers (not in the config hash); the record keeps it."""
    cores = available_cores(per_local_process=True)
    used = requested if user_set else min(requested, cores)
    return {"requested": requested, "used": used, "cores": cores, "capped": used < requested}


def execute(plan: RunPlan, device: torch.device, cache_dir: Path, commit: str | None,
            progress: bool = True, tensorboard: bool = False) -> tuple[RunRecord, torch.Tensor]:
    """Train (resuming the checkpoint at ``checkpoint_path`` if there is one), evaluate; return the
    result record and the per-image confusion matrices."""
    protocol, cls = plan.protocol, get_method_class(plan.method)
    source = prepare_source(protocol, cache_dir, progress)
    train_ids = source.split_ids(protocol.dataset.train_split)
    eval_ids = source.split_ids(protocol.dataset.eval_split)
    pool = source.split_ids(protocol.labeled.pool) if protocol.labeled.pool else None
    split = select_labeled(train_ids, protocol.labeled, pool, source.entry_id)
    source.check_sizes(list(dict.fromkeys(split.ids + eval_ids)))  # the masks it will read; before training
    protocol_dir = plan.dir.parent.parent  # <results>/<protocol>: split lists are shared by its runs
    split_file = write_split_file(protocol_dir / "splits", split)
    ckpt_path = checkpoint_path(plan, cache_dir)

    views = build_views(cls, source, train_ids, split.ids, protocol)  # draws no random numbers
    torch.manual_seed(plan.seed)
    ctx = RunContext(source.num_classes, source.class_names, source.ignore_index, device, protocol.model,
                     protocol.train.iterations, plan.seed, protocol.train.optimizer.lr, tuple(protocol.train.scale),
                     protocol.train.batch_size, datasets={name: ds for name, (ds, _) in views.items()})
    method = cls(plan.method_cfg, ctx).to(device)
    if device.type == "cpu" and protocol.train.cpu_amp and distributed.is_main() and not cpu_bf16_fast():
        print("bench: warning: train.cpu_amp=true, but this CPU has no bf16 path (oneDNN needs AVX-512): "
              "training will be several times slower than without it", file=sys.stderr)
    if protocol.train.sync_bn and distributed.active():
        if device.type != "cuda":
            raise BenchError("train.sync_bn (on by default for real-data protocols) needs CUDA: torch has no "
                             "SyncBatchNorm on CPU; set train.sync_bn=false (--preset cpu does) and the CPU "
                             "processes average their BatchNorm statistics at checkpoints")
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log = RunLog(plan.dir / METRICS_FILE, plan.dir / TENSORBOARD_DIR if tensorboard else None)

    def validate():
        return evaluate(method, source, eval_ids, protocol.eval, device, protocol.train.amp, progress=False,
                        cpu_amp=protocol.train.cpu_amp)[0]

    workers = loader_workers(protocol.train.num_workers, "train.num_workers" in plan.overrides)
    train_spec = protocol.train.model_copy(update={"num_workers": workers["used"]})
    trainer = Trainer(method, views, train_spec, device, plan.seed, ckpt_path, plan.config_hash, progress,
                      log=log, validate=validate if protocol.eval.every else None, eval_every=protocol.eval.every)
    trainer.run()
    pseudo = method.pseudo_labels()
    pseudo_scores = score_pseudo_labels(source, views[pseudo[0]][0], pseudo[1]) if pseudo is not None else None
    t0 = time.perf_counter()
    metrics, per_image = evaluate(method, source, eval_ids, protocol.eval, device, protocol.train.amp, progress,
                                  protocol.train.cpu_amp)
    eval_s = time.perf_counter() - t0
    cluster_map = metrics.get("cluster_to_class") if metrics.get("matching") == "hungarian" else None
    sample_ids = eval_ids[:N_SAMPLES]
    samples = samples_path(protocol_dir, ids_sha256(eval_ids))
    if distributed.is_main():
        save_samples(samples, source, sample_ids)
    predictions = predict_sample_ids(method, source, sample_ids, protocol.eval, device, protocol.train.amp,
                                     cluster_map, protocol.train.cpu_amp)
    record = RunRecord(
        schema_version=SCHEMA_VERSION,
        method=plan.method, protocol=protocol.name, seed=plan.seed,
        supervision=sorted(cls.needs), output=cls.output, eval_network=method.eval_network,
        method_revision=cls.revision(plan.method_cfg),
        config=plan.resolved, config_hash=plan.config_hash, overrides=plan.overrides,
        split={**split.record(len(train_ids)), "file": split_file.relative_to(protocol_dir).as_posix()},
        dataset={"name": protocol.dataset.name, "root": str(source.root), "eval_split": protocol.dataset.eval_split,
                 "n_eval": len(eval_ids), "eval_ids_sha256": ids_sha256(eval_ids), "num_classes": source.num_classes,
                 "class_names": source.class_names},
        per_image_file=PER_IMAGE_FILE,
        git_commit=commit, versions=versions(), device=describe_device(device),
        processes=distributed.world(), loader_workers=workers,
        train_time_s=round(trainer.elapsed_s, 3), eval_time_s=round(eval_s, 3),
        train_images_per_s=round(trainer.images_seen / max(trainer.elapsed_s, 1e-9), 3),
        resumed_from_step=trainer.resumed_from,
        peak_memory_mb=_peak_memory_mb(device),
        metrics=metrics,
        pseudo_labels=pseudo_scores,
        method_summary=method.summary(),
        **telemetry_fields(trainer, metrics, protocol),
        collapse=collapse_check(per_image.long().sum(0).numpy(), metrics["miou"], cluster_map),
        metrics_file=METRICS_FILE, predictions_file=PREDICTIONS_FILE,
        samples_file=samples.relative_to(protocol_dir).as_posix(),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if distributed.is_main():  # before result.json, whose presence marks the run finished
        save_predictions(plan.dir / PREDICTIONS_FILE, sample_ids, predictions)
    return record, per_image


def telemetry_fields(trainer: Trainer, final: dict, protocol: Protocol) -> dict:
    """The record's timing and load facts, throughput per view, and the best-of-N validation."""
    t = trainer.telemetry
    seconds = max(trainer.elapsed_s, 1e-9)
    workers_cpu_s = trainer.workers_cpu_s()
    out = {
        "train_cpu_time_s": round(t["cpu_s"], 3),
        "train_worker_cpu_time_s": None if workers_cpu_s is None else round(workers_cpu_s, 3),
        "load": {"mean_1min": round(t["load_sum"] / t["load_n"], 2) if t["load_n"] else None,
                 "max_1min": t["load_max"], "samples": t["load_n"], "cpu_count": os.cpu_count()},
        "train_images_by_view": dict(t["images_by_view"]),
        "train_images_per_s_by_view": {k: round(v / seconds, 3) for k, v in t["images_by_view"].items()},
    }
    if protocol.eval.report == "best":
        best = t["best"]
        if best is None or final["miou"] >= best["miou"]:
            best = {"iteration": t["iteration"], "step": None, "miou": final["miou"], "pixel_acc": final["pixel_acc"],
                    "per_class_iou": final["per_class_iou"]}
        out["best_validation"] = {**best, "n_evaluations": t["validations"] + 1,
                                  "note": "best-of-N validation on the evaluation split, optimistic"}
    return out


def _peak_memory_mb(device: torch.device) -> dict:
    out = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out
