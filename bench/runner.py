"""Sweeps: plan (method x seed) runs for one protocol, skip finished ones, resume checkpointed ones,
run the rest; a failed run records its failure and the sweep goes on."""
from __future__ import annotations

import os
import resource
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import ValidationError

from bench import BenchError, distributed, supervision
from bench.data import synth
from bench.data.folder import FolderSource
from bench.data.readers import open_source
from bench.data.views import LabeledDataset, ResizeCenterCrop, TrainAugment
from bench.diagnostics import collapse_check
from bench.device import available_cores, describe_device, rank_device, resolve_device
from bench.engine import Trainer, evaluate
from bench.metrics import scores
from bench.method import RunContext
from bench.predict import N_SAMPLES, predict_sample_ids, samples_path, save_predictions, save_samples
from bench.protocol import Override, Protocol, deep_merge, load_protocol, nested, parse_override
from bench.registry import get_method_class, list_methods
from bench.record import SCHEMA_VERSION, RunRecord, read_record, write_record
from bench.results import (FAILURE_FILE, PER_IMAGE_FILE, PREDICTIONS_FILE, RESULT_FILE, check_writable, config_hash,
                           git_commit, identity, remove_orphaned_tmp, run_dir, run_lock, save_per_image, versions,
                           write_json_atomic)
from bench.splits import ids_sha256, select_labelled, split_file_sha256, write_split_file
from bench.telemetry import METRICS_FILE, TENSORBOARD_DIR, RunLog

DEFAULT_CACHE = Path(os.environ.get("BENCH_CACHE_DIR", ".bench_cache"))


@dataclass
class RunPlan:
    method: str
    seed: int
    protocol: Protocol
    method_cfg: object
    resolved: dict
    config_hash: str
    dir: Path
    overrides: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} / {self.protocol.name} / seed {self.seed}"


def split_overrides(overrides: list[Override], methods: list[str]) -> tuple[dict, dict[str, dict]]:
    """Overrides -> (protocol overrides, per-method config overrides), each a dict key path -> value.

    ``method.x`` applies to every method in the sweep, ``<name>.x`` to that method only;
    anything else is a protocol field (``train.iterations``).
    """
    protocol, per_method = {}, {m: {} for m in methods}
    for keys, value in overrides:
        if keys[0] == "method":
            for m in methods:
                per_method[m][keys[1:]] = value
        elif keys[0] in list_methods():
            if keys[0] in per_method:
                per_method[keys[0]][keys[1:]] = value
        else:
            protocol[keys] = value
    return protocol, per_method


def plan_sweep(methods: list[str], protocol_name: str, seeds: list[int], overrides: list[Override | str],
               results_dir: Path) -> list[RunPlan]:
    """Resolve every run's config up front, so a bad name or field fails before any training.
    ``overrides``: (key path, value) pairs; a ``key=value`` text is parsed as on the command line."""
    methods, seeds = list(dict.fromkeys(methods)), list(dict.fromkeys(seeds))  # drop repeats, keep order
    for m in methods:
        get_method_class(m)
    overrides = [parse_override(o) if isinstance(o, str) else o for o in overrides]
    proto_over, method_over = split_overrides(overrides, methods)
    protocol = load_protocol(protocol_name, proto_over)
    split_sha = split_file_sha256(protocol.labelled)
    unknown = sorted(set(protocol.methods) - set(list_methods()))
    if unknown:
        raise BenchError(f"protocol {protocol.name}: methods.{unknown[0]}: no such method; valid: {', '.join(list_methods())}")
    plans = []
    for m in methods:
        cls = get_method_class(m)
        supervision.check_needs(m, cls.needs)
        try:
            mcfg = cls.Config.model_validate(deep_merge(protocol.methods.get(m, {}), nested(method_over[m])))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(map(str, err["loc"]))  # empty for a check across fields, whose message names them
            msg = err["msg"].removeprefix("Value error, ")
            origin = f" (protocol {protocol.name} sets methods.{m})" if protocol.methods.get(m) else ""
            raise BenchError(f"method {m}: " + (f"config field {where}: " if where else "") + msg + origin) from None
        recorded = {**{".".join(k): v for k, v in proto_over.items()},
                    **{".".join((m, *k)): v for k, v in method_over[m].items()}}
        for seed in seeds:
            resolved = {"method": {"name": m, **mcfg.model_dump()}, "protocol": protocol.model_dump(), "seed": seed}
            if split_sha:  # the list's content, not only its path, decides which run this is
                resolved["split_file_sha256"] = split_sha
            chash = config_hash(identity(resolved))
            plans.append(RunPlan(m, seed, protocol, mcfg, resolved, chash,
                                 run_dir(results_dir, protocol.name, m, seed, chash), recorded))
    return plans


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


def build_views(method_cls, source: FolderSource, train_ids: list[str], labelled: list[str],
                protocol: Protocol) -> dict[str, tuple]:
    """The datasets a method gets, from what it declares it needs, and nothing more."""
    t = protocol.train
    if method_cls.augment_in_loader:
        augment = TrainAugment(t.crop, tuple(t.scale), source.ignore_index)
    else:
        augment = ResizeCenterCrop(t.crop, source.ignore_index)
    return supervision.views(method_cls.needs, method_cls.name, source, train_ids, labelled, augment, t,
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
    pool = source.split_ids(protocol.labelled.pool) if protocol.labelled.pool else None
    split = select_labelled(train_ids, protocol.labelled, pool, source.entry_id)
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
        return evaluate(method, source, eval_ids, protocol.eval, device, protocol.train.amp, progress=False)[0]

    workers = loader_workers(protocol.train.num_workers, "train.num_workers" in plan.overrides)
    train_spec = protocol.train.model_copy(update={"num_workers": workers["used"]})
    trainer = Trainer(method, views, train_spec, device, plan.seed, ckpt_path, plan.config_hash, progress,
                      log=log, validate=validate if protocol.eval.every else None, eval_every=protocol.eval.every)
    trainer.run()
    pseudo = method.pseudo_labels()
    pseudo_scores = score_pseudo_labels(source, views[pseudo[0]][0], pseudo[1]) if pseudo is not None else None
    t0 = time.perf_counter()
    metrics, per_image = evaluate(method, source, eval_ids, protocol.eval, device, protocol.train.amp, progress)
    eval_s = time.perf_counter() - t0
    cluster_map = metrics.get("cluster_to_class") if metrics.get("matching") == "hungarian" else None
    sample_ids = eval_ids[:N_SAMPLES]
    samples = samples_path(protocol_dir, ids_sha256(eval_ids))
    if distributed.is_main():
        save_samples(samples, source, sample_ids)
    predictions = predict_sample_ids(method, source, sample_ids, protocol.eval, device, protocol.train.amp,
                                     cluster_map)
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
    out = {
        "train_cpu_time_s": round(t["cpu_s"], 3),
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


def checkpoint_path(plan: RunPlan, cache_dir: Path) -> Path:
    return (Path(cache_dir) / "checkpoints" / plan.protocol.name / plan.method
            / f"seed{plan.seed}-{plan.config_hash[:10]}.pt")


@torch.no_grad()
def score_pseudo_labels(source: FolderSource, dataset, masks: torch.Tensor) -> dict:
    """Score a method's pseudo masks of its training images against the true masks (read here, by
    the harness, after training; the method never sees them). Two views: over the pixels the
    pseudo masks label (``labelled_pixels``), and over all pixels with unlabelled ones counted as
    misses (``all_pixels``); ``coverage`` = labelled share of the valid ground-truth pixels."""
    truth = LabeledDataset(source, dataset.ids, dataset.augment)
    if len(masks) != len(truth):
        raise BenchError(f"pseudo masks for {len(masks)} images, but the view has {len(truth)}")
    c, ignore = source.num_classes, source.ignore_index
    labelled = torch.zeros(c, c, dtype=torch.int64)
    missed = torch.zeros(c, dtype=torch.int64)  # valid ground-truth pixels the pseudo masks leave unlabelled
    for i in range(len(truth)):
        gt = truth[(i, 0)]["mask"].long().reshape(-1)
        pseudo = masks[i].long().reshape(-1)
        if gt.shape != pseudo.shape:
            raise BenchError(f"pseudo mask {i} has {pseudo.numel()} pixels, its image {gt.numel()}")
        valid = gt != ignore
        covered = valid & (pseudo != ignore)
        labelled += torch.bincount(gt[covered] * c + pseudo[covered], minlength=c * c).view(c, c)
        missed += torch.bincount(gt[valid & ~covered], minlength=c)
    total = labelled.sum() + missed.sum()
    return {"n_images": len(truth), "coverage": round(float(labelled.sum() / total.clamp(min=1) * 100), 4),
            "labelled_pixels": scores(labelled, source.class_names),
            "all_pixels": scores(labelled, source.class_names, unmatched=missed)}


def _peak_memory_mb(device: torch.device) -> dict:
    out = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        out["cuda_allocated"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


@dataclass
class Outcome:
    plan: RunPlan
    status: str  # "done", "skipped", "failed", "busy" (another process holds the run)
    record: RunRecord | None = None
    error: str | None = None


def run_sweep(plans: list[RunPlan], results_dir: Path, device_name: str = "auto", cache_dir: Path = DEFAULT_CACHE,
              progress: bool = True, log=print, keep_checkpoint: bool = False,
              tensorboard: bool = False) -> list[Outcome]:
    """``keep_checkpoint``: leave each finished run's final checkpoint (its weights and method state)
    in the cache instead of deleting it, e.g. to evaluate it again later."""
    check_writable(results_dir)
    device = rank_device(resolve_device(device_name))
    commit = git_commit()  # the code this process loaded, whatever happens to the tree meanwhile
    if not distributed.is_main():
        log = _quiet  # rank 0 speaks for the group
    outcomes = []
    for plan in plans:
        try:
            # under torchrun rank 0 holds the lock and decides; every rank follows its decision
            with (run_lock(plan.dir) if distributed.is_main() else nullcontext(True)) as mine:
                if not distributed.broadcast_flag(mine):
                    log(f"[busy] {plan.label}: another process is running it")
                    outcomes.append(Outcome(plan, "busy"))
                    continue
                outcomes.append(_run_one(plan, device, cache_dir, commit, progress, log, keep_checkpoint, tensorboard))
        except OSError as exc:  # the run folder or its lock cannot be made (full disk, read-only)
            reason = f"cannot write in {plan.dir}: {_os_reason(exc)}"
            log(f"[fail] {plan.label}: {reason}")
            outcomes.append(Outcome(plan, "failed", error=reason))
    return outcomes


def _os_reason(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _quiet(*_):
    pass


def _run_one(plan: RunPlan, device, cache_dir: Path, commit: str | None, progress: bool, log,
             keep_checkpoint: bool = False, tensorboard: bool = False) -> Outcome:
    """One run, under its lock. Whatever goes wrong (training, evaluation, writing the record, a
    record on disk that cannot be read) fails this run only: its failure.json says why."""
    result_path = plan.dir / RESULT_FILE
    if distributed.broadcast_flag(result_path.exists()):
        try:
            record = read_record(result_path)
        except BenchError as exc:  # left as it is: a finished record is never overwritten
            return _failed(plan, f"{exc}; fix or delete it to run again", log)
        stale = record.stale()
        if stale:
            log(f"[stale] {plan.label}: {result_path} {stale}; delete its folder to re-run it")
        else:
            log(f"[skip] {plan.label}: {result_path} exists")
        return Outcome(plan, "skipped", record=record)
    log(f"[run]  {plan.label} on {device}")
    ckpt_path = checkpoint_path(plan, cache_dir)
    try:
        if distributed.is_main():  # what a killed run of this plan left half-written (we hold its lock)
            for directory in (plan.dir, ckpt_path.parent, plan.dir.parent.parent / "splits"):
                remove_orphaned_tmp(directory)
        record, per_image = execute(plan, device, cache_dir, commit, progress, tensorboard)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return _failed(plan, _reason(exc), log)
    if keep_checkpoint:
        record.checkpoint = str(Path(ckpt_path).resolve())
    error = None
    if distributed.is_main():
        try:
            save_per_image(plan.dir / PER_IMAGE_FILE, per_image)
            write_record(result_path, record)  # last: its presence marks the run finished
            (plan.dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure of this run is now superseded
            if not keep_checkpoint:
                ckpt_path.unlink(missing_ok=True)
        except OSError as exc:
            error = f"cannot write the record: {_os_reason(exc)}"
    distributed.barrier()  # the record exists before any rank looks at the next run
    if error is not None:
        return _failed(plan, error, log)
    collapsed = record.collapse["collapsed"]
    log(f"[done] {plan.label}: mIoU {record.metrics.miou:.2f}  pixel acc {record.metrics.pixel_acc:.2f}"
        + (f"  COLLAPSED ({'; '.join(record.collapse['reasons'])})" if collapsed else ""))
    return Outcome(plan, "done", record=record)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BenchError):
        reason = str(exc)
    elif isinstance(exc, OSError):
        reason = f"{type(exc).__name__}: {_os_reason(exc)}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    if "Original Traceback" in reason:  # raised in a loader worker: its last line is the message
        reason = reason.strip().splitlines()[-1].removeprefix("bench.BenchError: ")
    return " ".join(reason.split("\n")).strip()


def _failed(plan: RunPlan, reason: str, log) -> Outcome:
    """Record the failure next to where the run's result would be; a failure that cannot be
    written either (full disk) is still reported, and the sweep goes on."""
    if distributed.is_main():
        try:
            write_json_atomic(plan.dir / FAILURE_FILE, {
                "method": plan.method, "protocol": plan.protocol.name, "seed": plan.seed,
                "config_hash": plan.config_hash, "reason": reason,
                "traceback_tail": traceback.format_exc().splitlines()[-15:],
                "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        except OSError as exc:
            reason += f" (its {FAILURE_FILE} could not be written either: {_os_reason(exc)})"
        log(f"[fail] {plan.label}: {reason}")
    return Outcome(plan, "failed", error=reason)
